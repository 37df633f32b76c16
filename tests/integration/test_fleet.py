"""The device fleet with real agent processes: several devices with different profiles, selection from
their measured numbers, and the faults a fleet meets — an agent killed mid-benchmark, a connection cut
mid-download, a corrupted cache, a duplicate result, unknown and revoked tokens.

The coordinator runs in this process (its state is inspected directly); every agent is a real
`python -m clients.agent.main` process, some pinned to one core with `taskset`, and the faults are
real: SIGKILL to the agent's process group, a TCP proxy that drops the connection after N bytes, a
byte flipped in the agent's cache file.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from clients.python import spec as spec_file
from clients.python.client import build_name
from edgeforge.v1 import agent_pb2, common_pb2, coordinator_pb2
from services.coordinator.state import LEASED

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
QUICK = {"prompt_tokens": 8, "generation_tokens": 4, "warmup_runs": 1, "timed_runs": 3, "min_duration_ms": 0,
         "cooldown_ms": 0, "skip_throughput": True}


class Agents:
    """Starts and stops agent processes; each is its own process group so SIGKILL takes its children too."""

    def __init__(self, tmp_path: Path, coordinator):
        self.tmp_path, self.coordinator = tmp_path, coordinator
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *extra: str, cpus: str | None = None, address: str | None = None,
              token: str | None = None, wait: bool = True) -> subprocess.Popen:
        command = [sys.executable, "-m", "clients.agent.main", "--coordinator", address or self.coordinator.address,
                   "--token", token or self.coordinator.agent_token, "--cache-dir", str(self.tmp_path / name),
                   "--device-id", name, "--label", f"device={name}", *extra]
        if cpus:
            command = ["taskset", "-c", cpus, *command]
        process = subprocess.Popen(command, env=ENV, stderr=open(self.log_path(name), "w"), start_new_session=True)
        self.processes[name] = process
        if wait:
            self.wait_registered(name)
        return process

    def log_path(self, name: str) -> Path:
        return self.tmp_path / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text()

    def wait_registered(self, name: str, timeout_s: float = 60) -> coordinator_pb2.Device:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            devices = [d for d in self.coordinator.list_devices() if d.name == f"devices/{name}"]
            if devices and devices[0].state == coordinator_pb2.DEVICE_STATE_ONLINE:
                return devices[0]
            assert self.processes[name].poll() is None, self.log(name)
            time.sleep(0.2)
        raise AssertionError(f"{name} did not register: {self.log(name)}")

    def kill(self, name: str) -> None:
        os.killpg(self.processes[name].pid, signal.SIGKILL)
        self.processes[name].wait(timeout=30)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def agents(coordinator, tmp_path):
    fleet = Agents(tmp_path, coordinator)
    yield fleet
    fleet.stop_all()


def spec(tiny_model_dir, assets, targets, candidates, **overrides) -> spec_file.SpecFile:
    raw = {"name": "fleet", "model": {"path": str(tiny_model_dir)},
           "calibration": {"text_file": str(assets / "data" / "calib.txt"), "samples": 2, "sequence_length": 32},
           "evaluation": {"text_file": str(assets / "data" / "eval.txt"), "max_tokens": 128, "window_tokens": 64},
           "targets": targets, "candidates": candidates, "benchmark": QUICK}
    raw.update(overrides)
    return spec_file.parse(raw, tiny_model_dir.parent)


def finish(client, operation, timeout_s: float = 600) -> coordinator_pb2.Build:
    deadline = time.monotonic() + timeout_s
    while not operation.done:
        assert time.monotonic() < deadline, "build did not finish in time"
        operation = client.wait(operation.name, poll_s=1.0)
    return client.get_build(build_name(operation.name))


def report_of(client, build) -> dict:
    return json.loads(client.read_text(build.report_json_artifact))


# ---------------------------------------------------------------- several devices, selection
def test_three_devices_with_different_profiles_get_choices_their_numbers_support(coordinator, agents,
                                                                                  tiny_model_dir, assets):
    lock = ("--host-lock", str(agents.tmp_path / "host.lock"))    # three emulated devices, one machine
    agents.start("one-core", *lock, cpus="0")
    agents.start("two-core", *lock, cpus="0,1")
    agents.start("onnx-only", *lock, "--runtimes", "onnxruntime")
    devices = {d.name: d for d in coordinator.list_devices()}
    assert devices["devices/one-core"].attributes["cores"] == "1"
    assert devices["devices/two-core"].attributes["cores"] == "2"
    assert "runtime:llama.cpp" not in devices["devices/onnx-only"].attributes
    assert "--runtimes" in devices["devices/onnx-only"].unavailable_runtimes["llama.cpp"]

    candidates = [{"format": "gguf", "quantization": {"method": "none", "type": "f16"}},
                  {"format": "gguf", "quantization": {"type": "q4_0"}},
                  {"format": "onnx", "quantization": {"method": "none"}}]
    targets = [{"name": "one-core", "selector": {"device": "one-core"}, "constraints": {"max_size_bytes": 6_000_000}},
               {"name": "two-core", "selector": {"device": "two-core"}},
               {"name": "onnx-only", "selector": {"device": "onnx-only"}}]
    build = finish(coordinator, coordinator.create_build(spec(tiny_model_dir, assets, targets, candidates)))
    assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED, build.error.message
    results = {r.target: r for r in build.devices}
    sizes = {c.id: c.size_bytes for c in build.candidates}
    quality = {c.id: c.quality.value for c in build.candidates}

    for name, result in results.items():
        measured = {e.candidate_id: e for e in result.candidates if e.HasField("measurement")}
        # The choice is what the measured numbers and the target's budgets imply: best quality among the
        # measured candidates that meet the budget (ties to the smaller file).
        limit = result.constraints.max_size_bytes if result.constraints.HasField("max_size_bytes") else None
        eligible = [c for c in measured if limit is None or sizes[c] <= limit]
        assert result.chosen_candidate == min(eligible, key=lambda c: (quality[c], sizes[c]))
        threads = {e.measurement.threads for e in measured.values()}
        assert threads == {1 if name == "one-core" else 2}, (name, threads)
        assert all(e.device == f"devices/{name}" for e in measured.values())

    # onnx-only cannot run GGUF: those fail at once with the device's own reason, and ONNX is chosen there.
    onnx_only = {e.candidate_id: e for e in results["onnx-only"].candidates}
    assert results["onnx-only"].chosen_candidate == "onnx-f32"
    assert "no device of target onnx-only can run llama.cpp" in onnx_only["gguf-f16"].error.message
    assert "--runtimes" in onnx_only["gguf-f16"].error.message
    # one-core's 6 MB budget rules out the f16 and fp32 files; two-core has no budget and takes the best.
    assert results["one-core"].chosen_candidate == "gguf-q4_0"
    assert "max_size_bytes" in {e.candidate_id: e for e in results["one-core"].candidates}["gguf-f16"].rejected_by
    assert len({r.chosen_candidate for r in results.values()}) >= 2

    report = report_of(coordinator, build)
    assert [d["target"] for d in report["devices"]] == ["one-core", "two-core", "onnx-only"]
    assert all(d["pareto"] for d in report["devices"])


# ---------------------------------------------------------------- faults
def test_an_agent_killed_mid_benchmark_has_its_job_finished_by_another(coordinator, agents, tiny_model_dir, assets):
    agents.start("alpha", "--label", "pool=bench")
    agents.start("beta", "--label", "pool=bench")
    slow = {**QUICK, "min_duration_ms": 6000}                     # long enough to be killed mid-measurement
    operation = coordinator.create_build(spec(
        tiny_model_dir, assets, [{"name": "bench", "selector": {"pool": "bench"}}],
        [{"format": "gguf", "quantization": {"method": "none", "type": "f16"}}], benchmark=slow))
    state = coordinator.ctx.state
    deadline = time.monotonic() + 300
    holder = None
    while holder is None:
        assert time.monotonic() < deadline, "no agent leased the job"
        build_id = build_name(operation.name).removeprefix("builds/")
        leased = [r for r in state.jobs_of_build(build_id) if r["state"] == LEASED]
        if leased:
            row = state.db.query("SELECT device_id FROM leases WHERE id = ?", (leased[0]["lease_id"],))[0]
            holder = row["device_id"]
        time.sleep(0.2)
    time.sleep(2.0)                                                 # into the measurement
    agents.kill(holder)
    survivor = "beta" if holder == "alpha" else "alpha"
    build = finish(coordinator, operation)
    assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED, build.error.message
    (entry,) = build.devices[0].candidates
    assert entry.HasField("measurement") and entry.device == f"devices/{survivor}"
    assert entry.attempts == 2 and build.devices[0].chosen_candidate == "gguf-f16"
    assert min(entry.measurement.latency.samples_ms) > 0


def _measuring_children(session: int) -> list[int]:
    """Pids of measurement processes in the agent's session (its process group's children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                if b"clients.agent.measure" in cmdline and os.getsid(int(entry.name)) == session:
                    found.append(int(entry.name))
            except (OSError, ProcessLookupError):
                continue
    return found


