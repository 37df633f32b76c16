"""A real coordinator (embedded workers, authentication on) on 127.0.0.1:0 with its data in tmp_path.
Its client is authenticated as admin (the coordinator's own admin token)."""
from __future__ import annotations

import pytest

from clients.python.client import Client


@pytest.fixture
def coordinator(tmp_path):
    from services.coordinator.server import create_server
    server, port, ctx = create_server("127.0.0.1:0", tmp_path / "data", device_wait_s=2.0, lease_ttl_s=2.0)
    client = Client(f"127.0.0.1:{port}", token=ctx.admin_token)
    client.ctx = ctx
    client.admin_token = ctx.admin_token
    client.agent_token = ctx.tokens.create("agent", "integration-test agent")[1]
    client.agent_metadata = (("authorization", f"Bearer {client.agent_token}"),)
    yield client
    client.close()
    server.stop(0).wait()


@pytest.fixture
def agent(coordinator, tmp_path):
    """A real agent in a thread (its measurements are real processes), registered with `coordinator`."""
    import threading
    import time

    from clients.agent.main import Agent, AgentConfig
    worker = Agent(AgentConfig(coordinator.address, token=coordinator.agent_token, labels={"device": "test-host"},
                               cache_dir=tmp_path / "agent", cache_max_bytes=1 << 30, lease_wait_ms=2000))
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not coordinator.list_devices() and time.monotonic() < deadline:
        time.sleep(0.1)
    yield worker
    worker.stop()
    thread.join(timeout=30)
    assert not thread.is_alive()
