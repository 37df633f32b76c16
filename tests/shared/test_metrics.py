"""shared/metrics.py on a real gRPC server on 127.0.0.1:0 (the Tokens service over real SQLite, behind the
real AuthInterceptor): every outcome counted under its code, latencies observed until a stream ends,
label values bounded, the log context set per call, and /metrics served over HTTP."""
from __future__ import annotations

import io
import json
import logging
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from edgeforge.v1 import tokens_pb2, tokens_pb2_grpc
from services.coordinator import tokens_servicer
from shared import logs
from shared.auth import AuthInterceptor, TokenStore
from shared.metrics import ServerMetrics, parse_address
from shared.server import channel, create_server
from shared.store.database import Database

TOKENS = "edgeforge.v1.Tokens"


@pytest.fixture
def served(tmp_path):
    """(address, metrics, admin secret) of a Tokens server with authentication and metrics."""
    tokens = TokenStore(Database(tmp_path / "edgeforge.db"))
    _, admin = tokens.create("admin", "test admin")
    metrics = ServerMetrics()
    server, port, _ = create_server("127.0.0.1:0", [tokens_servicer.registration(tokens)],
                                    interceptors=[AuthInterceptor(tokens.verify)], metrics=metrics)
    yield f"127.0.0.1:{port}", metrics, admin
    server.stop(0).wait()


def handled(metrics: ServerMetrics, service: str, method: str, code: str) -> float:
    return metrics.registry.get_sample_value("edgeforge_rpc_server_handled_total",
                                             {"service": service, "method": method, "code": code}) or 0.0


def seconds(metrics: ServerMetrics, service: str, method: str, suffix: str) -> float:
    return metrics.registry.get_sample_value(f"edgeforge_rpc_server_handling_seconds_{suffix}",
                                             {"service": service, "method": method}) or 0.0


def test_every_outcome_is_counted_under_its_code_and_timed(served):
    address, metrics, admin = served
    with channel(address, token=admin) as ch, channel(address) as anonymous, \
            channel(address, token="ef_" + "n" * 43) as stranger:
        tokens = tokens_pb2_grpc.TokensStub(ch)
        for _ in range(3):
            tokens.WhoAmI(tokens_pb2.WhoAmIRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as error:
            tokens.CreateToken(tokens_pb2.CreateTokenRequest(display_name="x"), timeout=10)   # no role
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for stub in (tokens_pb2_grpc.TokensStub(anonymous), tokens_pb2_grpc.TokensStub(stranger)):
            with pytest.raises(grpc.RpcError) as error:
                stub.WhoAmI(tokens_pb2.WhoAmIRequest(), timeout=10)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert handled(metrics, TOKENS, "WhoAmI", "OK") == 3
    assert handled(metrics, TOKENS, "WhoAmI", "UNAUTHENTICATED") == 2      # refused by auth, still counted
    assert handled(metrics, TOKENS, "CreateToken", "INVALID_ARGUMENT") == 1
    assert handled(metrics, "grpc.health.v1.Health", "Check", "OK") == 1
    assert seconds(metrics, TOKENS, "WhoAmI", "count") == 5
    assert 0 < seconds(metrics, TOKENS, "WhoAmI", "sum") < 5
    started = metrics.registry.get_sample_value("edgeforge_rpc_server_started_total",
                                                {"service": TOKENS, "method": "WhoAmI"})
    assert started == 5


def test_a_stream_is_timed_until_it_ends(served):
    address, metrics, _ = served
    with channel(address) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=TOKENS), timeout=30)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        time.sleep(0.4)                                    # the stream stays open, the clock keeps running
        stream.cancel()
        deadline = time.monotonic() + 10
        while not handled(metrics, "grpc.health.v1.Health", "Watch", "CANCELLED") and time.monotonic() < deadline:
            time.sleep(0.05)
    assert handled(metrics, "grpc.health.v1.Health", "Watch", "CANCELLED") == 1
    assert seconds(metrics, "grpc.health.v1.Health", "Watch", "sum") >= 0.4


