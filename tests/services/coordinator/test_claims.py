"""Leased ownership of builds (services/coordinator/claims.py) and the fencing of build runners, with two
or more coordinators on one database: each ClaimStore has its own connection, as separate processes would,
on a SQLite file and on a real PostgreSQL server (tests/backends/postgres.py)."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from edgeforge.v1 import compressor_pb2, coordinator_pb2
from services.coordinator.claims import ClaimLost, ClaimStore
from services.coordinator.context import CoordinatorContext
from services.coordinator.pipeline import BuildRunner
from services.coordinator.scheduler import Scheduler
from services.coordinator.state import CoordinatorState, digest
from shared.store.artifacts import ArtifactStore
from shared.store.database import open_database

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def target(request, tmp_path) -> str:
    """Where the shared database lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "shared.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def connect(target):
    """Opens one more connection to the shared database (one per coordinator); all closed after the test."""
    opened = []

    def open_one():
        db = open_database(target)
        opened.append(db)
        CoordinatorState(db)                   # the builds table the claims refer to
        return db
    yield open_one
    for db in opened:
        db.close()


def new_build(db) -> str:
    build_id = f"b-{uuid.uuid4().hex[:12]}"
    build = coordinator_pb2.Build(name=f"builds/{build_id}", state=coordinator_pb2.BUILD_STATE_RUNNING)
    CoordinatorState(db).create_build(build, coordinator_pb2.BuildProgress(build=build.name), "", "hash")
    return build_id


def finish(db, build_id: str) -> None:
    state = CoordinatorState(db)
    build, progress, _, _ = state.load_build(build_id)
    build.state = coordinator_pb2.BUILD_STATE_SUCCEEDED
    state.save_build(build, progress, done=True)


def test_a_claimed_build_belongs_to_one_coordinator_until_its_claim_lapses(connect):
    a, b = ClaimStore(connect(), "a", ttl_s=1.5), ClaimStore(connect(), "b", ttl_s=1.5)
    build_id = new_build(a.db)
    assert a.claim(build_id) == 1
    assert b.claim(build_id) is None and b.claim_next() is None
    assert a.holds(build_id, 1) and not b.holds(build_id, 1) and b.owner(build_id) == "a"

    time.sleep(1.6)                              # a stopped renewing: it died, as far as anyone can tell
    assert not a.holds(build_id, 1)
    assert b.claim_next() == (build_id, 2)       # taken over, with the next epoch (the fencing token)
    assert b.holds(build_id, 2) and not a.holds(build_id, 1) and a.owner(build_id) == "b"
    assert a.renew() == [build_id] and a.held() == {}          # a, back, learns it lost the build
    assert a.claim(build_id) is None                            # and cannot take it back while b renews


def test_renewal_keeps_a_build_from_being_taken_over(connect):
    a, b = ClaimStore(connect(), "a", ttl_s=1.5), ClaimStore(connect(), "b", ttl_s=1.5)
    build_id = new_build(a.db)
    assert a.claim(build_id) == 1
    deadline = time.monotonic() + 5.0            # more than three ttls
    while time.monotonic() < deadline:
        assert a.renew() == []
        assert b.claim_next() is None
        time.sleep(0.5)                          # ttl/3
    assert a.holds(build_id, 1) and a.held() == {build_id: 1}


def test_unowned_builds_are_taken_once_and_released_ones_at_once(connect):
    a, b = ClaimStore(connect(), "a"), ClaimStore(connect(), "b")
    never_claimed = new_build(a.db)              # e.g. created before claims existed, or its creator died
    assert a.claim_next() == (never_claimed, 1)
    assert b.claim_next() is None

    a.release(never_claimed, 1)                  # its runner stopped before the build was done
    assert b.claim_next() == (never_claimed, 2) and b.owner(never_claimed) == "b"
    finish(b.db, never_claimed)
    b.release(never_claimed, 2)                  # done: the claim goes away and nobody takes the build again
    assert b.owner(never_claimed) == "" and a.claim_next() is None and b.claim_next() is None
    assert not b.db.query("SELECT * FROM build_claims WHERE build_id = ?", (never_claimed,))


def test_a_stale_release_does_not_free_the_new_owners_claim(connect):
    a, b = ClaimStore(connect(), "a", ttl_s=0.3), ClaimStore(connect(), "b", ttl_s=30)
    build_id = new_build(a.db)
    assert a.claim(build_id) == 1
    time.sleep(0.4)
    assert b.claim_next() == (build_id, 2)
    a.release(build_id, 1)                       # a's runner noticed late and let go of what it no longer has
    assert b.holds(build_id, 2) and b.owner(build_id) == "b"


