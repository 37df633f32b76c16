"""Prometheus metrics of a server: RPC counts and latencies for every call, and the /metrics endpoint.

Names follow the Prometheus conventions (base units, `_total` counters, `_seconds` durations) and the
shape of go-grpc-prometheus, so existing gRPC dashboards and alerts carry over:

    edgeforge_rpc_server_started_total{service,method}         calls begun
    edgeforge_rpc_server_handled_total{service,method,code}    calls ended, by gRPC status code
    edgeforge_rpc_server_handling_seconds{service,method}      histogram, until the last message of a stream

`service` is the fully qualified gRPC service ("edgeforge.v1.Coordinator"), `method` its method. Only
methods the server serves become label values; calls to anything else are counted as service and
method "unknown", so no caller can grow the number of series. Refused calls (UNAUTHENTICATED,
PERMISSION_DENIED from shared/auth.py) are counted like any other outcome: the interceptor sits
outside the AuthInterceptor.

Each server owns a `ServerMetrics` with its own registry (not prometheus_client's global one), so
several servers in one process — tests, or `edgeforge up` — never share or collide. The registry also
carries the standard process_* and python_* collectors. `serve(address)` exposes it as plain HTTP;
the endpoint is off unless an address is given, and docs/OPERATIONS.md explains why it belongs on
loopback or a private network.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
import uuid
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIServer

import grpc
import prometheus_client
from google.protobuf import descriptor_pool
from prometheus_client import CollectorRegistry, Counter, Histogram

from shared import logs
from shared.handlers import rewrap

log = logging.getLogger(__name__)
# 1 ms … 60 s: control RPCs answer in milliseconds, long polls (LeaseJob, WaitOperation) and artifact
# streams take seconds to a minute.
RPC_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
UNKNOWN = "unknown"
REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class ServerMetrics:
    """The registry of one server and the RPC metrics its interceptor records."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        prometheus_client.ProcessCollector(registry=self.registry)
        prometheus_client.PlatformCollector(registry=self.registry)
        prometheus_client.GCCollector(registry=self.registry)
        self.started = Counter("edgeforge_rpc_server_started_total", "RPCs started on the server.",
                               ["service", "method"], registry=self.registry)
        self.handled = Counter("edgeforge_rpc_server_handled_total",
                               "RPCs completed on the server, by gRPC status code.",
                               ["service", "method", "code"], registry=self.registry)
        self.handling_seconds = Histogram("edgeforge_rpc_server_handling_seconds",
                                          "Time from the start of an RPC until its last response message "
                                          "(or its error) on the server.", ["service", "method"],
                                          buckets=RPC_BUCKETS_S, registry=self.registry)

    def interceptor(self, services: Iterable[str]) -> grpc.ServerInterceptor:
        """The interceptor for a server that serves `services` (fully qualified names); put it first."""
        return RpcMetricsInterceptor(self, services)

    def observe(self, service: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.handled.labels(service, method, code.name).inc()
        self.handling_seconds.labels(service, method).observe(seconds)

    def render(self) -> str:
        """The metrics in the Prometheus text format, as /metrics serves them."""
        return prometheus_client.generate_latest(self.registry).decode()

    def serve(self, address: str) -> MetricsEndpoint:
        """Serves GET /metrics as HTTP on `address` ("127.0.0.1:9470"; port 0 picks a free one)."""
        host, port = parse_address(address)
        try:
            server, thread = prometheus_client.start_http_server(port, host, registry=self.registry)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {address}: {error.strerror or error}") from error
        endpoint = MetricsEndpoint(server, thread, host, server.server_port)
        log.info("serving Prometheus metrics on http://%s/metrics", endpoint.address)
        return endpoint


@dataclasses.dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server; `stop()` closes it."""
    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of "host:port", "[v6]:port" or a bare "port" (which means 127.0.0.1: loopback unless
    asked otherwise). ValueError naming the flag and the expected shape for anything else."""
    text = address.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    host = host.removeprefix("[").removesuffix("]")
    if not sep and not port_text.isdigit() or sep and (not host or not port_text.isdigit()):
        raise ValueError(f"--metrics-address must be HOST:PORT (e.g. 127.0.0.1:9470, [::1]:9470, or 0 for any "
                         f"free port on 127.0.0.1), got {address!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"--metrics-address port must be 0-65535, got {port}")
    return host, port


def _methods_of(services: Iterable[str]) -> dict[str, frozenset[str]]:
    """service -> its method names, from the protobuf descriptors the server's stubs registered."""
    pool = descriptor_pool.Default()
    known = {}
    for service in services:
        try:
            known[service] = frozenset(m.name for m in pool.FindServiceByName(service).methods)
        except KeyError:
            log.warning("no descriptor for %s: its calls are counted as method 'unknown'", service)
            known[service] = frozenset()
    return known


def _request_id(metadata) -> str:
    """The caller's x-request-id when it is a short token, else a fresh one (never attacker-shaped text)."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]


class RpcMetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every call, and binds its method and request id into the log context
    (shared/logs.py) while the handler runs. Composes with other interceptors: it wraps whatever handler
    the rest of the chain returns, refusals included."""

    def __init__(self, metrics: ServerMetrics, services: Iterable[str]):
        self.metrics = metrics
        self.known = _methods_of(services)

    def _labels(self, full_method: str) -> tuple[str, str]:
        service, _, method = full_method.lstrip("/").partition("/")
        return (service, method) if method in self.known.get(service, ()) else (UNKNOWN, UNKNOWN)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:                       # not served here: answer as gRPC would, but counted
            handler = grpc.unary_unary_rpc_method_handler(_unimplemented)
        service, method = self._labels(handler_call_details.method)
        context_fields = {"rpc": handler_call_details.method,
                          "request_id": _request_id(handler_call_details.invocation_metadata)}
        return _wrapped(handler, self.metrics, service, method, context_fields)


def _unimplemented(request, context):
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")


def _outcome(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    """The status the call ends with: the one the handler set or aborted with; UNKNOWN for an uncaught
    exception (what gRPC sends); CANCELLED when the client went away first; else OK."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if failed:
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK if context.is_active() else grpc.StatusCode.CANCELLED


def _wrapped(handler: grpc.RpcMethodHandler, metrics: ServerMetrics, service: str, method: str,
             context_fields: dict[str, str]) -> grpc.RpcMethodHandler:
    """`handler` with each call counted, timed and named in the log context."""

    def finish(context, started: float, failed: bool) -> None:
        seconds = time.perf_counter() - started
        code = _outcome(context, failed)
        metrics.observe(service, method, code, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s in %.1f ms", context_fields["rpc"], code.name, seconds * 1e3,
                      extra={"code": code.name, "duration_ms": round(seconds * 1e3, 3)})

    def unary(behaviour: Callable) -> Callable:
        def run(request_or_iterator, context):
            saved = logs.current()
            logs.bind(**context_fields)
            metrics.started.labels(service, method).inc()
            started, failed = time.perf_counter(), True
            try:
                response = behaviour(request_or_iterator, context)
                failed = False
                return response
            finally:
                finish(context, started, failed)
                logs.restore(saved)
        return run

    def streaming(behaviour: Callable) -> Callable:
        def run(request_or_iterator, context):
            # The response generator runs on one pool thread, between the yields too: the fields stay bound
            # until the stream ends (or the client goes away and the generator is closed).
            saved = logs.current()
            logs.bind(**context_fields)
            metrics.started.labels(service, method).inc()
            started, failed = time.perf_counter(), True
            try:
                yield from behaviour(request_or_iterator, context)
                failed = False
            except GeneratorExit:                 # closed early: the client cancelled the stream
                failed = False
                raise
            finally:
                finish(context, started, failed)
                logs.restore(saved)
        return run

    return rewrap(handler, unary, streaming)
