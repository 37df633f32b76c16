"""The real coordinator and agent of tests/integration (imported, so they are the same fixtures), and the
`edgeforge` command run as a real process against them."""
from __future__ import annotations

import pytest
from cli_process import run_cli

from tests.integration import conftest as integration

coordinator, agent = integration.coordinator, integration.agent      # the same fixtures, found here by name


@pytest.fixture
def cli(coordinator):
    """run_cli against the `coordinator` fixture, as its admin."""
    def run(*args: str, **kwargs):
        return run_cli(*args, address=coordinator.address, token=coordinator.admin_token, **kwargs)
    return run
