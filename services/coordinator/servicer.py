"""Coordinator and google.longrunning.Operations servicers: builds as long-running operations.

Every handler asks ctx.ownership first (services/coordinator/ownership.py): a builder sees only its
own builds and operations, and may build only from artifacts it may read.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import uuid

from google.longrunning import operations_pb2_grpc, operations_proto_pb2 as operations_pb2
from google.protobuf import empty_pb2

from edgeforge.v1 import coordinator_pb2, coordinator_pb2_grpc
from services.coordinator.context import CoordinatorContext
from services.coordinator.ownership import artifact_shas
from services.coordinator.pipeline import BuildRunner
from services.coordinator.spec import validate
from shared.errors import FailedPrecondition, InvalidArgument
from shared.grpc_status import rpc
from shared.paging import next_token, page

log = logging.getLogger(__name__)
SERVICE_NAME = "edgeforge.v1.Coordinator"
OPERATIONS_SERVICE_NAME = "google.longrunning.Operations"


def parse_build_id(name: str, prefix: str = "builds/", field: str = "name") -> str:
    build_id = name.removeprefix(prefix)
    if not name.startswith(prefix) or not build_id or len(build_id) > 64 or \
            not all(c.isalnum() or c == "-" for c in build_id):
        raise InvalidArgument(f"{field} must look like '{prefix}{{id}}', got {name[:100]!r}", field=field)
    return build_id


class Builds:
    """Starts build threads and renders their operations."""

    def __init__(self, ctx: CoordinatorContext):
        self.ctx = ctx
        self._threads: dict[str, threading.Thread] = {}

    def start(self, build_id: str) -> None:
        thread = threading.Thread(target=BuildRunner(build_id, self.ctx).run, name=f"build-{build_id}", daemon=True)
        self._threads[build_id] = thread
        thread.start()

    def resume_unfinished(self) -> None:
        """After a restart, re-run unfinished builds; memoised stages are reused, not redone."""
        for build_id in self.ctx.state.unfinished_builds():
            log.info("resuming builds/%s", build_id)
            self.start(build_id)

    def operation(self, build_id: str) -> operations_pb2.Operation:
        build, progress, done, _ = self.ctx.state.load_build(build_id)
        operation = operations_pb2.Operation(name=f"operations/{build_id}", done=done)
        operation.metadata.Pack(progress)
        if done:
            if build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED:
                operation.response.Pack(build)
            else:
                operation.error.CopyFrom(build.error)
        return operation

    def wait(self, build_id: str, timeout_s: float) -> operations_pb2.Operation:
        with self.ctx.changed:
            self.ctx.changed.wait_for(lambda: self.ctx.state.load_build(build_id)[2], timeout=timeout_s)
        return self.operation(build_id)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, ctx: CoordinatorContext, builds: Builds):
        self.ctx, self.builds = ctx, builds

    @rpc
    def CreateBuild(self, request, context):
        if len(request.request_id) > 128:
            raise InvalidArgument("request_id is longer than 128 characters", field="request_id")
        for sha256 in artifact_shas(request.spec):         # AIP-211: refuse others' inputs before looking them up
            self.ctx.ownership.check_artifact(sha256, field="spec")
        spec, _ = validate(request.spec, self.ctx.store)
        request_hash = hashlib.sha256(request.spec.SerializeToString(deterministic=True)).hexdigest()
        build_id = f"b-{uuid.uuid4().hex[:12]}"
        build = coordinator_pb2.Build(name=f"builds/{build_id}", spec=spec, state=coordinator_pb2.BUILD_STATE_RUNNING)
        build.create_time.GetCurrentTime()
        build.update_time.CopyFrom(build.create_time)
        progress = coordinator_pb2.BuildProgress(build=build.name, stage=coordinator_pb2.BUILD_STAGE_QUEUED,
                                                 message="queued", update_time=build.create_time)
        build_id, created = self.ctx.state.create_build(build, progress, request.request_id, request_hash)
        self.ctx.ownership.record_build(build_id, created)
        if created:
            self.builds.start(build_id)
        return self.builds.operation(build_id)

    def _owned(self, name: str) -> str:
        build_id = parse_build_id(name)
        self.ctx.ownership.check_build(build_id)
        return build_id

    @rpc
    def GetBuild(self, request, context):
        return self.ctx.state.load_build(self._owned(request.name))[0]

    @rpc
    def ListBuilds(self, request, context):
        size, offset = page(request.page_size, request.page_token, 50)
        ids = self.ctx.ownership.list_builds(size + 1, offset)
        return coordinator_pb2.ListBuildsResponse(builds=[self.ctx.state.load_build(i)[0] for i in ids[:size]],
                                                  next_page_token=next_token(offset, size, len(ids)))


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    def __init__(self, ctx: CoordinatorContext, builds: Builds):
        self.ctx, self.builds = ctx, builds

    def _owned(self, name: str) -> str:
        build_id = parse_build_id(name, "operations/")
        self.ctx.ownership.check_build(build_id)
        return build_id

    @rpc
    def GetOperation(self, request, context):
        return self.builds.operation(self._owned(request.name))

    @rpc
    def ListOperations(self, request, context):
        size, offset = page(request.page_size, request.page_token, 50)
        ids = self.ctx.ownership.list_builds(size + 1, offset)
        return operations_pb2.ListOperationsResponse(operations=[self.builds.operation(i) for i in ids[:size]],
                                                     next_page_token=next_token(offset, size, len(ids)))

    @rpc
    def WaitOperation(self, request, context):
        timeout_s = request.timeout.ToNanoseconds() / 1e9 if request.HasField("timeout") else 60.0
        remaining = context.time_remaining()
        if remaining is not None:
            timeout_s = min(timeout_s, max(remaining - 0.5, 0.0))
        return self.builds.wait(self._owned(request.name), timeout_s)

    @rpc
    def CancelOperation(self, request, context):
        build_id = self._owned(request.name)
        self.ctx.state.request_cancel(build_id)
        self.ctx.scheduler.cancel_build(build_id)
        self.ctx.notify()
        return empty_pb2.Empty()

    @rpc
    def DeleteOperation(self, request, context):
        build_id = self._owned(request.name)
        if not self.ctx.state.load_build(build_id)[2]:
            raise FailedPrecondition(f"operations/{build_id} is still running; cancel it first",
                                     reason="INVALID_FIELD", field="name")
        self.ctx.state.delete_build(build_id)
        return empty_pb2.Empty()


def registrations(ctx: CoordinatorContext, builds: Builds):
    return [(coordinator_pb2_grpc.add_CoordinatorServicer_to_server, CoordinatorServicer(ctx, builds), SERVICE_NAME),
            (operations_pb2_grpc.add_OperationsServicer_to_server, OperationsServicer(ctx, builds),
             OPERATIONS_SERVICE_NAME)]