def test_a_coordinator_restarted_under_its_id_takes_its_builds_back_at_once(connect):
    before = ClaimStore(connect(), "a", ttl_s=30)
    build_id = new_build(before.db)
    assert before.claim(build_id) == 1           # then the process is killed: its claim would last 30 s more
    other, restarted = ClaimStore(connect(), "b", ttl_s=30), ClaimStore(connect(), "a", ttl_s=30)
    assert restarted.claim_next() == (build_id, 2) and other.claim_next() is None
    assert not before.holds(build_id, 1)         # the previous life's runner, were it alive, is fenced off


def test_coordinators_looking_for_work_together_take_each_build_exactly_once(connect):
    """Four coordinators, twelve unowned builds, all asking at once (PostgreSQL: SKIP LOCKED)."""
    stores = [ClaimStore(connect(), f"c{i}") for i in range(4)]
    builds = {new_build(stores[0].db) for _ in range(12)}
    taken: dict[str, list] = {store.coordinator_id: [] for store in stores}
    start = threading.Barrier(len(stores))

    def take(store: ClaimStore) -> None:
        start.wait()
        while (claimed := store.claim_next()) is not None:
            taken[store.coordinator_id].append(claimed)

    threads = [threading.Thread(target=take, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    claimed = [build_id for claims in taken.values() for build_id, _ in claims]
    assert sorted(claimed) == sorted(builds)                   # every build once, none twice
    assert {epoch for claims in taken.values() for _, epoch in claims} == {1}
    for store in stores:
        assert store.held() == dict(taken[store.coordinator_id])


# ---------------------------------------------------------------------- fencing of a build runner
@pytest.fixture
def coordinators(connect, tmp_path):
    """Two coordinator contexts on the shared database (no servers: the runners' stages are called here)."""
    def context(name: str, ttl_s: float) -> CoordinatorContext:
        db = connect()
        state = CoordinatorState(db)
        return CoordinatorContext(ArtifactStore(db, tmp_path / name), state, Scheduler(state), workers=None,
                                  claims=ClaimStore(db, name, ttl_s=ttl_s))
    return context("a", 1.5), context("b", 30.0)


def test_a_runner_taken_over_stops_before_its_next_stage_and_records_nothing(coordinators):
    a, b = coordinators
    build_id = new_build(a.state.db)
    runner = BuildRunner(build_id, a, a.claims.claim(build_id))
    calls = []

    def stage(name):
        return lambda: calls.append(name) or compressor_pb2.ImportModelResponse(architecture=name)

    response, reused = runner.memoized("first", [1], stage("first"), compressor_pb2.ImportModelResponse, lambda r: [])
    assert response.architecture == "first" and not reused
    time.sleep(1.6)                                            # a froze for longer than its claim lasts
    assert b.claims.claim_next() == (build_id, 2)
    with pytest.raises(ClaimLost, match="now run by coordinator b"):
        runner.memoized("second", [2], stage("second"), compressor_pb2.ImportModelResponse, lambda r: [])
    with pytest.raises(ClaimLost):
        runner.save(done=True)
    assert calls == ["first"]                                  # the second stage never ran on a
    assert b.state.memo_get(digest(["second", [2]])) is None
    assert b.state.load_build(build_id)[2] is False            # and a did not end the build it lost
    runs = b.state.stage_runs(build_id)
    assert [(r["stage"], r["coordinator"], r["reused"]) for r in runs] == [("first", "a", False)]

    taker = BuildRunner(build_id, b, 2)                         # b resumes: a's finished stage is reused
    response, reused = taker.memoized("first", [1], stage("first"), compressor_pb2.ImportModelResponse, lambda r: [])
    assert reused and response.architecture == "first" and calls == ["first"]
    assert b.state.stage_runs(build_id)[-1] | {"create_time": 0} == {
        "run": 2, "stage": "first", "key": digest(["first", [1]]), "reused": True, "create_time": 0,
        "coordinator": "b"}


def test_a_result_that_arrives_after_a_takeover_is_not_recorded(coordinators):
    """The stage was in flight when its coordinator lost the build: the result is dropped, the new owner
    runs the stage itself (that is the one re-run allowed: after the first owner was taken for dead)."""
    a, b = coordinators
    build_id = new_build(a.state.db)
    runner = BuildRunner(build_id, a, a.claims.claim(build_id))

    def slow_stage():
        time.sleep(1.6)                                        # longer than a's unrenewed claim
        assert b.claims.claim_next() == (build_id, 2)
        return compressor_pb2.ImportModelResponse(architecture="late")

    with pytest.raises(ClaimLost):
        runner.memoized("import", [1], slow_stage, compressor_pb2.ImportModelResponse, lambda r: [])
    assert b.state.memo_get(digest(["import", [1]])) is None and b.state.stage_runs(build_id) == []