def test_methods_the_server_does_not_serve_share_one_label(served):
    address, metrics, admin = served
    for token in (admin, None):
        with channel(address, token=token) as ch:
            for name in ("/edgeforge.v1.Tokens/Nope", "/made.up.Service/Method-with-a-long-random-name"):
                with pytest.raises(grpc.RpcError) as error:
                    ch.unary_unary(name)(b"", timeout=10)
                assert error.value.code() == (grpc.StatusCode.UNIMPLEMENTED if token
                                              else grpc.StatusCode.UNAUTHENTICATED)
    assert handled(metrics, "unknown", "unknown", "UNIMPLEMENTED") == 2
    assert handled(metrics, "unknown", "unknown", "UNAUTHENTICATED") == 2
    services = {s.labels["service"] for f in metrics.registry.collect() if f.name.startswith("edgeforge_rpc")
                for s in f.samples}
    assert services == {"unknown"}


def test_each_call_is_named_in_the_log_context_and_the_token_never_logged(served):
    address, _, admin = served
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    stream = io.StringIO()
    logs.configure("json", "debug", service="test", stream=stream)
    try:
        with channel(address, token=admin) as ch:
            tokens_pb2_grpc.TokensStub(ch).WhoAmI(tokens_pb2.WhoAmIRequest(), timeout=10,
                                                  metadata=(("x-request-id", "req-42"),))
        with channel(address, token="ef_" + "w" * 43) as ch, pytest.raises(grpc.RpcError):
            tokens_pb2_grpc.TokensStub(ch).WhoAmI(tokens_pb2.WhoAmIRequest(), timeout=10,
                                                  metadata=(("x-request-id", "bad id with spaces"),))
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved
        root.setLevel(level)
    text = stream.getvalue()
    assert admin not in text and admin[3:] not in text and "w" * 43 not in text
    calls = [r for r in map(json.loads, text.splitlines()) if r["logger"] == "shared.metrics"]
    ok, refused = calls
    assert (ok["rpc"], ok["request_id"], ok["code"]) == ("/edgeforge.v1.Tokens/WhoAmI", "req-42", "OK")
    assert ok["duration_ms"] > 0
    assert refused["code"] == "UNAUTHENTICATED" and len(refused["request_id"]) == 16   # a fresh id instead
    assert logs.current() == {}


def test_the_endpoint_serves_the_registry_over_http(served):
    address, metrics, admin = served
    endpoint = metrics.serve("127.0.0.1:0")
    try:
        assert endpoint.port > 0
        with channel(address, token=admin) as ch:
            tokens_pb2_grpc.TokensStub(ch).WhoAmI(tokens_pb2.WhoAmIRequest(), timeout=10)
        with urllib.request.urlopen(f"http://{endpoint.address}/metrics", timeout=10) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain")
            families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
        (sample,) = [s for s in families["edgeforge_rpc_server_handled"].samples if s.name.endswith("_total")]
        assert sample.labels == {"service": TOKENS, "method": "WhoAmI", "code": "OK"} and sample.value == 1
        assert families["edgeforge_rpc_server_handling_seconds"].type == "histogram"
        assert "process_resident_memory_bytes" in families
        assert admin not in metrics.render()
    finally:
        endpoint.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{endpoint.address}/metrics", timeout=2)


def test_metrics_addresses_parse_or_say_what_is_expected():
    assert parse_address("127.0.0.1:9470") == ("127.0.0.1", 9470)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("9470") == ("127.0.0.1", 9470)                 # a bare port stays on loopback
    assert parse_address("0.0.0.0:9470") == ("0.0.0.0", 9470)
    for bad in ("", "localhost", "host:", ":9470", "host:port", "1.2.3.4:99999"):
        with pytest.raises(ValueError, match="--metrics-address"):
            parse_address(bad)
