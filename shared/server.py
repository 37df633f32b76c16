"""gRPC server and channel bootstrap shared by every service: health checking and reflection always on.

Observability (docs/OPERATIONS.md): given a `shared.metrics.ServerMetrics`, a server counts and times
every call (its interceptor goes first, outside authentication, so refusals are counted too) and names
each call in the log context; worker mains take --metrics-address, --log-format and --log-level.

Security (docs/SECURITY.md): a server takes interceptors (the coordinator and the worker mains pass
shared.auth.AuthInterceptor) and optional TLS — `ServerTls` with a client CA turns on mutual TLS, so
a client without a certificate from that CA is refused during the handshake. `channel(address,
token=, tls=)` is the client side: every call carries `authorization: Bearer <token>` and, with
`ClientTls`, the connection is TLS (with a client certificate for mTLS).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared import logs
from shared.metrics import ServerMetrics

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 8 << 20            # chunks are at most 4 MiB; leave room for the envelope
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]

# (add_XServicer_to_server, servicer instance, fully qualified service name)
Registration = tuple[Callable, object, str]


@dataclasses.dataclass(frozen=True)
class ServerTls:
    """A server certificate chain and key (PEM); with client_ca_pem, clients must present a certificate
    signed by that CA (mutual TLS)."""
    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.client_ca_pem,
                                           require_client_auth=self.client_ca_pem is not None)


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """The CA that signed the server's certificate (PEM); cert and key are this client's, for mutual TLS."""
    ca_pem: bytes
    cert_pem: bytes | None = None
    key_pem: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)


def add_server_tls_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="the private key of --tls-cert (PEM)")
    parser.add_argument("--tls-client-ca", type=Path,
                        help="require client certificates signed by this CA (mutual TLS); needs --tls-cert")


def server_tls_from_args(parser: argparse.ArgumentParser, args) -> ServerTls | None:
    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        parser.error("TLS needs both --tls-cert and --tls-key")
    return ServerTls(args.tls_cert.read_bytes(), args.tls_key.read_bytes(),
                     args.tls_client_ca.read_bytes() if args.tls_client_ca else None)


def client_tls_from_files(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ClientTls | None:
    """ClientTls from PEM files; None without a CA (plain text). A certificate needs its key."""
    if ca is None:
        if cert or key:
            raise ValueError("a TLS client certificate needs --tls-ca (the CA of the server's certificate)")
        return None
    if bool(cert) != bool(key):
        raise ValueError("a TLS client certificate needs both --tls-cert and --tls-key")
    return ClientTls(ca.read_bytes(), cert.read_bytes() if cert else None, key.read_bytes() if key else None)


def create_server(address: str, registrations: Iterable[Registration], *, max_workers: int = 32,
                  interceptors: Iterable[grpc.ServerInterceptor] = (), tls: ServerTls | None = None,
                  extra_ports: Iterable[str] = (), metrics: ServerMetrics | None = None
                  ) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Builds and starts a server on `address` ("127.0.0.1:0" picks a free port). Returns (server, port, health).
    `extra_ports` are further plain-text addresses (the coordinator's private unix socket); with `metrics`,
    every call is counted and timed there (shared/metrics.py)."""
    registrations = list(registrations)
    names = [health.SERVICE_NAME, reflection.SERVICE_NAME, *(name for _, _, name in registrations)]
    interceptors = list(interceptors)
    if metrics is not None:
        interceptors.insert(0, metrics.interceptor(names))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=CHANNEL_OPTIONS,
                         interceptors=interceptors)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for add, servicer, service_name in registrations:
        add(servicer, server)
        health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(names, server)
    port = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    for extra in extra_ports:
        server.add_insecure_port(extra)
    server.start()
    log.info("serving %s on port %d%s", ", ".join(n.rsplit(".", 1)[-1] for n in names[2:]), port,
             "" if tls is None else " (mutual TLS)" if tls.client_ca_pem else " (TLS)")
    return server, port, health_servicer


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds "authorization: Bearer <token>" to every call that does not carry its own."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        metadata = list(details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata.append(self.header)
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


@dataclasses.dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: list
    credentials: object
    wait_for_ready: bool | None
    compression: object


def channel(address: str, *, token: str | None = None, tls: ClientTls | None = None,
            options: list[tuple[str, int]] = ()) -> grpc.Channel:
    """A channel to `address`; with `token` every call is authenticated, with `tls` the connection is TLS;
    `options` add gRPC channel arguments to the message-size limits."""
    options = CHANNEL_OPTIONS + list(options)
    raw = (grpc.secure_channel(address, tls.credentials(), options=options) if tls
           else grpc.insecure_channel(address, options=options))
    return grpc.intercept_channel(raw, _Bearer(token)) if token else raw


