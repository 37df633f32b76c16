"""The exporter service on its own: `python -m services.exporter.server --port N --coordinator HOST:PORT
--token-file ADMIN_TOKEN_FILE` (flags: shared.server.worker_main; every incoming call is checked with
the coordinator's Tokens.WhoAmI)."""
from __future__ import annotations

from services.exporter.servicer import registration
from shared import server as bootstrap


def main() -> None:
    bootstrap.worker_main("exporter", registration)


if __name__ == "__main__":
    main()
