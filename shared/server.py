"""gRPC server bootstrap shared by every service: health checking and reflection always on."""
from __future__ import annotations

import logging
from concurrent import futures
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 8 << 20            # chunks are at most 4 MiB; leave room for the envelope
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]

# (add_XServicer_to_server, servicer instance, fully qualified service name)
Registration = tuple[Callable, object, str]


def create_server(address: str, registrations: Iterable[Registration], *, max_workers: int = 32,
                  interceptors: Iterable[grpc.ServerInterceptor] = ()) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Builds and starts a server on `address` ("127.0.0.1:0" picks a free port). Returns (server, port, health)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=CHANNEL_OPTIONS,
                         interceptors=list(interceptors))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health.SERVICE_NAME, reflection.SERVICE_NAME]
    for add, servicer, service_name in registrations:
        add(servicer, server)
        names.append(service_name)
        health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    server.start()
    log.info("serving %s on port %d", ", ".join(n.rsplit(".", 1)[-1] for n in names[2:]), port)
    return server, port, health_servicer


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def wait_ready(address: str, timeout_s: float = 30.0) -> None:
    """Blocks until the server at `address` answers its health check."""
    with channel(address) as ch:
        grpc.channel_ready_future(ch).result(timeout=timeout_s)
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)


def worker_main(name: str, registration_factory: Callable) -> None:
    """`python -m services.<name>.server`: one stateless worker service, using the coordinator's
    artifact store over gRPC with a local cache."""
    import argparse
    import signal
    from pathlib import Path

    from shared.artifact_access import RemoteArtifacts
    parser = argparse.ArgumentParser(description=f"edgeforge {name} service")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default 0)")
    parser.add_argument("--coordinator", required=True, help="coordinator address (host:port) for artifacts")
    parser.add_argument("--cache-dir", type=Path, default=Path(".edgeforge") / f"cache-{name}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    access = RemoteArtifacts(args.coordinator, args.cache_dir)
    server, port, _ = create_server(f"{args.host}:{args.port}", [registration_factory(access)])
    print(f"{name} listening on {args.host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(5))
    server.wait_for_termination()
