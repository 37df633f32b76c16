"""The calibrator service on its own: `python -m services.calibrator.server --port N --coordinator HOST:PORT`."""
from __future__ import annotations

import grpc

from services.calibrator.servicer import registration
from shared.artifact_access import ArtifactAccess
from shared import server as bootstrap


def create_server(address: str, access: ArtifactAccess) -> tuple[grpc.Server, int]:
    server, port, _ = bootstrap.create_server(address, [registration(access)])
    return server, port


def main() -> None:
    bootstrap.worker_main("calibrator", registration)


if __name__ == "__main__":
    main()
