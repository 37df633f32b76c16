"""Metrics and logs (shared/metrics.py, shared/logs.py, services/coordinator/metrics.py) of real processes
on loopback: a coordinator scraped over HTTP after real RPCs, a lease that lapses and a build that fails;
a standalone worker; `edgeforge up --metrics-address 127.0.0.1:0 --log-format json` as a subprocess whose
every stderr line is a JSON object and whose /metrics answers."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeforge.v1 import agent_pb2, agent_pb2_grpc, common_pb2, coordinator_pb2, coordinator_pb2_grpc
from shared import logs
from shared.server import channel

from tests.conftest import GENERATED     # the generated protos: gen/, or Bazel's (bazel/pytest_main.py)

ROOT = Path(__file__).resolve().parents[2]


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of http://127.0.0.1:port/metrics, parsed as Prometheus reads it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def coordinator(tmp_path):
    """A real coordinator (embedded workers, auth on, 2 s leases) serving /metrics on 127.0.0.1:0."""
    from services.coordinator.server import create_server
    server, port, ctx = create_server("127.0.0.1:0", tmp_path / "data", device_wait_s=2.0, lease_ttl_s=2.0,
                                      metrics_address="127.0.0.1:0")
    ctx.address = f"127.0.0.1:{port}"
    yield ctx
    ctx.metrics_endpoint.stop()
    server.stop(0).wait()


def test_a_coordinator_counts_rpcs_lapses_builds_and_reads_its_queue(coordinator, json_logs):
    ctx = coordinator
    assert ctx.metrics_port > 0
    agent_secret = ctx.tokens.create("agent", "metrics test agent")[1]
    with channel(ctx.address, token=ctx.admin_token) as admin, channel(ctx.address) as anonymous, \
            channel(ctx.address, token=agent_secret) as as_agent:
        registry = coordinator_pb2_grpc.DeviceRegistryStub(admin)
        registry.ListDevices(coordinator_pb2.ListDevicesRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as error:
            coordinator_pb2_grpc.DeviceRegistryStub(anonymous).ListDevices(coordinator_pb2.ListDevicesRequest(),
                                                                           timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError):                              # a server stream that fails
            list(coordinator_pb2_grpc.ArtifactStoreStub(admin).ReadArtifact(
                coordinator_pb2.ReadArtifactRequest(name="artifacts/" + "0" * 64), timeout=10))

        gateway = agent_pb2_grpc.AgentGatewayStub(as_agent)
        gateway.RegisterAgent(agent_pb2.RegisterAgentRequest(device_id="dev-1"), timeout=10)
        ctx.scheduler.enqueue("b-x", "c1", "dev-1", agent_pb2.BenchmarkJob(artifact="artifacts/" + "1" * 64))
        ctx.scheduler.enqueue("b-x", "c2", "dev-1", agent_pb2.BenchmarkJob(artifact="artifacts/" + "2" * 64))
        lease = gateway.LeaseJob(agent_pb2.LeaseJobRequest(device="devices/dev-1", wait_ms=0), timeout=10).lease
        before = scrape(ctx.metrics_port)
        assert sample(before, "edgeforge_benchmark_jobs", state="leased") == 1
        assert sample(before, "edgeforge_benchmark_jobs", state="queued") == 1       # the queue depth
        assert sample(before, "edgeforge_lease_lapses_total") == 0
        time.sleep(2.5)                                                 # past the 2 s TTL, no heartbeat
        reply = gateway.Heartbeat(agent_pb2.HeartbeatRequest(device="devices/dev-1", leases=[lease.name]),
                                  timeout=10)
        assert list(reply.cancelled_leases) == [lease.name]

    build = coordinator_pb2.Build(name="builds/b-metrics", state=coordinator_pb2.BUILD_STATE_RUNNING)
    build.spec.model.artifact = "artifacts/" + "3" * 64                # not in the store: the import fails
    build.spec.model.task = common_pb2.MODEL_TASK_CAUSAL_LM
    build.create_time.GetCurrentTime()
    ctx.state.create_build(build, coordinator_pb2.BuildProgress(build=build.name), "", "metrics-test")
    from services.coordinator.servicer import Builds
    Builds(ctx).start("b-metrics")
    deadline = time.monotonic() + 60
    while not ctx.state.load_build("b-metrics")[2]:
        assert time.monotonic() < deadline, "the build did not end"
        time.sleep(0.1)
    assert ctx.state.load_build("b-metrics")[0].state == coordinator_pb2.BUILD_STATE_FAILED

    after = scrape(ctx.metrics_port)
    rpc = "edgeforge_rpc_server_handled_total"
    assert sample(after, rpc, service="edgeforge.v1.DeviceRegistry", method="ListDevices", code="OK") == 1
    assert sample(after, rpc, service="edgeforge.v1.DeviceRegistry", method="ListDevices",
                  code="UNAUTHENTICATED") == 1
    assert sample(after, rpc, service="edgeforge.v1.ArtifactStore", method="ReadArtifact", code="NOT_FOUND") == 1
    assert sample(after, rpc, service="edgeforge.v1.AgentGateway", method="LeaseJob", code="OK") == 1
    assert sample(after, "edgeforge_rpc_server_handling_seconds_count", service="edgeforge.v1.AgentGateway",
                  method="LeaseJob") == 1
    imports = [v for (name, labels), v in after.items() if name == rpc
               and ("method", "ImportModel") in labels and ("code", "OK") not in labels]
    assert sum(imports) >= 1                                            # the embedded compressor refused it
    assert sample(after, "edgeforge_lease_lapses_total") == 1
    assert sample(after, "edgeforge_benchmark_jobs", state="queued") == 2
    assert sample(after, "edgeforge_benchmark_jobs", state="leased") == 0
    assert sample(after, "edgeforge_devices", state="online") == 1
    assert sample(after, "edgeforge_builds", state="failed") == 1
    assert sample(after, "edgeforge_builds_finished_total", state="failed") == 1
    assert sample(after, "edgeforge_build_duration_seconds_count", state="failed") == 1
    assert "process_cpu_seconds_total" in {name for name, _ in after}
    for name, labels in after:                                          # bounded label values only
        assert not any("dev-1" in value or "b-metrics" in value for _, value in labels), (name, labels)

    text = json_logs.getvalue()
    assert ctx.admin_token not in text and agent_secret not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert any(r.get("build") == "builds/b-metrics" and r["level"] == "WARNING" for r in records)
    leased = [r for r in records if r.get("rpc") == "/edgeforge.v1.AgentGateway/LeaseJob"]
    assert leased and all(r["device"] == "devices/dev-1" for r in leased)


def test_a_bad_metrics_address_is_refused_before_serving(tmp_path):
    from services.coordinator.server import create_server
    with pytest.raises(ValueError, match=r"--metrics-address must be HOST:PORT .* got 'localhost'"):
        create_server("127.0.0.1:0", tmp_path / "data", metrics_address="localhost")
    assert not (tmp_path / "data").exists()                             # refused before anything was created


def _read_until(stream, pattern: str, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r} in {seen!r}")


@pytest.mark.slow                  # the local agent detects its runtimes first: ~30 s
def test_edgeforge_up_logs_json_lines_only_and_serves_metrics(tmp_path):
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{GENERATED}", "OMP_NUM_THREADS": "1"}
    env.pop(logs.FORMAT_ENV, None)
    process = subprocess.Popen([sys.executable, "-m", "clients.cli.main", "up", "--port", "0", "--data-dir",
                                str(data), "--metrics-address", "127.0.0.1:0", "--log-format", "json",
                                "--log-level", "debug"], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        started = _read_until(process.stdout, r"listening on (\S+) .*metrics on http://127\.0\.0\.1:(\d+)/metrics",
                              120)
        address, metrics_port = started.group(1), int(started.group(2))
        deadline = time.monotonic() + 120
        while sample(scrape(metrics_port), "edgeforge_devices", state="online") != 1:   # the local agent
            assert time.monotonic() < deadline and process.poll() is None, "the local agent never registered"
            time.sleep(0.5)
        admin = (data / "admin.token").read_text().strip()
        with channel(address, token=admin) as ch:
            coordinator_pb2_grpc.DeviceRegistryStub(ch).ListDevices(coordinator_pb2.ListDevicesRequest(),
                                                                    timeout=10)
        samples = scrape(metrics_port)
        assert sample(samples, "edgeforge_rpc_server_handled_total", service="edgeforge.v1.DeviceRegistry",
                      method="ListDevices", code="OK") == 1
        assert sample(samples, "edgeforge_rpc_server_handled_total", service="edgeforge.v1.AgentGateway",
                      method="RegisterAgent", code="OK") == 1
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-2000:]
    lines = stderr.splitlines()
    records = [json.loads(line) for line in lines]                      # every line: one JSON object
    assert len(records) == len(lines) > 3
    assert {r["service"] for r in records} == {"edgeforge", "agent"}
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r.get("rpc") == "/edgeforge.v1.AgentGateway/RegisterAgent" for r in records)
    for secret_file in (data / "admin.token", *data.glob("agent*.token"), *data.glob("**/*.token")):
        assert secret_file.read_text().strip() not in stderr


def test_a_standalone_worker_serves_its_metrics_and_logs_json(coordinator, tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(coordinator.admin_token)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{GENERATED}", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "services.calibrator.server", "--coordinator",
                                coordinator.address, "--token-file", str(token_file), "--cache-dir",
                                str(tmp_path / "cache"), "--metrics-address", "127.0.0.1:0", "--log-format", "json"],
                               cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        served = json.loads(_read_until(process.stderr, r"serving Prometheus metrics", 120).string)
        metrics_port = int(re.search(r"127\.0\.0\.1:(\d+)/metrics", served["message"]).group(1))
        assert served["service"] == "calibrator"
        port = _read_until(process.stdout, r"calibrator listening on 127\.0\.0\.1:(\d+)", 60).group(1)
        with channel(f"127.0.0.1:{port}") as anonymous:
            with pytest.raises(grpc.RpcError) as error:
                anonymous.unary_unary("/edgeforge.v1.Calibrator/Calibrate")(b"", timeout=10)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        samples = scrape(metrics_port)
        assert sample(samples, "edgeforge_rpc_server_handled_total", service="edgeforge.v1.Calibrator",
                      method="Calibrate", code="UNAUTHENTICATED") == 1
        assert not any(name.startswith("edgeforge_builds") for name, _ in samples)   # the coordinator's only
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    for line in stderr.splitlines():
        json.loads(line)
    assert coordinator.admin_token not in stderr
