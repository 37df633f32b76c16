"""services/coordinator/metrics.py: gauges read from real database rows at scrape time, the lease-lapse
counter where the scheduler lets a lease lapse, and builds counted as they finish."""
from __future__ import annotations

import time

import pytest
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry

from edgeforge.v1 import agent_pb2, coordinator_pb2
from services.coordinator.context import OFFLINE_AFTER_S
from services.coordinator.metrics import CoordinatorMetrics
from services.coordinator.scheduler import Scheduler
from services.coordinator.state import CoordinatorState
from shared.store.artifacts import ArtifactStore
from shared.store.records import ArtifactKind

SHA = "cd" * 32


@pytest.fixture
def db(database):                   # every test runs on SQLite and on PostgreSQL
    return database


def value(registry: CollectorRegistry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, labels)


def add_build(state: CoordinatorState, build_id: str, build_state: int, done: bool) -> coordinator_pb2.Build:
    build = coordinator_pb2.Build(name=f"builds/{build_id}", state=coordinator_pb2.BUILD_STATE_RUNNING)
    build.create_time.FromSeconds(int(time.time()) - 90)
    state.create_build(build, coordinator_pb2.BuildProgress(), "", build_id)
    build.state = build_state
    state.save_build(build, coordinator_pb2.BuildProgress(), done)
    return build


def test_the_gauges_are_the_rows_in_the_database_at_each_scrape(db, tmp_path):
    state, registry = CoordinatorState(db), CollectorRegistry()
    CoordinatorMetrics(registry, state)
    assert value(registry, "edgeforge_builds", state="running") == 0            # every state, even at zero
    assert value(registry, "edgeforge_benchmark_jobs", state="queued") == 0
    assert value(registry, "edgeforge_devices", state="online") == 0

    add_build(state, "b-run", coordinator_pb2.BUILD_STATE_RUNNING, done=False)
    add_build(state, "b-ok1", coordinator_pb2.BUILD_STATE_SUCCEEDED, done=True)
    add_build(state, "b-ok2", coordinator_pb2.BUILD_STATE_SUCCEEDED, done=True)
    add_build(state, "b-bad", coordinator_pb2.BUILD_STATE_FAILED, done=True)
    add_build(state, "b-rep", coordinator_pb2.BUILD_STATE_SUCCEEDED, done=False)   # writing its report: running
    job = agent_pb2.BenchmarkJob(artifact=f"artifacts/{SHA}")
    for candidate in ("c1", "c2", "c3"):
        state.add_job("b-run", candidate, "d1", job)
    state.add_job("b-run", "c4", "d1", job, failed=status_pb2.Status(code=9, message="no runtime").SerializeToString())
    now = time.time()
    state.upsert_device(coordinator_pb2.Device(name="devices/d1"), now)
    state.upsert_device(coordinator_pb2.Device(name="devices/d2"), now - OFFLINE_AFTER_S - 5)
    state.upsert_device(coordinator_pb2.Device(name="devices/d3"), now - 3600)
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(96))
    ArtifactStore(db, tmp_path / "blobs").put_file(tmp_path / "model.gguf", ArtifactKind.EXPORTED_MODEL)

    assert {s: value(registry, "edgeforge_builds", state=s) for s in ("running", "succeeded", "failed", "cancelled")} \
        == {"running": 2, "succeeded": 2, "failed": 1, "cancelled": 0}
    assert value(registry, "edgeforge_benchmark_jobs", state="queued") == 3      # the queue depth
    assert value(registry, "edgeforge_benchmark_jobs", state="failed") == 1
    assert value(registry, "edgeforge_benchmark_jobs", state="leased") == 0
    assert 0 <= value(registry, "edgeforge_benchmark_queue_oldest_age_seconds") < 60
    assert (value(registry, "edgeforge_devices", state="online"), value(registry, "edgeforge_devices",
                                                                        state="offline")) == (1, 2)
    assert value(registry, "edgeforge_artifacts", kind="exported_model") == 1
    assert value(registry, "edgeforge_artifact_size_bytes", kind="exported_model") == 100
    assert value(registry, "edgeforge_artifacts", kind="dataset") == 0

    state.delete_build("b-bad")                       # read afresh: nothing to drift
    assert value(registry, "edgeforge_builds", state="failed") == 0


def test_a_lapsed_lease_is_counted_and_an_abandoned_one_is_not(db):
    state, registry = CoordinatorState(db), CollectorRegistry()
    metrics = CoordinatorMetrics(registry, state)
    state.upsert_device(coordinator_pb2.Device(name="devices/d1"), time.time())
    scheduler = Scheduler(state, lease_ttl_s=0.05, max_attempts=3, lease_lapses=metrics.lease_lapses)
    for candidate in ("c1", "c2"):
        scheduler.enqueue("b1", candidate, "d1", agent_pb2.BenchmarkJob(artifact=f"artifacts/{SHA}"))
    scheduler.lease("d1", wait_s=0)
    assert value(registry, "edgeforge_benchmark_jobs", state="leased") == 1
    time.sleep(0.1)
    scheduler.expire_stale()
    assert value(registry, "edgeforge_lease_lapses_total") == 1
    assert value(registry, "edgeforge_benchmark_jobs", state="queued") == 2
    slow = Scheduler(state, lease_ttl_s=30.0, max_attempts=3, lease_lapses=metrics.lease_lapses)
    slow.lease("d1", wait_s=0)
    slow.lease("d1", wait_s=0)                        # a restarted agent abandons its lease: not a lapse
    assert value(registry, "edgeforge_lease_lapses_total") == 1


def test_finished_builds_are_counted_by_state_with_their_duration(db):
    state, registry = CoordinatorState(db), CollectorRegistry()
    metrics = CoordinatorMetrics(registry, state)
    assert value(registry, "edgeforge_builds_finished_total", state="failed") == 0
    metrics.build_finished(add_build(state, "b-1", coordinator_pb2.BUILD_STATE_FAILED, done=True))
    metrics.build_finished(add_build(state, "b-2", coordinator_pb2.BUILD_STATE_SUCCEEDED, done=True))
    assert value(registry, "edgeforge_builds_finished_total", state="failed") == 1
    assert value(registry, "edgeforge_builds_finished_total", state="succeeded") == 1
    assert value(registry, "edgeforge_build_duration_seconds_count", state="failed") == 1
    assert 89 <= value(registry, "edgeforge_build_duration_seconds_sum", state="failed") < 200
    assert value(registry, "edgeforge_build_duration_seconds_bucket", state="failed", le="60.0") == 0
    assert value(registry, "edgeforge_build_duration_seconds_bucket", state="failed", le="120.0") == 1


def test_an_older_database_gets_the_build_state_column_filled_from_its_builds(db):
    state = CoordinatorState(db)
    add_build(state, "b-old", coordinator_pb2.BUILD_STATE_CANCELLED, done=True)
    with db.transaction() as conn:                    # as a database from before the column looks after ALTER
        conn.execute("UPDATE builds SET state = 0")
    registry = CollectorRegistry()
    CoordinatorMetrics(registry, CoordinatorState(db))
    assert value(registry, "edgeforge_builds", state="cancelled") == 1
