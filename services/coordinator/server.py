"""The coordinator server, alone or embedded.

    python -m services.coordinator.server --port N --calibrator H:P --compressor H:P,H:P --exporter H:P
    (or `edgeforge up`, which embeds all four services in one process on one port)

Embedded, the worker services are registered on the coordinator's own server and reach the
artifact store directly; alone, they are separate processes that use it over gRPC. Between the two,
only configuration changes: the coordinator always calls the workers through their gRPC stubs, with
its own admin token (`ctx.admin_token`, also written to <data-dir>/admin.token for the operator and
for standalone workers' --token-file). Served with TLS, embedded workers are reached over a private
unix socket, so the coordinator needs no client certificate for itself.

Metrics (docs/OPERATIONS.md): every coordinator records RPC metrics (shared/metrics.py) and its own
(services/coordinator/metrics.py) in its own registry; `metrics_address` (--metrics-address) serves them
at http://ADDRESS/metrics, recorded in ctx.metrics_port and stopped by ctx.metrics_endpoint.stop().
"""
from __future__ import annotations

import argparse
import logging
import signal
import tempfile
from pathlib import Path

import grpc

from services.calibrator import servicer as calibrator
from services.compressor import servicer as compressor
from services.coordinator import artifacts_servicer, devices_servicer, servicer, tokens_servicer
from services.coordinator.claims import DEFAULT_TTL_S, ClaimStore
from services.coordinator.cluster import add_cluster_args, cluster_options, data_dir_identity, release_identity, \
    storage_error_message
from services.coordinator.context import CoordinatorContext
from services.coordinator.metrics import CoordinatorMetrics
from services.coordinator.ownership import Ownership
from services.coordinator.scheduler import Scheduler
from services.coordinator.state import CoordinatorState
from services.coordinator.workers import Workers
from services.exporter import servicer as exporter
from shared import logs, server as bootstrap
from shared.artifact_access import LocalArtifacts
from shared.auth import AuthInterceptor, TokenStore, ensure_token_file
from shared.errors import EdgeforgeError
from shared.failover import parse_addresses
from shared.metrics import ServerMetrics, parse_address
from shared.server import ClientTls, ServerTls
from shared.store.artifacts import ArtifactStore
from shared.store.blobs import open_blobs
from shared.store.database import open_database
from shared.store.grants import Grants

log = logging.getLogger(__name__)
# Each agent device holds a LeaseJob long-poll and sends heartbeats; builds and transfers need threads
# too. gRPC's sync server runs one call per thread, so the pool is sized for a fleet, not a laptop.
MAX_WORKERS = 256
ADMIN_TOKEN_FILE = "admin.token"


def create_server(address: str, data_dir: Path, workers: dict[str, str] | None = None, *,
                  device_wait_s: float = 120.0, lease_ttl_s: float = 30.0, max_attempts: int = 3,
                  auth: bool = True, tls: ServerTls | None = None, worker_tls: ClientTls | None = None,
                  metrics_address: str | None = None, database: str | None = None, blobs: str | None = None,
                  coordinator_id: str | None = None, claim_ttl_s: float = DEFAULT_TTL_S,
                  ) -> tuple[grpc.Server, int, CoordinatorContext]:
    """Starts a coordinator. `workers` maps calibrator/compressor/exporter to an address or a list of replicas'
    addresses (services/coordinator/workers.py); None embeds them.
    With `auth` (the default) every service but health checking needs a live token (shared/auth.py);
    `tls` serves TLS (mutual with a client CA); `worker_tls` is how to reach standalone workers over TLS.
    `metrics_address` ("127.0.0.1:0") serves Prometheus metrics over HTTP; the bound port is ctx.metrics_port.
    Writes data_dir/admin.token (0600): the coordinator's own admin token, reused while it is live.

    `database` (services/coordinator/cluster.py: a path, sqlite:///... or postgresql://...; default
    data_dir/edgeforge.db) and `blobs` (a directory or s3://...; default data_dir/blobs) may be shared by
    several coordinators: each build runs on the one holding its claim (services/coordinator/claims.py,
    `coordinator_id`, `claim_ttl_s`), and a dead coordinator's builds are taken over by the others. Their
    data_dir stays their own (admin token, uploads in progress, caches)."""
    if metrics_address:
        parse_address(metrics_address)          # a bad address fails before anything is created
    db = open_database(database or data_dir / "edgeforge.db")
    claims = ClaimStore(db, coordinator_id or data_dir_identity(data_dir), claim_ttl_s)
    store = ArtifactStore(db, data_dir, open_blobs(blobs, data_dir / "blob-cache") if blobs else None)
    state = CoordinatorState(db)
    tokens = TokenStore(db)
    server_metrics = ServerMetrics()
    metrics = CoordinatorMetrics(server_metrics.registry, state)
    ctx = CoordinatorContext(store, state, Scheduler(state, lease_ttl_s=lease_ttl_s, max_attempts=max_attempts,
                                                     lease_lapses=metrics.lease_lapses),
                             workers=None, device_wait_s=device_wait_s, tokens=tokens,
                             ownership=Ownership(Grants(db), state, tokens), metrics=metrics, claims=claims)
    ctx.admin_token = ensure_token_file(tokens, data_dir / ADMIN_TOKEN_FILE, "admin", "coordinator (internal)")
    builds = servicer.Builds(ctx)
    registrations = [*servicer.registrations(ctx, builds), artifacts_servicer.registration(store, ctx.ownership),
                     *devices_servicer.registrations(ctx), tokens_servicer.registration(tokens)]
    private = []
    if workers is None:
        access = LocalArtifacts(store, data_dir / "cache")
        registrations += [calibrator.registration(access), compressor.registration(access),
                          exporter.registration(access)]
        if tls is not None:        # the coordinator reaches its embedded workers on a private unix socket
            private = [f"unix:{_socket_path(data_dir)}"]
    guard = [AuthInterceptor(tokens.verify)] if auth else []
    server, port, _ = bootstrap.create_server(address, registrations, max_workers=MAX_WORKERS, interceptors=guard,
                                              tls=tls, extra_ports=private, metrics=server_metrics)
    if metrics_address:
        try:
            ctx.metrics_endpoint = server_metrics.serve(metrics_address)
        except (ValueError, OSError):
            server.stop(0)
            raise
        ctx.metrics_port = ctx.metrics_endpoint.port
    embedded = workers is None
    if embedded:
        host = address.rsplit(":", 1)[0]
        self_address = private[0] if private else f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{port}"
        workers = {"calibrator": self_address, "compressor": self_address, "exporter": self_address}
        worker_tls = None
    # Embedded workers live and die with this process: nothing to health-check.
    ctx.workers = Workers(workers["calibrator"], workers["compressor"], workers["exporter"], token=ctx.admin_token,
                          tls=worker_tls, health_interval_s=None if embedded else 2.0)
    metrics.watch_workers(ctx.workers)
    log.info("coordinator %s: metadata in %s, blobs in %s; claims last %g s", claims.coordinator_id, db.target,
             blobs or data_dir / "blobs", claim_ttl_s)
    # Resumes unfinished builds nobody runs, and later takes dead coordinators' builds over.
    builds.start_claimer(server, lambda: release_identity(data_dir))
    return server, port, ctx


