"""Crash recovery with real processes: the coordinator killed with SIGKILL mid-build and restarted on the
same data directory resumes from its last completed stage (finished stages reused, nothing stored twice,
no stale lease); a worker service killed in the middle of its RPC is retried with backoff once it is back.

Every service runs as its own process (`python -m services.<name>.server`); the agent measuring the
candidates runs in a thread of this test, so it outlives the coordinator like a real device would.
"""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clients.python import spec as spec_file
from clients.python.client import Client, build_name
from edgeforge.v1 import coordinator_pb2
from google.longrunning import operations_proto_pb2 as operations_pb2
from shared.store.check import check_store

from tests.conftest import GENERATED     # the generated protos: gen/, or Bazel's (bazel/pytest_main.py)

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN_FILE = "admin.token"          # written by the coordinator's main (services/coordinator/server.py)


# ---------------------------------------------------------------------- processes
class Service:
    """A service process, its log file, and (once `ready`) the address it printed."""

    def __init__(self, name: str, process: subprocess.Popen, log: Path):
        self.name, self.process, self.log, self.address = name, process, log, ""

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def ready(self, timeout_s: float = 120.0) -> "Service":
        """Waits for the "<name> listening on HOST:PORT" line."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.text().splitlines():
                if " listening on " in line:
                    self.address = line.rsplit(" listening on ", 1)[1].strip()
                    return self
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.process.kill()
        pytest.fail(f"{self.name} did not start (exit {self.process.poll()}):\n{self.text()[-3000:]}")

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)          # in case it was left frozen
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def launch(module: str, args: list[str], log: Path) -> Service:
    """The one place that starts a service: `python -m <module> <args>`, output to `log`; call `ready()`.
    (Authentication: the coordinator's main writes <data-dir>/admin.token; workers get --token-file.)"""
    with open(log, "ab") as handle:
        process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, stdout=handle,
                                   stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                  "PYTHONPATH": f"{ROOT}{os.pathsep}{GENERATED}"})
    return Service(module, process, log)


def coordinator(data_dir: Path, log: Path, port: int = 0, workers: dict[str, str] | None = None) -> Service:
    args = ["--data-dir", str(data_dir), "--port", str(port)]
    for name, address in (workers or {}).items():
        args += [f"--{name}", address]
    return launch("services.coordinator.server", args, log).ready()


def worker(name: str, port: int, coordinator_address: str, data_dir: Path, log: Path) -> Service:
    """A standalone worker; not yet ready (start several, then wait for each)."""
    return launch(f"services.{name}.server", ["--port", str(port), "--coordinator", coordinator_address,
                                              "--cache-dir", str(data_dir.parent / f"cache-{name}"),
                                              "--token-file", str(data_dir / ADMIN_TOKEN_FILE)], log)


