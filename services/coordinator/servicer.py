"""Coordinator and google.longrunning.Operations servicers: builds as long-running operations.

Every handler asks ctx.ownership first (services/coordinator/ownership.py): a builder sees only its
own builds and operations, and may build only from artifacts it may read.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from typing import Callable

import grpc
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
WAIT_POLL_S = 1.0          # how often a waiter looks at the database for builds run by other coordinators


def parse_build_id(name: str, prefix: str = "builds/", field: str = "name") -> str:
    build_id = name.removeprefix(prefix)
    if not name.startswith(prefix) or not build_id or len(build_id) > 64 or \
            not all(c.isalnum() or c == "-" for c in build_id):
        raise InvalidArgument(f"{field} must look like '{prefix}{{id}}', got {name[:100]!r}", field=field)
    return build_id


class Builds:
    """Runs the builds this coordinator holds the claim of (services/coordinator/claims.py) and renders
    their operations. Several coordinators may share one database: each build runs on exactly one."""

    def __init__(self, ctx: CoordinatorContext):
        self.ctx = ctx
        self._threads: dict[str, threading.Thread] = {}

    def start(self, build_id: str) -> None:
        """Claims a build just created here and runs it. When another coordinator's claimer took it first
        (between its creation and this claim), that coordinator runs it."""
        epoch = self.ctx.claims.claim(build_id)
        if epoch is None:
            log.info("builds/%s is already run by coordinator %s", build_id, self.ctx.claims.owner(build_id))
            return
        self._run(build_id, epoch)

    def _run(self, build_id: str, epoch: int) -> None:
        try:
            runner = BuildRunner(build_id, self.ctx, epoch)
        except BaseException:           # e.g. the build was deleted meanwhile: hold no claim nobody runs
            self.ctx.claims.release(build_id, epoch)
            raise
        thread = threading.Thread(target=self._run_and_release, args=(runner,), name=f"build-{build_id}",
                                  daemon=True)
        self._threads[build_id] = thread
        thread.start()

    def _run_and_release(self, runner: BuildRunner) -> None:
        try:
            runner.run()
        finally:
            try:
                self.ctx.claims.release(runner.build_id, runner.epoch)
            except Exception as error:      # e.g. the database is out of reach: the claim lapses after its ttl
                log.warning("%s: could not release its claim: %s: %s", runner.build.name, type(error).__name__, error)

    def claim_unowned(self) -> list[str]:
        """Takes and runs every unfinished build that nobody runs: at a restart those of this database that
        were cut short, later those whose coordinator died (its claim lapsed). Memoised stages are reused."""
        taken = []
        while (claimed := self.ctx.claims.claim_next()) is not None:
            build_id, epoch = claimed
            log.info("resuming builds/%s (epoch %d)", build_id, epoch)
            self._run(build_id, epoch)
            taken.append(build_id)
        return taken

    def start_claimer(self, server: grpc.Server, on_stop: Callable[[], None] = lambda: None) -> None:
        """Every ttl/3 until `server` terminates, renews the claims held and takes over unowned builds;
        then stops renewing, so that another coordinator takes over what this one still held, and calls
        `on_stop`."""
        interval_s = self.ctx.claims.ttl_s / 3

        def loop() -> None:
            while server.wait_for_termination(timeout=interval_s):       # True: timed out, still serving
                try:
                    self.ctx.claims.renew()
                    self.claim_unowned()
                except Exception as error:      # e.g. the database is out of reach for a while: the loop goes on
                    log.warning("claimer: could not renew or take builds: %s: %s", type(error).__name__, error)
            on_stop()

        self.claim_unowned()
        threading.Thread(target=loop, name="build-claimer", daemon=True).start()

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
        """Waits for the build to end. A build run by another coordinator sends no notification here: the
        database is looked at again at least every second."""
        deadline = time.monotonic() + timeout_s
        with self.ctx.changed:
            while not self.ctx.state.load_build(build_id)[2] and (remaining := deadline - time.monotonic()) > 0:
                self.ctx.changed.wait(min(remaining, WAIT_POLL_S))
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
