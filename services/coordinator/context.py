"""Everything a coordinator process shares between its RPC handlers and its build threads."""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING

from edgeforge.v1 import coordinator_pb2
from services.coordinator.claims import ClaimStore
from services.coordinator.scheduler import Scheduler
from services.coordinator.state import CoordinatorState
from services.coordinator.ownership import Ownership
from services.coordinator.workers import Workers
from shared.auth import TokenStore
from shared.store.artifacts import ArtifactStore

if TYPE_CHECKING:                           # metrics.py imports this module
    from services.coordinator.metrics import CoordinatorMetrics
    from shared.metrics import MetricsEndpoint

HEARTBEAT_INTERVAL_S = 5.0
OFFLINE_AFTER_S = 3 * HEARTBEAT_INTERVAL_S


@dataclasses.dataclass
class CoordinatorContext:
    store: ArtifactStore
    state: CoordinatorState
    scheduler: Scheduler
    workers: Workers
    device_wait_s: float = 120.0            # how long a build waits for a matching device to appear
    benchmark_timeout_s: float = 3600.0     # how long a build waits for its measurements
    changed: threading.Condition = dataclasses.field(default_factory=threading.Condition)
    tokens: TokenStore | None = None
    ownership: Ownership | None = None     # per-resource authorization (services/coordinator/ownership.py)
    admin_token: str = ""                   # the coordinator's own admin secret: it calls worker services with it
    metrics: CoordinatorMetrics | None = None        # counters of build and lease events
    metrics_endpoint: MetricsEndpoint | None = None  # the HTTP server of /metrics, when served
    metrics_port: int = 0                   # its port; 0 when not served
    claims: ClaimStore | None = None        # which builds this coordinator runs (services/coordinator/claims.py)

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def online_devices(self) -> list[coordinator_pb2.Device]:
        now = time.time()
        out = []
        for device, last in self.state.devices():
            online = now - last <= OFFLINE_AFTER_S
            device.state = coordinator_pb2.DEVICE_STATE_ONLINE if online else coordinator_pb2.DEVICE_STATE_OFFLINE
            if online:
                out.append(device)
        return out
