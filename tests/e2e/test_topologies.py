"""End to end with real processes: `edgeforge up` (embedded default, with its own agent process) driven
by the `edgeforge` CLI on the real SmolLM2, and the same build API with every service in its own
process (`python -m services.<name>.server`)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clients.python import spec as spec_file
from clients.python.client import Client, build_name
from edgeforge.v1 import coordinator_pb2

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """Starts a server process and returns it with the address from its 'listening on' line."""
    process = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=open(log, "w"),
                               text=True, env=ENV)
    line = process.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    if not match:
        process.kill()
        raise AssertionError(f"{args[0]} did not start: {line!r}\n{log.read_text()[-2000:]}")
    return process, match.group(1)


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def cli(address: str, *args: str, token_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clients.cli.main", "--address", address, "--token-file",
                           str(token_file), *args], capture_output=True, text=True, env=ENV, timeout=1200)


def write_spec(path: Path, model: Path, assets: Path, **overrides) -> Path:
    raw = {"name": "e2e", "model": {"path": str(model), "task": "causal-lm"},
           "calibration": {"text_file": str(assets / "data" / "calib.txt"), "samples": 4, "sequence_length": 128},
           "evaluation": {"text_file": str(assets / "data" / "eval.txt"), "max_tokens": 512},
           "targets": [{"selector": {"os": "linux"}}],
           "constraints": {"max_quality_loss_pct": 40},
           "candidates": [{"format": "gguf", "quantization": {"method": "rtn", "type": "q4_0"}},
                          {"format": "onnx", "quantization": {"method": "rtn", "bits": 8, "granularity": "per_channel"}}],
           "benchmark": {"prompt_tokens": 32, "generation_tokens": 8, "warmup_runs": 1, "timed_runs": 3,
                         "min_duration_ms": 0, "cooldown_ms": 0, "skip_throughput": True}}
    raw.update(overrides)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_edgeforge_up_and_cli_on_the_real_model(tmp_path, assets, smollm2_dir):
    up, address = start(["clients.cli.main", "up", "--port", "0", "--data-dir", str(tmp_path / "data")],
                        tmp_path / "up.log")
    admin = tmp_path / "data" / "admin.token"            # written (0600) before "listening on" was printed
    assert admin.stat().st_mode & 0o777 == 0o600
    try:
        deadline = time.monotonic() + 60
        while '"devices/' not in (listing := cli(address, "devices", "--json", token_file=admin).stdout) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        device = json.loads(listing)[0]
        assert device["attributes"]["os"] == "linux" and "runtime:llama.cpp" in device["attributes"]

        result = cli(address, "build", str(write_spec(tmp_path / "spec.yaml", smollm2_dir, assets)), "--wait", "--json",
                     token_file=admin)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout)
        assert report["state"] == "succeeded" and 10 < report["baseline"]["value"] < 60
        (measured,) = report["devices"]
        rows = {r["id"]: r for r in measured["candidates"]}
        assert set(rows) == {"gguf-q4_0", "onnx-int8-per_channel-sym"}
        for row in rows.values():
            assert row["latency_ms"]["p50"] > 0 and row["peak_rss_bytes"] > 50 << 20 and row["size_bytes"] > 50e6
            assert row["quality"]["baseline"] == report["baseline"]["value"]
            assert row["validation"]["top1_agreement"] > 0.5
        assert rows["gguf-q4_0"]["quality"]["delta_pct"] > rows["onnx-int8-per_channel-sym"]["quality"]["delta_pct"]
        chosen = rows[measured["chosen"]]

        again = cli(address, "builds", "get", report["build"], "--json", token_file=admin)
        assert again.returncode == 0 and json.loads(again.stdout)["devices"][0]["chosen"] == measured["chosen"]
        fetched = cli(address, "artifacts", "get", chosen["artifact"], "-o", str(tmp_path / "chosen.bin"),
                      token_file=admin)
        assert fetched.returncode == 0, fetched.stderr
        assert hashlib.sha256((tmp_path / "chosen.bin").read_bytes()).hexdigest() == chosen["artifact"]

        bad = tmp_path / "bad.yaml"
        bad.write_text((tmp_path / "spec.yaml").read_text().replace("quantization:", "quantisation:", 1))
        rejected = cli(address, "build", str(bad), "--wait", token_file=admin)
        assert rejected.returncode == 2 and "did you mean 'quantization'" in rejected.stderr

        unmet = write_spec(tmp_path / "unmet.yaml", smollm2_dir, assets, constraints={"max_size_bytes": 1000},
                           candidates=[{"format": "gguf", "quantization": {"type": "q4_0"}}])
        assert cli(address, "build", str(unmet), "--wait", token_file=admin).returncode == 3    # reuses every stage, then rejects
    finally:
        stop(up)


def test_every_service_in_its_own_process(tmp_path, assets, tiny_model_dir):
    with socket.socket() as probe:              # the coordinator's port is chosen first so workers can point at it
        probe.bind(("127.0.0.1", 0))
        coordinator_port = probe.getsockname()[1]
    coordinator_address = f"127.0.0.1:{coordinator_port}"
    workers, addresses = [], {}
    # Bootstrap: an admin token for the workers, written into the database before the coordinator starts.
    worker_token = tmp_path / "workers.token"
    worker_token.write_text(subprocess.run(
        [sys.executable, "-m", "clients.cli.main", "tokens", "create", "--offline", "--data-dir", str(tmp_path / "data"),
         "--role", "admin", "--name", "standalone workers"], env=ENV, capture_output=True, text=True,
        check=True).stdout.strip())
    for name in ("calibrator", "compressor", "exporter"):
        process, address = start([f"services.{name}.server", "--port", "0", "--coordinator", coordinator_address,
                                  "--cache-dir", str(tmp_path / f"cache-{name}"), "--token-file", str(worker_token)],
                                 tmp_path / f"{name}.log")
        workers.append(process)
        addresses[name] = address
    coordinator, address = start(["services.coordinator.server", "--port", str(coordinator_port), "--data-dir",
                                  str(tmp_path / "data"), *[f"--{k}={v}" for k, v in addresses.items()]],
                                 tmp_path / "coordinator.log")
    token = subprocess.run([sys.executable, "-m", "clients.cli.main", "tokens", "create", "--offline", "--data-dir",
                            str(tmp_path / "data"), "--name", "standalone agent"], env=ENV, capture_output=True,
                           text=True, check=True).stdout.strip()
    agent = subprocess.Popen([sys.executable, "-m", "clients.agent.main", "--coordinator", address, "--cache-dir",
                              str(tmp_path / "agent"), "--label", "device=standalone", "--token", token], env=ENV,
                             stderr=open(tmp_path / "agent.log", "w"))
    client = Client(address, token=(tmp_path / "data" / "admin.token").read_text().strip())
    try:
        spec = spec_file.load(write_spec(tmp_path / "spec.yaml", tiny_model_dir, assets,
                                         targets=[{"selector": {"device": "standalone"}}],
                                         evaluation={"text_file": str(assets / "data" / "eval.txt"), "max_tokens": 256,
                                                     "window_tokens": 128}))
        operation = client.create_build(spec)
        operation = client.wait(operation.name)
        build = client.get_build(build_name(operation.name))
        assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED, build.error.message
        assert build.devices[0].chosen_candidate in {c.id for c in build.candidates}
        # The workers really ran elsewhere: each filled its own cache over gRPC.
        assert any((tmp_path / "cache-compressor" / "blobs").iterdir())
        assert any((tmp_path / "cache-exporter" / "blobs").iterdir())
    finally:
        client.close()
        stop(agent, coordinator, *workers)
