"""The calibrator service on its own: `python -m services.calibrator.server --port N --coordinator HOST:PORT
--token-file ADMIN_TOKEN_FILE` (flags: shared.server.worker_main; every incoming call is checked with
the coordinator's Tokens.WhoAmI)."""
from __future__ import annotations

import grpc

from services.calibrator.servicer import registration
from shared import server as bootstrap
from shared.artifact_access import ArtifactAccess


def create_server(address: str, access: ArtifactAccess, verify, *,
                  tls: bootstrap.ServerTls | None = None) -> tuple[grpc.Server, int]:
    """The calibrator on `address` (tests embed it this way); see shared.server.create_worker_server."""
    return bootstrap.create_worker_server(address, registration(access), verify, tls=tls)


def main() -> None:
    bootstrap.worker_main("calibrator", registration)


if __name__ == "__main__":
    main()
