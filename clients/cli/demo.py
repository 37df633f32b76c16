"""`make demo`: the main job, end to end on this machine, for three device classes.

Starts edgeforge (`edgeforge up --no-agent`: four services on one port, SQLite + a local blob
directory, authentication on), and with the admin token it wrote creates an agent token and a builder
token over RPC (`edgeforge tokens create`). It starts three agents that emulate three devices on this
machine — a two-core laptop (`taskset -c 0,1`), a one-core phone-class device (`taskset -c 0`), and
a board that only has onnxruntime (`--runtimes onnxruntime`). They share a host lock, so only one
measures at a time and none steals another's cores. Then it submits docs/examples/smollm2-fleet.yaml —
the real SmolLM2-135M-Instruct, calibrated on Wikipedia text, five candidates (GGUF F16/Q8_0/Q4_0,
ONNX fp32/int8) — follows its progress, prints each target's table and chosen artifact with the
reasons (all as the builder, which sees only its own build and artifacts), writes report.json and
report.html into the output directory, and shuts everything down.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc

from clients.cli import progress, tables
from clients.python import spec as spec_file
from clients.python.client import Client, build_name
from edgeforge.v1 import coordinator_pb2

SPEC = Path(__file__).resolve().parents[2] / "docs" / "examples" / "smollm2-fleet.yaml"
# name -> (CPUs to pin to, extra agent flags): the three emulated devices.
DEVICES = {"laptop-2core": ("0,1", ()), "phone-class-1core": ("0", ()),
           "onnx-only": ("1", ("--runtimes", "onnxruntime"))}


def start_edgeforge(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "clients.cli.main", "up", "--port", "0", "--no-agent",
                                "--data-dir", str(data_dir)], stdout=subprocess.PIPE, stderr=log, text=True)
    line = process.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    if not match:
        process.kill()
        raise SystemExit(f"edgeforge up did not start: {line!r}; see {log_path}")
    return process, match.group(1)


AGENT_TOKEN_NAME = "demo agents"


def create_token(address: str, data_dir: Path, role: str, name: str) -> str:
    """A new token over RPC, authenticated by the admin token `edgeforge up` wrote into its data dir."""
    return subprocess.run([sys.executable, "-m", "clients.cli.main", "--address", address, "--token-file",
                           str(data_dir / "admin.token"), "tokens", "create", "--role", role, "--name", name],
                          capture_output=True, text=True, check=True).stdout.strip()


def live_agent_token(address: str, token_file: Path) -> str:
    """The name ("tokens/…") of the live agent token in `token_file`, or "" when there is none."""
    if not token_file.is_file():
        return ""
    from edgeforge.v1 import tokens_pb2
    client = Client(address, token=token_file.read_text().strip())
    try:
        token = client.whoami()
        return token.name if token.role == tokens_pb2.TOKEN_ROLE_AGENT else ""
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        return ""
    finally:
        client.close()


def start_agents(address: str, data_dir: Path, out: Path) -> list[subprocess.Popen]:
    token_file = out / "agents" / "agent.token"          # in a file (0600), not on command lines where ps shows it
    token_file.parent.mkdir(parents=True, exist_ok=True)
    # A rerun keeps its agent token: the devices a previous run registered belong to it, and the coordinator
    # refuses another agent token for a device id whose owner is still live. Demo agent tokens whose file is
    # gone are revoked, so their devices can be registered again.
    kept = live_agent_token(address, token_file)
    if not kept:
        from shared.auth import write_secret
        write_secret(token_file, create_token(address, data_dir, "agent", AGENT_TOKEN_NAME))
        kept = live_agent_token(address, token_file)
    admin = Client(address, token=(data_dir / "admin.token").read_text().strip())
    try:
        for token in admin.list_tokens():
            if token.display_name == AGENT_TOKEN_NAME and not token.HasField("revoke_time") and token.name != kept:
                admin.revoke_token(token.name)
    finally:
        admin.close()
    cpus = len(os.sched_getaffinity(0))
    pin = shutil.which("taskset") is not None and cpus >= 2
    if not pin:
        print(f"note: {'taskset is missing' if cpus >= 2 else f'only {cpus} CPU'}: the devices are not pinned "
              "to cores, so laptop and phone-class measure alike")
    agents = []
    for name, (cores, flags) in DEVICES.items():
        command = [sys.executable, "-m", "clients.agent.main", "--coordinator", address,
                   "--token-file", str(token_file),
                   "--device-id", name, "--label", f"device={name}", "--cache-dir", str(out / "agents" / name),
                   "--host-lock", str(out / "agents" / "host.lock"), *flags]
        if pin:
            command = ["taskset", "-c", cores, *command]
        agents.append(subprocess.Popen(command, stderr=open(out / f"agent-{name}.log", "w"),
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    return agents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=Path(".edgeforge-assets"))
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--spec", type=Path, default=SPEC)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parsed = spec_file.load(args.spec)
    started = time.monotonic()
    data_dir = args.out / "edgeforge-data"
    process, address = start_edgeforge(data_dir, args.out / "edgeforge.log")
    print(f"edgeforge is up on {address} (logs: {args.out})")
    agents = start_agents(address, data_dir, args.out)
    client = Client(address, token=create_token(address, data_dir, "builder", "demo builder"))
    try:
        deadline = time.monotonic() + 90
        online = []        # a rerun's database still lists the last run's devices, offline until their agents return
        while len(online) < len(DEVICES) and time.monotonic() < deadline:
            time.sleep(0.5)
            online = [d for d in client.list_devices() if d.state == coordinator_pb2.DEVICE_STATE_ONLINE]
        for device in online:
            a = device.attributes
            runtimes = ", ".join(f"{k.removeprefix('runtime:')} {v}" for k, v in sorted(a.items())
                                 if k.startswith("runtime:"))
            print(f"agent registered: {device.name} ({a['cpu']}, {a['cores']} cores; {runtimes})")
        bar = progress.Bar(sys.stdout)
        operation = client.create_build(parsed, on_upload=progress.upload_progress(bar))
        name = build_name(operation.name)
        print(f"build {name} started ({len(parsed.spec.candidates)} candidates × {len(parsed.spec.targets)} targets)")
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
                print(f"\nchosen for {device['target']} ({device['device']}): {chosen['id']} — "
                      f"artifacts/{chosen['artifact']} ({chosen['size_bytes'] / 1e6:.1f} MB, perplexity "
                      f"{chosen['quality']['value']:.3f}, p90 {chosen['latency_ms']['p90']:.1f} ms, peak "
                      f"{chosen['peak_rss_bytes'] / 1e6:.0f} MB)")
                for other in device["candidates"]:
                    if other["id"] != chosen["id"]:
                        print(f"  not {other['id']}: {other['rejected_by']}")
            else:
                print(f"\nnothing met the constraints on {device['target']}; nearest misses: "
                      + "; ".join(device.get("nearest_misses") or ["none measured"]))
        print(f"\nwrote {args.out / 'report.json'} and {args.out / 'report.html'} "
              f"in {time.monotonic() - started:.0f} s")
    finally:
        client.close()
        for agent in agents:
            agent.terminate()
        for agent in agents:
            agent.wait(timeout=60)
        process.terminate()
        process.wait(timeout=60)


if __name__ == "__main__":
    main()