def admin_client(service: Service, data_dir: Path) -> Client:
    return Client(service.address, token=(data_dir / ADMIN_TOKEN_FILE).read_text().strip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentThread:
    """A real agent (clients/agent) in a thread, labelled device=test-host."""

    def __init__(self, address: str, token: str, cache_dir: Path):
        from clients.agent.main import Agent, AgentConfig
        self.agent = Agent(AgentConfig(address, token=token, labels={"device": "test-host"}, cache_dir=cache_dir,
                                       cache_max_bytes=1 << 30, lease_wait_ms=2000))
        self.thread = threading.Thread(target=self.agent.run_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(timeout=30)


# ---------------------------------------------------------------------- builds
def spec(tiny_model_dir: Path, assets: Path, quantizations: list[str]) -> spec_file.SpecFile:
    return spec_file.parse({
        "name": "crash", "model": {"path": str(tiny_model_dir)},
        "calibration": {"text_file": str(assets / "data" / "calib.txt"), "samples": 2, "sequence_length": 32},
        "evaluation": {"text_file": str(assets / "data" / "eval.txt"), "max_tokens": 128, "window_tokens": 64},
        "targets": [{"selector": {"device": "test-host"}}],
        "candidates": [{"format": "gguf", "quantization": {"type": q}} for q in quantizations],
        "benchmark": {"prompt_tokens": 8, "generation_tokens": 4, "warmup_runs": 1, "timed_runs": 2,
                      "min_duration_ms": 0, "cooldown_ms": 0, "skip_throughput": True},
    }, tiny_model_dir.parent)


def progress_of(client: Client, operation_name: str) -> tuple[operations_pb2.Operation, coordinator_pb2.BuildProgress]:
    operation = client.operations.GetOperation(operations_pb2.GetOperationRequest(name=operation_name), timeout=30)
    progress = coordinator_pb2.BuildProgress()
    operation.metadata.Unpack(progress)
    return operation, progress


def poll_until(client: Client, operation_name: str, predicate, timeout_s: float = 120.0,
               interval_s: float = 0.01) -> coordinator_pb2.BuildProgress:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        operation, progress = progress_of(client, operation_name)
        assert not operation.done, f"the build ended before the kill point: {operation.error.message}"
        if predicate(progress):
            return progress
        time.sleep(interval_s)
    pytest.fail(f"the build never reached the kill point; last progress: {progress.message}")


def finish(client: Client, operation_name: str, timeout_s: float = 180.0) -> operations_pb2.Operation:
    deadline = time.monotonic() + timeout_s
    operation, _ = progress_of(client, operation_name)
    while not operation.done:
        assert time.monotonic() < deadline, "the build did not finish in time"
        operation = client.wait(operation_name, poll_s=2.0)
    return operation


def stage_runs(data_dir: Path, build_id: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"{(data_dir / 'edgeforge.db').resolve().as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT run, stage, key, reused FROM stage_runs WHERE build_id = ? ORDER BY rowid",
                            (build_id,)).fetchall()
    finally:
        conn.close()


def rows(data_dir: Path, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"{(data_dir / 'edgeforge.db').resolve().as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def referenced_artifacts(build: coordinator_pb2.Build) -> set[str]:
    names = {build.spec.model.artifact, build.spec.calibration.dataset, build.spec.evaluation.dataset,
             build.reference_model, build.calibration_stats, build.report_json_artifact, build.report_html_artifact}
    for candidate in build.candidates:
        names |= {candidate.compressed_artifact, candidate.artifact, candidate.transformed_model}
    return {name.removeprefix("artifacts/") for name in names if name}


# ---------------------------------------------------------------------- the tests
@pytest.mark.slow                 # about 45 s on an idle 2-core machine, 100 s under load
def test_coordinator_killed_mid_build_resumes_from_its_last_finished_stage(tmp_path, tiny_model_dir, assets):
    data_dir = tmp_path / "data"
    first = coordinator(data_dir, tmp_path / "coordinator-1.log")
    client = admin_client(first, data_dir)
    agent = AgentThread(first.address, client.create_token("agent", "crash-test agent")[1], tmp_path / "agent")
    second = None
    try:
        operation = client.create_build(spec(tiny_model_dir, assets, ["q4_0", "q8_0"]))
        build_id = operation.name.removeprefix("operations/")
        # The kill point: the second candidate has started, so the import, the baseline and the whole first
        # candidate are finished (memoised) and the rest is not.
        poll_until(client, operation.name, lambda p: p.candidate_id == "gguf-q8_0")
        first.kill()
        client.close()
        before = stage_runs(data_dir, build_id)
        finished = {r["key"]: r["stage"] for r in before if not r["reused"]}
        assert {"import", "evaluate", "export gguf-q4_0", "evaluate gguf-q4_0"} <= set(finished.values()), finished

        second = coordinator(data_dir, tmp_path / "coordinator-2.log", port=first.port)
        client = admin_client(second, data_dir)
        _, progress = progress_of(client, operation.name)
        assert progress.percent >= 15                      # the operation picks up where it was, not at 0
        operation = finish(client, operation.name)
        assert not operation.HasField("error"), operation.error
        build = client.get_build(build_name(operation.name))
        assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED
        assert [c.id for c in build.candidates] == ["gguf-q4_0", "gguf-q8_0"]
        assert all(not c.HasField("error") and c.artifact for c in build.candidates)

        # Resumed from the last finished stage: everything finished before the kill was reused, not redone.
        runs = stage_runs(data_dir, build_id)
        assert {r["run"] for r in runs} == {1, 2}
        reused_now = {r["key"] for r in runs if r["run"] == 2 and r["reused"]}
        redone_now = {r["key"] for r in runs if r["run"] == 2 and not r["reused"]}
        assert set(finished) <= reused_now and not set(finished) & redone_now
        assert redone_now, "the stages after the kill point ran in the resumed run"
        _, progress = progress_of(client, operation.name)
        assert progress.percent == 100 and "resumed after a restart" in progress.message
        assert f"reusing {len(reused_now)} finished stages" in progress.message and "export gguf-q4_0" in progress.message
        assert "reused from before the restart" in second.text()

        # Nothing stored twice, nothing left over: every artifact row is one the build refers to, every upload
        # finished once, every blob has its row and its digest, no temp file of the killed process remains.
        stored = {r["sha256"] for r in rows(data_dir, "SELECT sha256 FROM artifacts")}
        assert stored == referenced_artifacts(build)
        uploads = rows(data_dir, "SELECT sha256, succeeded FROM uploads")
        assert all(u["succeeded"] for u in uploads) and len({u["sha256"] for u in uploads}) == len(uploads)
        report = check_store(data_dir)
        assert report.clean, report.render()
        # The operation's jobs: one per (target, candidate), each measured once, no lease left active.
        jobs = rows(data_dir, "SELECT candidate_id, state FROM jobs WHERE build_id = ?", (build_id,))
        assert sorted(j["candidate_id"] for j in jobs) == sorted(c.id for c in build.candidates)
        assert {j["state"] for j in jobs} == {"SUCCEEDED"}
        assert rows(data_dir, "SELECT * FROM leases WHERE state = 'ACTIVE'") == []
        assert all(entry.HasField("measurement") for entry in build.devices[0].candidates)
    finally:
        agent.stop()
        client.close()
        for service in (first, second):
            if service is not None:
                service.stop()


@pytest.mark.slow                 # four process starts and a restart: 60-120 s on 2 cores
def test_a_worker_killed_mid_rpc_is_retried_after_its_restart(tmp_path, tiny_model_dir, assets):
    data_dir = tmp_path / "data"
    ports = {"calibrator": free_port(), "compressor": free_port(), "exporter": free_port()}
    # This spec never calibrates (RTN only), so no calibrator process is started at its address.
    main = coordinator(data_dir, tmp_path / "coordinator.log",
                       workers={name: f"127.0.0.1:{port}" for name, port in ports.items()})
    services = [main]
    client = admin_client(main, data_dir)
    agent = None
    try:
        compressor = worker("compressor", ports["compressor"], main.address, data_dir, tmp_path / "compressor-1.log")
        services += [compressor, worker("exporter", ports["exporter"], main.address, data_dir, tmp_path / "exporter.log")]
        for service in services[1:]:
            service.ready()
        agent = AgentThread(main.address, client.create_token("agent", "retry-test agent")[1], tmp_path / "agent")
        candidates = ["q4_0", "q8_0"]
        operation = client.create_build(spec(tiny_model_dir, assets, candidates))
        caught = ""
        for quantization in candidates:
            # Freeze the compressor as soon as a Compress is under way; if the coordinator is still waiting on
            # it a moment later, the call is in flight: kill it there. Otherwise let it go and try the next one.
            candidate = f"gguf-{quantization}"
            poll_until(client, operation.name, lambda p: p.message == f"compressing {candidate}", interval_s=0.005)
            os.kill(compressor.process.pid, signal.SIGSTOP)
            time.sleep(0.5)
            if progress_of(client, operation.name)[1].message == f"compressing {candidate}":
                caught = candidate
                compressor.kill()
                break
            os.kill(compressor.process.pid, signal.SIGCONT)
        assert caught, "no Compress call was caught in flight"
        time.sleep(2.0)                                    # down for a while: the coordinator backs off
        services.append(worker("compressor", ports["compressor"], main.address, data_dir,
                               tmp_path / "compressor-2.log").ready())
        operation = finish(client, operation.name)
        assert not operation.HasField("error"), operation.error
        build = client.get_build(build_name(operation.name))
        assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED
        assert all(not c.HasField("error") for c in build.candidates), [c.error.message for c in build.candidates]
        log = main.text()
        assert "worker call failed (UNAVAILABLE" in log and "retrying in" in log
        report = check_store(data_dir)
        assert report.clean, report.render()
    finally:
        if agent is not None:
            agent.stop()
        client.close()
        for service in services:
            service.stop()
