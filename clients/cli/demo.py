"""`make demo`: the main job, end to end on this machine.

Starts edgeforge (`edgeforge up`: four services on one port, SQLite + a local blob directory, and
a local agent), submits docs/examples/smollm2-laptop.yaml — the real SmolLM2-135M-Instruct,
calibrated on Wikipedia text, five candidates (GGUF F16/Q8_0/Q4_0, ONNX fp32/int8) — follows its
progress, prints the per-candidate table and the chosen artifact, writes report.json and
report.html into the output directory, and shuts everything down.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from clients.cli import progress, tables
from clients.python import spec as spec_file
from clients.python.client import Client, build_name
from edgeforge.v1 import coordinator_pb2

SPEC = Path(__file__).resolve().parents[2] / "docs" / "examples" / "smollm2-laptop.yaml"


def start_edgeforge(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "clients.cli.main", "up", "--port", "0",
                                "--data-dir", str(data_dir)], stdout=subprocess.PIPE, stderr=log, text=True)
    line = process.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    if not match:
        process.kill()
        raise SystemExit(f"edgeforge up did not start: {line!r}; see {log_path}")
    return process, match.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=Path(".edgeforge-assets"))
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--spec", type=Path, default=SPEC)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parsed = spec_file.load(args.spec)
    started = time.monotonic()
    process, address = start_edgeforge(args.out / "edgeforge-data", args.out / "edgeforge.log")
    print(f"edgeforge is up on {address} (logs: {args.out / 'edgeforge.log'})")
    client = Client(address)
    try:
        deadline = time.monotonic() + 60
        while not client.list_devices() and time.monotonic() < deadline:
            time.sleep(0.5)
        for device in client.list_devices():
            print(f"agent registered: {device.name} ({device.attributes['cpu']}, {device.attributes['cores']} cores)")
        bar = progress.Bar(sys.stdout)
        operation = client.create_build(parsed, on_upload=progress.upload_progress(bar))
        name = build_name(operation.name)
        print(f"build {name} started ({len(parsed.spec.candidates)} candidates)")
        client.wait(operation.name, progress.build_progress(bar))
        bar.done()
        build = client.get_build(name)
        if build.state != coordinator_pb2.BUILD_STATE_SUCCEEDED:
            raise SystemExit(f"build {name} ended {coordinator_pb2.BuildState.Name(build.state)}: {build.error.message}")
        client.download(build.report_json_artifact, args.out / "report.json")
        client.download(build.report_html_artifact, args.out / "report.html")
        report = json.loads((args.out / "report.json").read_text())
        print()
        print(tables.candidate_table(report))
        for device in report["devices"]:
            chosen = next((c for c in device["candidates"] if c["id"] == device["chosen"]), None)
            if chosen:
                print(f"\nchosen for {device['device']}: {chosen['id']} — artifacts/{chosen['artifact']} "
                      f"({chosen['size_bytes'] / 1e6:.1f} MB, perplexity {chosen['quality']['value']:.3f}, "
                      f"p90 {chosen['latency_ms']['p90']:.1f} ms)")
        print(f"\nwrote {args.out / 'report.json'} and {args.out / 'report.html'} "
              f"in {time.monotonic() - started:.0f} s")
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=60)


if __name__ == "__main__":
    main()
