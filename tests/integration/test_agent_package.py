"""The agent as a device installs it: the wheel alone in a fresh virtualenv (grpcio, protobuf,
googleapis-common-protos, numpy and the onnxruntime extra from the package index — no monorepo on
the path), whose `edgeforge-agent` command registers with a real coordinator, fetches, measures and
reports a real ONNX job."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients.python import spec as spec_file
from clients.python.client import build_name
from edgeforge.v1 import coordinator_pb2

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_alone_and_its_command_measures_a_job(coordinator, tmp_path, tiny_model_dir, assets):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO / "clients" / "agent")], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("edgeforge_agent-*-py3-none-any.whl")
    subprocess.run(["rm", "-rf", str(REPO / "clients" / "agent" / "build")], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                              f"{wheel}[onnxruntime]"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    version = subprocess.run([str(venv / "bin" / "edgeforge-agent"), "--version"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, check=True)
    assert version.stdout.startswith("edgeforge-agent ")
    # Nothing of the monorepo is importable, or imported, in the device's environment.
    isolated = subprocess.run([str(venv / "bin" / "python"), "-c",
                               "import sys, importlib.util, edgeforge_agent.main, edgeforge_agent.cache\n"
                               "assert importlib.util.find_spec('shared') is None\n"
                               "assert importlib.util.find_spec('services') is None\n"
                               "print(sorted({m.split('.')[0] for m in sys.modules} & {'shared', 'services', 'clients',"
                               " 'torch'}))"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert isolated.returncode == 0 and isolated.stdout.strip() == "[]", isolated.stderr

    log = tmp_path / "agent.log"
    agent = subprocess.Popen([str(venv / "bin" / "edgeforge-agent"), "--coordinator", coordinator.address,
                              "--token", coordinator.agent_token, "--cache-dir", str(tmp_path / "cache"),
                              "--device-id", "wheel", "--label", "device=wheel"],
                             env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, stderr=open(log, "w"))
    try:
        deadline = time.monotonic() + 60
        while "devices/wheel" not in {d.name for d in coordinator.list_devices()}:
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        device = coordinator.devices.GetDevice(coordinator_pb2.GetDeviceRequest(name="devices/wheel"))
        assert "runtime:onnxruntime" in device.attributes and "runtime:llama.cpp" not in device.attributes
        assert "not installed" in device.unavailable_runtimes["llama.cpp"]
        raw = {"name": "wheel", "model": {"path": str(tiny_model_dir)},
               "calibration": {"text_file": str(assets / "data" / "calib.txt"), "samples": 2, "sequence_length": 32},
               "evaluation": {"text_file": str(assets / "data" / "eval.txt"), "max_tokens": 128, "window_tokens": 64},
               "targets": [{"name": "wheel", "selector": {"device": "wheel"}}],
               "candidates": [{"format": "onnx", "quantization": {"method": "none"}}],
               "benchmark": {"prompt_tokens": 8, "generation_tokens": 4, "timed_runs": 3, "min_duration_ms": 0,
                             "cooldown_ms": 0, "throughput_prompt_tokens": [16], "throughput_generation_tokens": 8,
                             "throughput_runs": 2}}
        operation = coordinator.create_build(spec_file.parse(raw, tiny_model_dir.parent))
        while not operation.done:
            operation = coordinator.wait(operation.name, poll_s=1.0)
        build = coordinator.get_build(build_name(operation.name))
        assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED, build.error.message
        (entry,) = build.devices[0].candidates
        assert entry.HasField("measurement"), f"{entry.error.message}\n{log.read_text()}"
        measurement = entry.measurement
        assert measurement.runtime == "onnxruntime" and "onnxruntime" in measurement.runtime_versions
        assert len(measurement.latency.samples_ms) >= 3 and measurement.peak_rss_bytes > 0
        assert {t.test for t in measurement.throughput} == {"pp16", "tg8"}
    finally:
        agent.terminate()
        agent.wait(timeout=30)
