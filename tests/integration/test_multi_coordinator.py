"""Two coordinator processes on one database and one blob store (services/coordinator/claims.py).

Every service is a real process (`python -m services.<name>.server`) on loopback; the coordinators share a
SQLite file and a blob directory, or a real PostgreSQL server and a real S3 server (`weed mini`,
tests/backends/). The standalone workers know both coordinators; the agent that measures the candidates
runs in a thread of this test and is connected to coordinator B only.

- A build submitted while both are live runs on exactly one of them; an agent of B measures what A queued,
  a client of B sees A's build finish, and B cancels a build that A runs.
- Coordinator A killed with SIGKILL mid-build: B takes the build over once A's claim lapses and finishes it,
  reusing every stage A finished; no stage ran twice.
- The whole deployment: two coordinators, two compressor replicas, PostgreSQL and S3; one compressor and
  then one coordinator are killed during the build, which still succeeds.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import duration_pb2
from test_crash_recovery import AgentThread, Service, free_port, launch, poll_until, progress_of

from clients.python import spec as spec_file
from clients.python.client import Client, build_name
from edgeforge.v1 import coordinator_pb2
from services.coordinator.state import CoordinatorState
from shared.store.database import open_database

pytestmark = pytest.mark.slow
CLAIM_TTL_S = 3.0             # a dead coordinator's builds are taken over within about 4 s
ADMIN_TOKEN_FILE = "admin.token"


@pytest.fixture(params=["sqlite-files", "postgresql-s3"])
def storage(request, tmp_path) -> dict[str, str]:
    """The coordinators' shared --database and --blobs."""
    if request.param == "sqlite-files":
        return {"database": str(tmp_path / "shared" / "edgeforge.db"), "blobs": str(tmp_path / "shared" / "blobs")}
    return {"database": request.getfixturevalue("postgres_url"), "blobs": request.getfixturevalue("s3_url")}


class Deployment:
    """Coordinators "a" and "b" (each with its own --data-dir) on shared storage, with standalone workers
    that know both. Workers' ports are chosen first, since the coordinators are told them at start."""

    def __init__(self, tmp_path: Path, storage: dict[str, str], compressors: int = 1):
        self.tmp_path, self.storage = tmp_path, storage
        self.ports = {"calibrator": [free_port()], "compressor": [free_port() for _ in range(compressors)],
                      "exporter": [free_port()]}
        self.services: list[Service] = []
        self.coordinators = {name: self.coordinator(name) for name in ("a", "b")}
        both = ",".join(c.address for c in self.coordinators.values())
        # RTN-only specs never calibrate: no calibrator process listens at its address.
        self.workers = [self.worker("compressor", port, both, index) for index, port in
                        enumerate(self.ports["compressor"])] + [self.worker("exporter", self.ports["exporter"][0], both)]
        for service in self.workers:
            service.ready()
        self.clients: list[Client] = []

    def coordinator(self, name: str) -> Service:
        args = ["--data-dir", str(self.data_dir(name)), "--port", "0", "--coordinator-id", name,
                "--claim-ttl-s", str(CLAIM_TTL_S), "--database", self.storage["database"],
                "--blobs", self.storage["blobs"]]
        for role, ports in self.ports.items():
            args += [f"--{role}", ",".join(f"127.0.0.1:{port}" for port in ports)]
        service = launch("services.coordinator.server", args, self.tmp_path / f"coordinator-{name}.log").ready()
        self.services.append(service)
        return service

    def worker(self, role: str, port: int, coordinators: str, index: int = 0) -> Service:
        service = launch(f"services.{role}.server",
                         ["--port", str(port), "--coordinator", coordinators,
                          "--cache-dir", str(self.tmp_path / f"cache-{role}-{index}"),
                          "--token-file", str(self.data_dir("a") / ADMIN_TOKEN_FILE)],
                         self.tmp_path / f"{role}-{index}.log")
        self.services.append(service)
        return service

    def replica_called(self, coordinator: Service, method: str, timeout_s: float = 120.0) -> Service:
        """The worker replica `coordinator` sends its first `method` call to, as soon as its log names it
        (services/coordinator/workers.py logs each call's replica before making it)."""
        by_address = {f"127.0.0.1:{port}": service for service, port in
                      zip(self.workers, self.ports["compressor"] + self.ports["exporter"])}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in coordinator.log.read_text().splitlines():
                head, _, address = line.partition(f"{method} on ")
                if address:
                    return by_address[address.split()[1]]          # "compressor 127.0.0.1:PORT [build=…]"
            time.sleep(0.002)
        raise AssertionError(f"{coordinator.name} made no {method} call within {timeout_s:.0f} s")

    def data_dir(self, name: str) -> Path:
        return self.tmp_path / f"data-{name}"

    def client(self, name: str) -> Client:
        """An admin client of coordinator `name`, with that coordinator's own admin token."""
        token = (self.data_dir(name) / ADMIN_TOKEN_FILE).read_text().strip()
        client = Client(self.coordinators[name].address, token=token)
        self.clients.append(client)
        return client

    def stage_runs(self, build_id: str) -> list[dict]:
        db = open_database(self.storage["database"])
        try:
            return CoordinatorState(db).stage_runs(build_id)
        finally:
            db.close()

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for service in self.services:
            service.stop()


