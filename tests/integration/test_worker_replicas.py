"""Worker replicas for real (services/coordinator/workers.py, shared/failover.py): least-loaded dispatch
over two standalone compressor processes, health checks that skip a replica until it comes up, a
replica killed with SIGKILL in the middle of a call (the call finishes on the other, with the same
result), the typed error when no replica is reachable, and a standalone worker that outlives the
first of its two coordinators.

The coordinators run in this process (their own artifact store and token service); the compressors
are real `python -m services.compressor.server` processes fetching artifacts from them over gRPC.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients.python.client import Client
from edgeforge.v1 import common_pb2, compressor_pb2, compressor_pb2_grpc
from services.coordinator.workers import DOWN, UP, RetryPolicy, Workers
from shared.errors import Unavailable
from shared.server import channel

ROOT = Path(__file__).resolve().parents[2]
Q = common_pb2.QuantizationConfig
RTN = common_pb2.QUANT_METHOD_RTN


# ---------------------------------------------------------------------- processes and servers
class Compressor:
    """A standalone compressor process; `address` once it printed "listening on"."""

    def __init__(self, coordinators: list[str], token_file: Path, cache_dir: Path, log: Path, port: int = 0):
        self.cache_dir, self.log = cache_dir, log
        with open(log, "ab") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.compressor.server", "--port", str(port), "--coordinator",
                 ",".join(coordinators), "--cache-dir", str(cache_dir), "--token-file", str(token_file)],
                cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}"})
        deadline = time.monotonic() + 180
        while " listening on " not in self.text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the compressor did not start:\n{self.text()[-3000:]}")
            time.sleep(0.1)
        self.address = self.text().split(" listening on ", 1)[1].split()[0]

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def fetched(self) -> bool:
        """Whether it downloaded any artifact into its cache (it really ran a call)."""
        blobs = self.cache_dir / "blobs"
        return blobs.is_dir() and any(blobs.iterdir())

    def signal(self, number: int) -> None:
        os.kill(self.process.pid, number)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)                 # in case it was left frozen
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_coordinator(data_dir: Path):
    from services.coordinator.server import create_server
    server, port, ctx = create_server("127.0.0.1:0", data_dir, device_wait_s=2.0)
    return server, f"127.0.0.1:{port}", ctx


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting until {what}")
        time.sleep(0.05)


def states(workers: Workers) -> dict[str, object]:
    return {replica.address: replica for replica in workers.snapshot() if replica.role == "compressor"}


def compress(model: str, gguf_type: str = "q4_0") -> compressor_pb2.CompressRequest:
    return compressor_pb2.CompressRequest(model=model, quantization=Q(method=RTN, gguf_type=gguf_type))


def replicas_workers(coordinator, addresses: list[str], **options) -> Workers:
    """A Workers whose compressor role is `addresses` (the other roles point at the embedded services)."""
    return Workers(coordinator.address, addresses, coordinator.address, token=coordinator.admin_token,
                   timeout_s=300, **options)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory, tiny_model_dir):
    """A coordinator with the tiny model imported (`.model`), and its admin token in `.token_file`."""
    data_dir = tmp_path_factory.mktemp("replicas") / "data"
    server, address, ctx = start_coordinator(data_dir)
    client = Client(address, token=ctx.admin_token)
    client.address, client.admin_token, client.token_file = address, ctx.admin_token, data_dir / "admin.token"
    source = client.upload_model(tiny_model_dir)
    stub = compressor_pb2_grpc.CompressorStub(client.channel)
    client.model = stub.ImportModel(compressor_pb2.ImportModelRequest(source=source.name), timeout=300).model.name
    yield client
    client.close()
    server.stop(0).wait()


@pytest.fixture(scope="module")
def pair(coordinator, tmp_path_factory):
    """Two standalone compressor processes of `coordinator`."""
    root = tmp_path_factory.mktemp("pair")
    started = []
    try:
        for n in (1, 2):
            started.append(Compressor([coordinator.address], coordinator.token_file, root / f"cache-{n}",
                                      root / f"compressor-{n}.log"))
        yield started
    finally:
        for compressor in started:
            compressor.stop()


# ---------------------------------------------------------------------- dispatch
def test_no_replica_reachable_is_a_typed_error_after_the_bounded_wait(caplog):
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    workers = Workers(dead[0], dead, dead[1], retry=RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.4,
                                                                 max_total_wait_s=1.5), health_interval_s=None)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable) as error:
            workers.call(workers.compressor.Compress, compress("artifacts/" + "0" * 64))
        elapsed = time.monotonic() - started
    finally:
        workers.close()
    assert 0.5 < elapsed < 6, elapsed             # waited (half of each nominal wait at least), but bounded
    assert all(address in error.value.message for address in dead) and "--compressor" in error.value.message
    assert error.value.code == "UNAVAILABLE"
    compressors = states(workers)
    assert all(r.state == DOWN and r.failures == r.calls >= 2 and r.in_flight == 0 for r in compressors.values())
    assert "retrying in" in caplog.text



def test_replica_health_is_a_metric(tmp_path):
    """edgeforge_worker_replicas{role,state} on a coordinator whose replicas are not running."""
    import urllib.request

    from services.coordinator.server import create_server
    dead = {role: [f"127.0.0.1:{free_port()}" for _ in range(count)]
            for role, count in (("calibrator", 1), ("compressor", 2), ("exporter", 1))}
    server, _, ctx = create_server("127.0.0.1:0", tmp_path / "data", dead, metrics_address="127.0.0.1:0")
    try:
        wait_for(lambda: all(r.state == DOWN for r in ctx.workers.snapshot()), 10, "every replica is probed")
        text = urllib.request.urlopen(f"http://127.0.0.1:{ctx.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        ctx.metrics_endpoint.stop()
        ctx.workers.close()
        server.stop(0).wait()
    assert 'edgeforge_worker_replicas{role="compressor",state="down"} 2.0' in text
    assert 'edgeforge_worker_replicas{role="calibrator",state="up"} 0.0' in text
    assert 'edgeforge_worker_replicas{role="exporter",state="unknown"} 0.0' in text

def test_bad_replica_lists_are_refused_with_the_flag_and_the_fix():
    for text, words in (("127.0.0.1:1,", "one or more HOST:PORT"), ("localhost", "is not HOST:PORT"),
                        ("127.0.0.1:70000", "1-65535"), ("a:1,a:1", "more than once")):
        with pytest.raises(ValueError, match=words) as error:
            Workers("127.0.0.1:1", text, "127.0.0.1:1", health_interval_s=None)
        assert "--compressor" in str(error.value)
    completed = subprocess.run([sys.executable, "-m", "services.coordinator.server", "--calibrator", "h:1",
                                "--compressor", "h:1,h", "--exporter", "h:1"], cwd=ROOT, capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}"}, timeout=120)
    assert completed.returncode == 2 and "--compressor: 'h' is not HOST:PORT" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.slow                # two compressor processes (torch imports): 20-60 s on 2 cores
def test_concurrent_calls_spread_over_both_replicas_least_loaded_first(coordinator, pair):
    first, second = pair
    workers = replicas_workers(coordinator, [first.address, second.address])
    try:
        wait_for(lambda: all(r.state == UP for r in states(workers).values()), 30, "both replicas are up")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda t: workers.call(workers.compressor.Compress, compress(coordinator.model, t)),
                                    ["q4_0", "q8_0", "q4_0", "q8_0"]))
        calls = {address: r.calls for address, r in states(workers).items()}
        # 0/0 -> 1/0 -> 1/1 -> 2/1 -> 2/2 when all four start together; a call that ends early frees its replica
        assert sum(calls.values()) == 4 and min(calls.values()) >= 1, calls
        assert first.fetched() and second.fetched()                     # both really compressed
        assert answers[0].compressed.name == answers[2].compressed.name  # same request, same artifact
        assert answers[1].compressed.name == answers[3].compressed.name != answers[0].compressed.name

        # Least loaded before round-robin: while the first replica holds a call (frozen mid-call), every new
        # call goes to the second, although round-robin alone would alternate.
        frozen = replicas_workers(coordinator, [first.address, second.address], health_interval_s=None)
        first.signal(signal.SIGSTOP)
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                held = pool.submit(frozen.call, frozen.compressor.Compress, compress(coordinator.model))
                wait_for(lambda: states(frozen)[first.address].in_flight == 1, 10, "the call is on the first")
                for gguf_type in ("q8_0", "q4_0", "q8_0"):
                    frozen.call(frozen.compressor.Compress, compress(coordinator.model, gguf_type))
                assert {a: r.calls for a, r in states(frozen).items()} == {first.address: 1, second.address: 3}
                first.signal(signal.SIGCONT)
                assert held.result(timeout=120).compressed.name == answers[0].compressed.name
        finally:
            first.signal(signal.SIGCONT)
            frozen.close()
    finally:
        workers.close()


@pytest.mark.slow                # a compressor process started during the test
def test_a_replica_down_at_start_is_skipped_until_it_comes_up(coordinator, pair, tmp_path):
    late_address = f"127.0.0.1:{free_port()}"
    _, live = pair
    workers = replicas_workers(coordinator, [late_address, live.address], health_interval_s=0.3)
    late = None
    try:
        wait_for(lambda: states(workers)[late_address].state == DOWN, 10, "the health check finds it down")
        for gguf_type in ("q4_0", "q8_0", "q4_0"):
            workers.call(workers.compressor.Compress, compress(coordinator.model, gguf_type))
        skipped = states(workers)
        assert skipped[late_address].calls == 0 and skipped[live.address].calls == 3     # never even tried

        late = Compressor([coordinator.address], coordinator.token_file, tmp_path / "cache-late", tmp_path / "late.log",
                          port=int(late_address.rsplit(":", 1)[1]))
        wait_for(lambda: states(workers)[late_address].state == UP, 30, "the health check finds it up")
        for gguf_type in ("q8_0", "q4_0"):                               # both idle: they take turns
            workers.call(workers.compressor.Compress, compress(coordinator.model, gguf_type))
        assert states(workers)[late_address].calls == 1 and late.fetched()
    finally:
        workers.close()
        if late is not None:
            late.stop()


@pytest.mark.slow                # a compressor process started and killed
def test_a_replica_killed_mid_call_is_replaced_at_once_with_the_same_result(coordinator, pair, tmp_path, caplog):
    _, survivor = pair
    victim = Compressor([coordinator.address], coordinator.token_file, tmp_path / "cache-victim",
                        tmp_path / "victim.log")
    # No health polling: the kill must be found by the call itself, not by a probe.
    workers = replicas_workers(coordinator, [victim.address, survivor.address], health_interval_s=None,
                               retry=RetryPolicy(max_total_wait_s=5.0))
    request = compress(coordinator.model, "q8_0")
    try:
        on_victim = workers.call(workers.compressor.Compress, request)            # connects both; turns go
        on_survivor = workers.call(workers.compressor.Compress, request)          # victim, survivor, victim...
        assert on_victim.compressed.name == on_survivor.compressed.name
        victim.signal(signal.SIGSTOP)                                            # holds the next call mid-way
        with concurrent.futures.ThreadPoolExecutor(1) as pool, caplog.at_level(logging.WARNING):
            pending = pool.submit(workers.call, workers.compressor.Compress, request)
            wait_for(lambda: states(workers)[victim.address].in_flight == 1, 10, "the call is on the victim")
            time.sleep(0.5)                                                      # the request is in its socket
            started = time.monotonic()
            victim.signal(signal.SIGKILL)
            answer = pending.result(timeout=120)
        assert answer.compressed.name == on_victim.compressed.name               # identical, content-addressed
        assert answer.compressed.sha256 == on_victim.compressed.sha256
        assert time.monotonic() - started < 60
        after = states(workers)
        assert after[victim.address].state == DOWN and after[victim.address].failures == 1
        assert after[survivor.address].calls == 2 and after[survivor.address].failures == 0
        assert f"retrying at once on {survivor.address}" in caplog.text and "retrying in" not in caplog.text
    finally:
        workers.close()
        victim.stop()


# ---------------------------------------------------------------------- standalone workers, two coordinators
@pytest.mark.slow                # a compressor process and two coordinators
def test_a_standalone_worker_fails_over_to_the_second_coordinator(tmp_path, tiny_model_dir):
    data_dir = tmp_path / "data"                   # two coordinators on one metadata database and blob directory
    first, first_address, first_ctx = start_coordinator(data_dir)
    second, second_address, _ = start_coordinator(data_dir)
    compressor = None
    try:
        client = Client(first_address, token=first_ctx.admin_token)
        source = client.upload_model(tiny_model_dir)
        model = compressor_pb2_grpc.CompressorStub(client.channel).ImportModel(
            compressor_pb2.ImportModelRequest(source=source.name), timeout=300).model
        client.close()
        compressor = Compressor([first_address, second_address], data_dir / "admin.token", tmp_path / "cache",
                                tmp_path / "compressor.log")
        stub = compressor_pb2_grpc.CompressorStub(channel(compressor.address, token=first_ctx.admin_token))
        stub.Compress(compress(model.name), timeout=300)                       # artifacts from the first

        first.stop(0).wait()
        # A source it never fetched: read from the second (token checked there too), its result stored there.
        imported = stub.ImportModel(compressor_pb2.ImportModelRequest(source=source.name), timeout=300).model
        assert imported.name == model.name                                     # the same bytes, the same name
        assert stub.Compress(compress(model.name, "q8_0"), timeout=300).compressed.name
        assert f"coordinator {first_address} is unavailable" in compressor.text()
        assert f"using {second_address}" in compressor.text()
    finally:
        if compressor is not None:
            compressor.stop()
        first.stop(0).wait()
        second.stop(0).wait()


def test_a_download_cut_off_mid_stream_resumes_on_the_next_coordinator(tmp_path):
    """RemoteArtifacts with two coordinators: the first stops after the first chunk of a 24 MiB download;
    the rest comes from the second, from where the first stopped, and the digest checks out."""
    from shared.artifact_access import RemoteArtifacts
    data_dir = tmp_path / "data"
    first, first_address, ctx = start_coordinator(data_dir)
    second, second_address, _ = start_coordinator(data_dir)
    try:
        payload = tmp_path / "payload.bin"
        payload.write_bytes(os.urandom(24 << 20))
        with Client(first_address, token=ctx.admin_token) as client:
            artifact = client.upload(payload, common_pb2.ARTIFACT_KIND_DATASET)
        access = RemoteArtifacts(f"{first_address},{second_address}", tmp_path / "cache", token=ctx.admin_token)
        received, chunks = bytearray(), 0
        for message in access._read(artifact.name, 0):          # the stream local_path() downloads from
            assert message.offset == len(received)
            received += message.data
            chunks += 1
            if chunks == 1:
                first.stop(0).wait()
        assert chunks > 2 and bytes(received) == payload.read_bytes()
        path = access.local_path(artifact.name)                # the whole path, now on the second alone
        assert path.read_bytes() == payload.read_bytes()
    finally:
        first.stop(0).wait()
        second.stop(0).wait()