def test_cancelling_a_build_cancels_its_lease_and_stops_the_measurement(coordinator, agents, tiny_model_dir,
                                                                        assets):
    process = agents.start("cancel")
    operation = coordinator.create_build(spec(
        tiny_model_dir, assets, [{"name": "cancel", "selector": {"device": "cancel"}}],
        [{"format": "gguf", "quantization": {"method": "none", "type": "f16"}}],
        benchmark={**QUICK, "min_duration_ms": 120_000}))
    deadline = time.monotonic() + 300
    while not _measuring_children(process.pid):
        assert time.monotonic() < deadline, agents.log("cancel")
        time.sleep(0.2)
    coordinator.cancel(operation.name)
    build = finish(coordinator, operation)
    assert build.state == coordinator_pb2.BUILD_STATE_CANCELLED
    deadline = time.monotonic() + 30
    while _measuring_children(process.pid) or "abandoned" not in agents.log("cancel"):
        assert time.monotonic() < deadline, agents.log("cancel")
        time.sleep(0.2)
    assert "was cancelled or lapsed; abandoning it" in agents.log("cancel")
    (row,) = coordinator.ctx.state.jobs_of_build(build.name.removeprefix("builds/"))
    assert row["state"] == "CANCELLED"
    assert process.poll() is None                                   # the agent itself carries on