@pytest.fixture
def deployment(tmp_path, storage):
    running = Deployment(tmp_path, storage)
    yield running
    running.close()


def build_spec(tiny_model_dir: Path, assets: Path, quantizations: list[str],
               selector: dict[str, str] | None = None) -> spec_file.SpecFile:
    return spec_file.parse({
        "name": "two-coordinators", "model": {"path": str(tiny_model_dir)},
        "calibration": {"text_file": str(assets / "data" / "calib.txt"), "samples": 2, "sequence_length": 32},
        "evaluation": {"text_file": str(assets / "data" / "eval.txt"), "max_tokens": 128, "window_tokens": 64},
        "targets": [{"selector": selector or {"device": "test-host"}}],
        "candidates": [{"format": "gguf", "quantization": {"type": q}} for q in quantizations],
        "benchmark": {"prompt_tokens": 8, "generation_tokens": 4, "warmup_runs": 1, "timed_runs": 2,
                      "min_duration_ms": 0, "cooldown_ms": 0, "skip_throughput": True},
    }, tiny_model_dir.parent)


def wait_operation(client: Client, name: str, timeout_s: float = 300.0) -> operations_pb2.Operation:
    """One WaitOperation call: it must return when the build ends, wherever the build runs."""
    request = operations_pb2.WaitOperationRequest(name=name, timeout=duration_pb2.Duration(seconds=int(timeout_s)))
    return client.operations.WaitOperation(request, timeout=timeout_s + 30)


def ran_once_each(runs: list[dict]) -> dict[str, dict]:
    """The stages that ran (not reused), by memo key; fails when a key ran twice."""
    ran = [r for r in runs if not r["reused"]]
    keys = [r["key"] for r in ran]
    assert len(keys) == len(set(keys)), f"a stage ran twice: {[(r['stage'], r['coordinator']) for r in ran]}"
    return {r["key"]: r for r in ran}


def assert_measured_by_the_agent(build: coordinator_pb2.Build) -> None:
    assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED, build.error
    assert all(not c.HasField("error") and c.artifact for c in build.candidates), [c.error for c in build.candidates]
    assert all(entry.HasField("measurement") for entry in build.devices[0].candidates)


# ---------------------------------------------------------------------- the tests
def test_a_build_runs_on_exactly_one_of_two_live_coordinators(deployment, tmp_path, tiny_model_dir, assets):
    a, b = deployment.client("a"), deployment.client("b")
    assert Client(b.address, token=(deployment.data_dir("a") / ADMIN_TOKEN_FILE).read_text().strip()) \
        .list_builds() == []                      # each coordinator's admin token is good on the other
    agent = AgentThread(b.address, b.create_token("agent", "agent of b")[1], tmp_path / "agent")
    try:
        operation = a.create_build(build_spec(tiny_model_dir, assets, ["q4_0"]))
        build_id = operation.name.removeprefix("operations/")
        done = wait_operation(b, operation.name)   # b learns from the database that a finished it
        assert done.done and not done.HasField("error"), done.error
        build = b.get_build(build_name(operation.name))
        assert_measured_by_the_agent(build)        # b's agent measured what a queued; a saw the results
        runs = deployment.stage_runs(build_id)
        ran_once_each(runs)
        assert {(r["run"], r["coordinator"]) for r in runs} == {(1, "a")}
        log = deployment.coordinators["b"].text()
        assert f"resuming builds/{build_id}" not in log and f"took over builds/{build_id}" not in log

        # A build run by b, cancelled through a: it waits for a device that never comes, then ends cancelled.
        operation = b.create_build(build_spec(tiny_model_dir, assets, ["q4_0"], selector={"device": "nowhere"}))
        poll_until(a, operation.name, lambda p: p.message.startswith("waiting for a device"))
        a.cancel(operation.name)
        cancelled = wait_operation(a, operation.name, timeout_s=60)
        assert cancelled.done and cancelled.error.code == grpc.StatusCode.CANCELLED.value[0], cancelled.error
        runs = deployment.stage_runs(operation.name.removeprefix("operations/"))
        assert {r["coordinator"] for r in runs} == {"b"}
    finally:
        agent.stop()