def wait_ready(address: str, timeout_s: float = 30.0, *, tls: ClientTls | None = None) -> None:
    """Blocks until the server at `address` answers its health check (open without a token)."""
    with channel(address, tls=tls) as ch:
        grpc.channel_ready_future(ch).result(timeout=timeout_s)
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)


def create_worker_server(address: str, registration: Registration, verify: Callable | None, *,
                         tls: ServerTls | None = None, metrics: ServerMetrics | None = None
                         ) -> tuple[grpc.Server, int]:
    """One worker service (calibrator, compressor or exporter) on its own server. `verify` checks each
    call's bearer token (admin only): the coordinator's TokenStore.verify, or shared.auth.RemoteVerifier
    asking its Tokens.WhoAmI; None turns authentication off (closed test networks). `metrics` records every call."""
    from shared.auth import AuthInterceptor
    guard = [AuthInterceptor(verify)] if verify is not None else []
    server, port, _ = create_server(address, [registration], interceptors=guard, tls=tls, metrics=metrics)
    return server, port


def worker_main(name: str, registration_factory: Callable) -> None:
    """`python -m services.<name>.server`: one stateless worker service, using the coordinator's artifact
    store over gRPC with a local cache. `--token-file` holds an admin token: the worker sends it to the
    coordinator, and checks every incoming call's token with the coordinator's Tokens.WhoAmI (admin only).
    `--metrics-address` serves Prometheus metrics (off by default); `--log-format json` logs JSON lines."""
    import signal

    from shared.artifact_access import RemoteArtifacts
    from shared.auth import RemoteVerifier
    from shared.failover import parse_addresses
    parser = argparse.ArgumentParser(description=f"edgeforge {name} service")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default 0)")
    parser.add_argument("--coordinator", required=True,
                        help="coordinator address (host:port) for artifacts and token checks; several, separated "
                             "by commas, are tried in order when one is unavailable")
    parser.add_argument("--cache-dir", type=Path, default=Path(".edgeforge") / f"cache-{name}")
    parser.add_argument("--token-file", type=Path, default=os.environ.get("EDGEFORGE_TOKEN_FILE"),
                        help="file with an admin token (the coordinator's <data-dir>/admin.token), or "
                             "$EDGEFORGE_TOKEN_FILE")
    parser.add_argument("--no-auth", action="store_true",
                        help="accept calls without a token (a closed test network only)")
    parser.add_argument("--coordinator-tls-ca", type=Path,
                        help="the coordinator serves TLS signed by this CA (with mutual TLS, this worker's "
                             "--tls-cert/--tls-key are its client certificate)")
    add_server_tls_args(parser)
    add_observability_args(parser)
    args = parser.parse_args()
    logs.configure_from_args(parser, args, service=name)
    token = args.token_file.read_text().strip() if args.token_file else None
    if token is None and not args.no_auth:
        parser.error("give --token-file with an admin token (or --no-auth on a closed test network)")
    tls = server_tls_from_args(parser, args)
    try:
        coordinator_tls = client_tls_from_files(args.coordinator_tls_ca, args.tls_cert if args.coordinator_tls_ca
                                                else None, args.tls_key if args.coordinator_tls_ca else None)
    except ValueError as error:
        parser.error(str(error))
    try:
        coordinators = parse_addresses(args.coordinator, "--coordinator")
    except ValueError as error:
        parser.error(str(error))
    access = RemoteArtifacts(coordinators, args.cache_dir, token=token, tls=coordinator_tls)
    verify = None if args.no_auth else RemoteVerifier(
        {address: channel(address, token=token, tls=coordinator_tls) for address in coordinators})
    metrics = ServerMetrics()
    endpoint = serve_metrics(parser, metrics, args.metrics_address)      # a bad address stops us before serving
    server, port = create_worker_server(f"{args.host}:{args.port}", registration_factory(access), verify, tls=tls,
                                        metrics=metrics)
    print(f"{name} listening on {args.host}:{port}\n", end="", flush=True)     # one write: see the coordinator's
    signal.signal(signal.SIGTERM, lambda *_: server.stop(5))
    server.wait_for_termination()
    if endpoint is not None:
        endpoint.stop()


def add_observability_args(parser: argparse.ArgumentParser) -> None:
    """--metrics-address, --log-format and --log-level (docs/OPERATIONS.md)."""
    parser.add_argument("--metrics-address", default=os.environ.get("EDGEFORGE_METRICS_ADDRESS"),
                        help="serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics, e.g. "
                             "127.0.0.1:9470 (0 picks a free port; off unless given; no authentication, so keep "
                             "it on loopback or a private network); default $EDGEFORGE_METRICS_ADDRESS")
    logs.add_arguments(parser)


def serve_metrics(parser: argparse.ArgumentParser, metrics: ServerMetrics, address: str | None):
    """`metrics` served on `address` (None: not served); a bad or busy address is a usage error."""
    if not address:
        return None
    try:
        return metrics.serve(address)
    except (ValueError, OSError) as error:
        parser.error(str(error))