class CuttingProxy:
    """A loopback TCP proxy that drops every connection once, after `cut_after` bytes flowed back to the
    client in total; later connections pass untouched."""

    def __init__(self, target_port: int, cut_after: int):
        self.target_port, self.cut_after = target_port, cut_after
        self.downstream_bytes, self.cuts = 0, 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._connections += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, downstream: bool) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if downstream:
                    with self._lock:
                        self.downstream_bytes += len(data)
                        cut = self.cuts == 0 and self.downstream_bytes >= self.cut_after
                        if cut:
                            self.cuts = 1
                    if cut:
                        self._cut_all()
                        return
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass

    def _cut_all(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for s in connections:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self._server.close()
        self._cut_all()


def test_a_cut_download_resumes_and_a_corrupted_cache_is_fetched_again(coordinator, agents, tiny_model_dir, assets):
    port = int(coordinator.address.rsplit(":", 1)[1])
    candidates = [{"format": "gguf", "quantization": {"method": "none", "type": "f32"}}]
    targets = [{"name": "proxied", "selector": {"device": "proxied"}}]
    proxy = CuttingProxy(port, cut_after=4 << 20)                  # mid-way through a ~13 MB file
    try:
        agents.start("proxied", address=f"127.0.0.1:{proxy.port}")
        build = finish(coordinator, coordinator.create_build(spec(tiny_model_dir, assets, targets, candidates)))
        assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED, build.error.message
        (candidate,) = build.candidates
        (entry,) = build.devices[0].candidates
        assert entry.HasField("measurement"), entry.error.message
        assert proxy.cuts == 1
        log = agents.log("proxied")
        assert "download of" in log and "broke at byte" in log and "resuming" in log
        resumed_at = int(log.split("resuming ")[1].split(" at byte ")[1].split()[0])
        assert 0 < resumed_at < candidate.size_bytes
        # Resumed, not restarted: the bytes that came through the proxy are about one file, not two.
        assert proxy.downstream_bytes < 1.5 * candidate.size_bytes

        sha = candidate.artifact.removeprefix("artifacts/")
        cached = Path(agents.tmp_path / "proxied" / "artifacts" / sha)
        data = bytearray(cached.read_bytes())
        data[len(data) // 2] ^= 0xFF                               # one flipped bit on the device's disk
        cached.write_bytes(bytes(data))
        again = finish(coordinator, coordinator.create_build(spec(tiny_model_dir, assets, targets, candidates,
                                                                  name="fleet-again")))
        assert again.state == coordinator_pb2.BUILD_STATE_SUCCEEDED, again.error.message
        assert again.devices[0].candidates[0].HasField("measurement")
        assert "does not hash to its name; fetching it again" in agents.log("proxied")
        from clients.agent.cache import sha256_file
        assert sha256_file(cached) == sha
    finally:
        proxy.close()


def test_a_duplicate_result_is_ignored_and_tokens_are_checked(coordinator, agents, tiny_model_dir, assets):
    agents.start("dup")
    build = finish(coordinator, coordinator.create_build(spec(
        tiny_model_dir, assets, [{"name": "dup", "selector": {"device": "dup"}}],
        [{"format": "gguf", "quantization": {"type": "q8_0"}}])))
    assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED, build.error.message
    (row,) = coordinator.ctx.state.jobs_of_build(build.name.removeprefix("builds/"))
    before = build.devices[0].candidates[0].measurement
    forged = common_pb2.Measurement(latency=common_pb2.LatencyStats(p90_ms=1.0, samples_ms=[1.0]))
    response = coordinator.agents.ReportResult(agent_pb2.ReportResultRequest(lease=f"leases/{row['lease_id']}",
                                                                            measurement=forged),
                                               metadata=coordinator.agent_metadata)
    assert response.accepted is False
    (after,) = coordinator.ctx.state.jobs_of_build(build.name.removeprefix("builds/"))
    assert common_pb2.Measurement.FromString(after["outcome"]) == before

    # An unknown token: the agent process is refused and never registers.
    agents.start("stranger", token="ef_" + "z" * 43, wait=False)
    deadline = time.monotonic() + 30
    while "refused" not in agents.log("stranger") and "UNAUTHENTICATED" not in agents.log("stranger"):
        assert time.monotonic() < deadline, agents.log("stranger")
        time.sleep(0.2)
    assert "devices/stranger" not in {d.name for d in coordinator.list_devices()}
    assert "unknown bearer token" in agents.log("stranger")

    # A revoked token: the running agent's very next call is refused, and it goes offline.
    token, secret = coordinator.ctx.tokens.create("agent", "to be revoked")
    agents.start("revoked", token=secret)
    coordinator.ctx.tokens.revoke(token.id)
    deadline = time.monotonic() + 30
    while "was revoked" not in agents.log("revoked"):
        assert time.monotonic() < deadline, agents.log("revoked")
        time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as error:
        coordinator.agents.Heartbeat(agent_pb2.HeartbeatRequest(device="devices/revoked"),
                                     metadata=(("authorization", f"Bearer {secret}"),))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_adb_host_without_phones_registers_none_and_keeps_serving(coordinator, agents):
    """The real Debian adb with no phone attached: the agent reports no devices, cleanly, and keeps
    watching (a phone plugged in later would register)."""
    import shutil
    if shutil.which("adb") is None:
        pytest.skip("Debian's adb is not installed (make setup installs it)")
    port = 15037 + os.getpid() % 1000                 # its own adb server, never a developer's on 5037
    env_port = {"ANDROID_ADB_SERVER_PORT": str(port)}
    process = subprocess.Popen([sys.executable, "-m", "clients.agent.main", "--coordinator", coordinator.address,
                                "--token", coordinator.agent_token, "--cache-dir", str(agents.tmp_path / "adb-host"),
                                "--drivers", "adb"], env={**ENV, **env_port},
                               stderr=open(agents.log_path("adb-host"), "w"), start_new_session=True)
    agents.processes["adb-host"] = process
    try:
        deadline = time.monotonic() + 60
        while "adb: 0 phone(s) ready" not in agents.log("adb-host"):
            assert process.poll() is None and time.monotonic() < deadline, agents.log("adb-host")
            time.sleep(0.2)
        time.sleep(1.0)
        assert process.poll() is None
        assert coordinator.list_devices() == []
        assert "Traceback" not in agents.log("adb-host")
    finally:
        subprocess.run(["adb", "-P", str(port), "kill-server"], capture_output=True, timeout=30)