def test_a_coordinator_killed_mid_build_is_finished_by_the_other(deployment, tmp_path, tiny_model_dir, assets):
    a, b = deployment.client("a"), deployment.client("b")
    agent = AgentThread(b.address, b.create_token("agent", "agent of b")[1], tmp_path / "agent")
    try:
        operation = a.create_build(build_spec(tiny_model_dir, assets, ["q4_0", "q8_0"]))
        build_id = operation.name.removeprefix("operations/")
        # The kill point: the second candidate has started, so the first one's stages are finished.
        poll_until(b, operation.name, lambda p: p.candidate_id == "gguf-q8_0")
        deployment.coordinators["a"].kill()
        killed = time.monotonic()
        before = ran_once_each(deployment.stage_runs(build_id))
        assert {r["coordinator"] for r in before.values()} == {"a"}
        assert {"import", "export gguf-q4_0", "evaluate gguf-q4_0"} <= {r["stage"] for r in before.values()}

        done = wait_operation(b, operation.name)
        assert done.done and not done.HasField("error"), done.error
        assert_measured_by_the_agent(b.get_build(build_name(operation.name)))
        log = deployment.coordinators["b"].text()
        assert f"took over builds/{build_id} from coordinator a" in log
        assert time.monotonic() - killed < 300

        runs = deployment.stage_runs(build_id)
        ran = ran_once_each(runs)                  # nothing ran twice, not even across the takeover
        assert {(r["run"], r["coordinator"]) for r in runs} == {(1, "a"), (2, "b")}
        reused_by_b = {r["key"] for r in runs if r["coordinator"] == "b" and r["reused"]}
        assert set(before) <= reused_by_b          # b reused every stage a had finished
        assert {r["coordinator"] for key, r in ran.items() if key not in before} == {"b"}
        _, progress = progress_of(b, operation.name)
        assert progress.percent == 100 and "resumed" in progress.message
    finally:
        agent.stop()


def test_the_whole_deployment_survives_losing_a_compressor_and_a_coordinator(tmp_path, postgres_url, s3_url,
                                                                             tiny_model_dir, assets):
    """Two coordinators, two compressor replicas, PostgreSQL and S3, every one a process on loopback: one
    compressor is killed while the first candidate is being compressed, coordinator a when the second
    candidate starts. The build still succeeds, measured by an agent that followed the coordinators' address
    list from a to b, and no stage ran twice."""
    deployment = Deployment(tmp_path, {"database": postgres_url, "blobs": s3_url}, compressors=2)
    try:
        a, b = deployment.client("a"), deployment.client("b")
        # The agent knows both coordinators as one gRPC target (docs/DEPLOY.md): it talks to a, the first, until
        # a dies, then to b — its device, leases and reports live in the shared database.
        both = "ipv4:" + ",".join(c.address for c in deployment.coordinators.values())
        agent = AgentThread(both, b.create_token("agent", "agent of both")[1], tmp_path / "agent")
        try:
            operation = a.create_build(build_spec(tiny_model_dir, assets, ["q4_0", "q8_0"]))
            build_id = operation.name.removeprefix("operations/")
            # The replica coordinator a sends the first Compress to is frozen as soon as a names it, then killed:
            # the call is in flight on it when it dies, and a repeats it on the other replica.
            busy = deployment.replica_called(deployment.coordinators["a"], "Compress")
            os.kill(busy.process.pid, signal.SIGSTOP)
            busy.kill()
            poll_until(b, operation.name, lambda p: p.candidate_id == "gguf-q8_0")
            deployment.coordinators["a"].kill()
            before = ran_once_each(deployment.stage_runs(build_id))
            assert "compress gguf-q4_0" in {r["stage"] for r in before.values()}

            done = wait_operation(b, operation.name)
            assert done.done and not done.HasField("error"), done.error
            assert_measured_by_the_agent(b.get_build(build_name(operation.name)))
            runs = deployment.stage_runs(build_id)
            ran = ran_once_each(runs)
            assert {"compress gguf-q4_0", "compress gguf-q8_0"} <= {r["stage"] for r in ran.values()}
            assert f"Compress on compressor {busy.address}" in deployment.coordinators["a"].log.read_text()
            assert "retrying at once on" in deployment.coordinators["a"].log.read_text()
            assert {(r["run"], r["coordinator"]) for r in runs} == {(1, "a"), (2, "b")}
            assert set(before) <= {r["key"] for r in runs if r["coordinator"] == "b" and r["reused"]}
        finally:
            agent.stop()
    finally:
        deployment.close()
