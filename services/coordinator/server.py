"""The coordinator server, alone or embedded.

    python -m services.coordinator.server --port N --calibrator H:P --compressor H:P --exporter H:P
    (or `edgeforge up`, which embeds all four services in one process on one port)

Embedded, the worker services are registered on the coordinator's own server and reach the
artifact store directly; alone, they are separate processes that use it over gRPC. Between the two,
only configuration changes: the coordinator always calls the workers through their gRPC stubs.
"""
from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

import grpc

from services.calibrator import servicer as calibrator
from services.compressor import servicer as compressor
from services.coordinator import artifacts_servicer, devices_servicer, servicer
from services.coordinator.context import CoordinatorContext
from services.coordinator.scheduler import Scheduler
from services.coordinator.state import CoordinatorState
from services.coordinator.workers import Workers
from services.exporter import servicer as exporter
from shared import server as bootstrap
from shared.artifact_access import LocalArtifacts
from shared.auth import AuthInterceptor, TokenStore
from shared.store.artifacts import ArtifactStore
from shared.store.database import Database

log = logging.getLogger(__name__)
# Each agent device holds a LeaseJob long-poll and sends heartbeats; builds and transfers need threads
# too. gRPC's sync server runs one call per thread, so the pool is sized for a fleet, not a laptop.
MAX_WORKERS = 256


def create_server(address: str, data_dir: Path, workers: dict[str, str] | None = None, *,
                  device_wait_s: float = 120.0, lease_ttl_s: float = 30.0, max_attempts: int = 3,
                  agent_auth: bool = True) -> tuple[grpc.Server, int, CoordinatorContext]:
    """Starts a coordinator. `workers` maps calibrator/compressor/exporter to addresses; None embeds them.
    With `agent_auth` (the default) every AgentGateway call needs a live token of the agent role."""
    db = Database(data_dir / "edgeforge.db")
    store = ArtifactStore(db, data_dir)
    state = CoordinatorState(db)
    tokens = TokenStore(db)
    ctx = CoordinatorContext(store, state, Scheduler(state, lease_ttl_s=lease_ttl_s, max_attempts=max_attempts),
                             workers=None, device_wait_s=device_wait_s, tokens=tokens)
    builds = servicer.Builds(ctx)
    registrations = [*servicer.registrations(ctx, builds), artifacts_servicer.registration(store),
                     *devices_servicer.registrations(ctx)]
    if workers is None:
        access = LocalArtifacts(store, data_dir / "cache")
        registrations += [calibrator.registration(access), compressor.registration(access),
                          exporter.registration(access)]
    guard = [AuthInterceptor(tokens, {"edgeforge.v1.AgentGateway": ("agent",)})] if agent_auth else []
    server, port, _ = bootstrap.create_server(address, registrations, max_workers=MAX_WORKERS, interceptors=guard)
    host = address.rsplit(":", 1)[0]
    self_address = f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{port}"
    workers = workers or {"calibrator": self_address, "compressor": self_address, "exporter": self_address}
    ctx.workers = Workers(workers["calibrator"], workers["compressor"], workers["exporter"])
    builds.resume_unfinished()
    return server, port, ctx


def main() -> None:
    parser = argparse.ArgumentParser(description="edgeforge coordinator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=Path(".edgeforge"))
    parser.add_argument("--calibrator", help="calibrator address host:port (omit all three to embed them)")
    parser.add_argument("--compressor")
    parser.add_argument("--exporter")
    parser.add_argument("--no-agent-auth", action="store_true",
                        help="let agents in without a token (a closed test network only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s coordinator %(levelname)s %(message)s")
    given = [args.calibrator, args.compressor, args.exporter]
    if any(given) and not all(given):
        parser.error("give all of --calibrator, --compressor and --exporter, or none to embed them")
    workers = dict(zip(("calibrator", "compressor", "exporter"), given)) if all(given) else None
    server, port, _ = create_server(f"{args.host}:{args.port}", args.data_dir, workers,
                                    agent_auth=not args.no_agent_auth)
    print(f"coordinator listening on {args.host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(5))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