def _socket_path(data_dir: Path) -> Path:
    """data_dir/workers.sock, or a private temporary directory where that path is too long for a socket."""
    path = data_dir.resolve() / "workers.sock"
    if len(str(path)) >= 100:
        path = Path(tempfile.mkdtemp(prefix="edgeforge-")) / "workers.sock"
    path.unlink(missing_ok=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="edgeforge coordinator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=Path(".edgeforge"))
    parser.add_argument("--calibrator", help="calibrator replicas: host:port, or several separated by commas (omit "
                                             "all three of --calibrator, --compressor, --exporter to embed them)")
    parser.add_argument("--compressor", help="compressor replicas: host:port[,host:port...]")
    parser.add_argument("--exporter", help="exporter replicas: host:port[,host:port...]")
    parser.add_argument("--no-auth", action="store_true",
                        help="accept every call without a token (a closed test network only)")
    parser.add_argument("--worker-tls-ca", type=Path,
                        help="the standalone workers serve TLS signed by this CA (with mutual TLS, --tls-cert and "
                             "--tls-key are also this coordinator's client certificate)")
    bootstrap.add_server_tls_args(parser)
    bootstrap.add_observability_args(parser)
    add_cluster_args(parser)
    args = parser.parse_args()
    logs.configure_from_args(parser, args, service="coordinator")
    given = [args.calibrator, args.compressor, args.exporter]
    if any(given) and not all(given):
        parser.error("give all of --calibrator, --compressor and --exporter, or none to embed them")
    try:
        workers = ({role: parse_addresses(text, f"--{role}") for role, text in
                    zip(("calibrator", "compressor", "exporter"), given)} if all(given) else None)
    except ValueError as error:
        parser.error(str(error))
    try:
        worker_tls = bootstrap.client_tls_from_files(args.worker_tls_ca, args.tls_cert if args.worker_tls_ca else None,
                                                     args.tls_key if args.worker_tls_ca else None)
    except ValueError as error:
        parser.error(str(error))
    try:
        server, port, ctx = create_server(f"{args.host}:{args.port}", args.data_dir, workers, auth=not args.no_auth,
                                          tls=bootstrap.server_tls_from_args(parser, args), worker_tls=worker_tls,
                                          metrics_address=args.metrics_address, **cluster_options(parser, args))
    except (ValueError, OSError) as error:
        parser.error(str(error))
    except EdgeforgeError as error:       # a bad --database/--blobs, or a server there that refuses us
        parser.error(storage_error_message(args, error))
    # One write, newline included: log lines from other threads share the stream (unbuffered under -u).
    print(f"coordinator listening on {args.host}:{port}\n", end="", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(5))
    server.wait_for_termination()
    if ctx.metrics_endpoint is not None:
        ctx.metrics_endpoint.stop()


if __name__ == "__main__":
    main()
