"""DeviceRegistry and AgentGateway servicers: agents register, heartbeat, lease, fetch, report.

A device belongs to the agent token that registered it (services/coordinator/ownership.py): only
that token may heartbeat, lease, report and fetch for it, and FetchArtifact serves only the artifact
of one of its live leases. Admins may act for any device.
"""
from __future__ import annotations

import re
import time

from edgeforge.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc
from services.coordinator import selectors
from services.coordinator.artifacts_servicer import read_chunks
from services.coordinator.context import HEARTBEAT_INTERVAL_S, CoordinatorContext
from shared.errors import InvalidArgument, NotFound
from shared.grpc_status import rpc, rpc_stream
from shared.store.records import parse_artifact_name

_DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_LEASE_WAIT_MS = 30_000


def parse_device_name(name: str, field: str = "device") -> str:
    device_id = name.removeprefix("devices/")
    if not name.startswith("devices/") or not _DEVICE_ID.match(device_id):
        raise InvalidArgument(f"{field} must look like 'devices/{{id}}' (lowercase letters, digits, '-'), "
                              f"got {name[:100]!r}", field=field)
    return device_id


class DeviceRegistryServicer(coordinator_pb2_grpc.DeviceRegistryServicer):
    def __init__(self, ctx: CoordinatorContext):
        self.ctx = ctx

    def _with_state(self, device: coordinator_pb2.Device, last: float) -> coordinator_pb2.Device:
        online = time.time() - last <= 3 * HEARTBEAT_INTERVAL_S
        device.state = coordinator_pb2.DEVICE_STATE_ONLINE if online else coordinator_pb2.DEVICE_STATE_OFFLINE
        device.last_heartbeat_time.FromNanoseconds(int(last * 1e9))
        return device

    @rpc
    def ListDevices(self, request, context):
        selector = selectors.parse(request.selector)
        devices = [self._with_state(d, last) for d, last in self.ctx.state.devices() if selector.matches(d.attributes)]
        return coordinator_pb2.ListDevicesResponse(devices=devices)

    @rpc
    def GetDevice(self, request, context):
        return self._with_state(*self.ctx.state.device(parse_device_name(request.name, "name")))


class AgentGatewayServicer(agent_pb2_grpc.AgentGatewayServicer):
    def __init__(self, ctx: CoordinatorContext):
        self.ctx = ctx

    @rpc
    def RegisterAgent(self, request, context):
        if not _DEVICE_ID.match(request.device_id):
            raise InvalidArgument(f"device_id must be 1-63 lowercase letters, digits or '-', got "
                                  f"{request.device_id[:100]!r}", field="device_id")
        for field in ("attributes", "unavailable_runtimes"):
            values = getattr(request, field)
            if len(values) > 256:
                raise InvalidArgument(f"{field} has {len(values)} entries; at most 256", field=field)
            for key, value in values.items():
                if not key or len(key) > 128 or len(value) > 1024:
                    raise InvalidArgument(f"{field} entry {key[:40]!r} has an empty/too long key or too long value",
                                          field=field)
        if not 0 <= request.slots <= 64:
            raise InvalidArgument(f"slots must be in [0, 64], got {request.slots}", field="slots")
        self.ctx.ownership.claim_device(request.device_id)
        now = time.time()
        device = coordinator_pb2.Device(name=f"devices/{request.device_id}",
                                        display_name=request.display_name or request.device_id,
                                        attributes=request.attributes, state=coordinator_pb2.DEVICE_STATE_ONLINE,
                                        slots=request.slots or 1, unavailable_runtimes=request.unavailable_runtimes)
        try:
            previous, _ = self.ctx.state.device(request.device_id)
            device.register_time.CopyFrom(previous.register_time)
        except NotFound:    # first registration
            device.register_time.FromNanoseconds(int(now * 1e9))
        device.last_heartbeat_time.FromNanoseconds(int(now * 1e9))
        self.ctx.state.upsert_device(device, now)
        self.ctx.notify()
        return device

    @rpc
    def Heartbeat(self, request, context):
        device_id = parse_device_name(request.device)
        self.ctx.ownership.check_device(device_id)
        cancelled = self.ctx.scheduler.heartbeat(device_id, list(request.leases))
        interval_s = min(HEARTBEAT_INTERVAL_S, self.ctx.scheduler.lease_ttl_s / 3)   # three beats per lease TTL
        return agent_pb2.HeartbeatResponse(cancelled_leases=cancelled, heartbeat_interval_ms=int(interval_s * 1000))

    @rpc
    def LeaseJob(self, request, context):
        device_id = parse_device_name(request.device)
        if not 0 <= request.wait_ms <= MAX_LEASE_WAIT_MS:
            raise InvalidArgument(f"wait_ms must be in [0, {MAX_LEASE_WAIT_MS}], got {request.wait_ms}",
                                  field="wait_ms")
        self.ctx.ownership.check_device(device_id)
        self.ctx.state.touch_device(device_id, time.time())
        lease = self.ctx.scheduler.lease(device_id, request.wait_ms / 1000)
        return agent_pb2.LeaseJobResponse(lease=lease) if lease else agent_pb2.LeaseJobResponse()

    @rpc
    def ReportResult(self, request, context):
        if not request.lease.startswith("leases/"):
            raise InvalidArgument(f"lease must look like 'leases/{{id}}', got {request.lease[:100]!r}", field="lease")
        outcome = request.WhichOneof("outcome")
        if outcome is None:
            raise InvalidArgument("give a measurement or an error", field="outcome")
        if outcome == "measurement" and not request.measurement.latency.samples_ms:
            raise InvalidArgument("measurement has no latency samples", field="measurement.latency.samples_ms")
        self.ctx.ownership.check_lease(request.lease)
        accepted = self.ctx.scheduler.report(request.lease, request.measurement if outcome == "measurement" else None,
                                             request.error if outcome == "error" else None)
        self.ctx.notify()
        return agent_pb2.ReportResultResponse(accepted=accepted)

    @rpc_stream
    def FetchArtifact(self, request, context):
        if not request.lease.startswith("leases/"):
            raise InvalidArgument(f"lease must look like 'leases/{{id}}', got {request.lease[:100]!r}", field="lease")
        self.ctx.ownership.check_lease(request.lease)       # the caller's device, then: the lease must be live
        artifact = self.ctx.scheduler.lease_artifact(request.lease)
        yield from read_chunks(self.ctx.store, parse_artifact_name(artifact), request.offset, request.chunk_size_bytes)


def registrations(ctx: CoordinatorContext):
    return [(coordinator_pb2_grpc.add_DeviceRegistryServicer_to_server, DeviceRegistryServicer(ctx),
             "edgeforge.v1.DeviceRegistry"),
            (agent_pb2_grpc.add_AgentGatewayServicer_to_server, AgentGatewayServicer(ctx), "edgeforge.v1.AgentGateway")]
