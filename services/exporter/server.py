"""The exporter service on its own: `python -m services.exporter.server --port N --coordinator HOST:PORT
--token-file ADMIN_TOKEN_FILE` (every incoming call is checked with the coordinator's Tokens.WhoAmI)."""
from __future__ import annotations

from typing import Callable

import grpc

from services.exporter.servicer import registration
from shared.artifact_access import ArtifactAccess
from shared import server as bootstrap
from shared.auth import AuthInterceptor, Token


def create_server(address: str, access: ArtifactAccess, verify: Callable[[str], Token] | None, *,
                  tls: bootstrap.ServerTls | None = None) -> tuple[grpc.Server, int]:
    """`verify` checks each call's bearer token (admin only): the coordinator's TokenStore.verify, or
    shared.auth.RemoteVerifier asking its Tokens.WhoAmI; None turns authentication off (closed test networks)."""
    guard = [AuthInterceptor(verify)] if verify is not None else []
    server, port, _ = bootstrap.create_server(address, [registration(access)], interceptors=guard, tls=tls)
    return server, port


def main() -> None:
    bootstrap.worker_main("exporter", registration)


if __name__ == "__main__":
    main()
