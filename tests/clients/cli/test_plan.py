"""`edgeforge plan` end to end: the real CLI in a subprocess, offline and against a real coordinator with a
registered agent (tests/integration/conftest.py's fixtures), a model from the store, and bad input."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def edgeforge(*args: str, address: str | None = None, token: str | None = None) -> subprocess.CompletedProcess:
    root = ["--address", address or f"127.0.0.1:{_closed_port()}"] + (["--token", token] if token else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGEFORGE_TOKEN": "", "EDGEFORGE_TOKEN_FILE": ""}
    return subprocess.run([sys.executable, "-m", "clients.cli.main", *root, "plan", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_params_only_json_offline_falls_back_to_the_catalogue():
    """No coordinator: one stderr line, then the whole plan against the catalogue; 7e9 fp16 = 13.04 GiB."""
    result = edgeforge("--params", "7e9", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1 and "catalogue only" in result.stderr
    document = json.loads(result.stdout)
    memory = {row["recipe"]: row for row in document["memory"]}
    assert memory["f16"]["weights_bytes"] == 14 * 10**9 and memory["f16"]["weights_gib"] == 13.039
    assert memory["q8_0"]["bits_per_weight"] == 8.5
    names = [device["name"] for device in document["devices"]]
    assert {"A100 80GB SXM", "GeForce RTX 4090", "Raspberry Pi 5 8GB", "phone, 8 GB"} <= set(names)
    a100 = document["devices"][names.index("A100 80GB SXM")]
    decode = a100["roofline"]["f16"]["decode"]
    assert decode["bound"] == "memory" and decode["intensity_flops_per_byte"] < 1.5     # 7B decode, batch 1
    assert a100["recommendation"]["candidate_id"] == "gguf-q8_0"
    assert any("Llama-2-7B" in note for note in document["notes"])                     # the assumed shape, said


def test_real_gguf_by_path_text_output():
    from shared.assets import smollm2_gguf
    result = edgeforge(str(smollm2_gguf()), "--device", "raspberry-pi-5-8gb", "--device", "rtx-4090", "--offline")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""                                       # --offline: nothing to say about a coordinator
    assert "0.135B parameters, 30 layers, d=576, 9 heads (3 KV) × 64" in result.stdout
    for section in ("memory (GiB", "fit (", "roofline (", "recommendation ("):
        assert section in result.stdout
    assert "catalogue: Raspberry Pi 5 8GB" in result.stdout


@pytest.mark.parametrize("args, flag", [
    (["--params", "abc"], "--params"), (["--params", "0"], "--params"), (["--params", "7e9", "--context", "0"],
                                                                         "--context"),
    (["--params", "7e9", "--recipe", "q3_x"], "--recipe"), (["--params", "7e9", "--device", "nokia-3310"], "--device"),
    (["--params", "7e9", "--kv-dtype", "int3"], "--kv-dtype"),
    (["--params", "7e9", "--efficiency", "2"], "--efficiency"),
    (["--params", "7e9", "--heads", "8", "--kv-heads", "16"], "--kv-heads"), ([], "MODEL"),
    (["/definitely/not/here.gguf"], "MODEL"), (["--params", "7e9", "--group-size", "128"], "--bits")])
def test_bad_input_exits_2_naming_the_field(args, flag):
    result = edgeforge(*args, "--offline")
    assert result.returncode == 2, result.stdout
    assert flag in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_registered_agent_is_planned_with_its_measurements(coordinator, agent):   # noqa: F811
    """A real coordinator and agent: the agent's device shows up in the fit table, with the numbers it measured."""
    registered = coordinator.list_devices()
    assert registered
    name = registered[0].name.removeprefix("devices/")
    measured = registered[0].attributes["mem_bandwidth_gbps"]
    result = edgeforge("--params", "135M", "--json", address=coordinator.address, token=coordinator.admin_token)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    devices = {device["name"]: device for device in json.loads(result.stdout)["devices"]}
    assert devices[name]["basis"].startswith(f"measured by the agent: {float(measured):.1f} GB/s")
    assert devices[name]["fit"]["q8_0"]["verdict"] == "fits"
    assert "A100 80GB SXM" in devices                                # the catalogue is still there
    only = edgeforge("--params", "135M", "--device", name, address=coordinator.address, token=coordinator.admin_token)
    assert only.returncode == 0, only.stderr
    assert name in only.stdout and "A100" not in only.stdout


def test_a_model_in_the_store_is_downloaded_and_planned(coordinator, tiny_model_dir):   # noqa: F811
    from shared.planner import ModelShape
    artifact = coordinator.upload_model(tiny_model_dir)
    result = edgeforge(artifact.name, "--json", address=coordinator.address, token=coordinator.admin_token)
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)["model"]
    assert model["parameters"] == ModelShape.from_path(tiny_model_dir).parameters
    assert model["source"].endswith("(bundle)")
    missing = edgeforge("artifacts/" + "0" * 64, address=coordinator.address, token=coordinator.admin_token)
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr
