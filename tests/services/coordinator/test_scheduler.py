"""Scheduler: benchmark jobs and leases on each metadata backend, a real SQLite file and a real PostgreSQL
database (CoordinatorState underneath)."""
from __future__ import annotations

import threading
import time

import pytest
from google.rpc import status_pb2

from edgeforge.v1 import agent_pb2, common_pb2, coordinator_pb2
from services.coordinator.scheduler import Scheduler
from services.coordinator.state import CANCELLED, FAILED, LEASED, QUEUED, SUCCEEDED, CoordinatorState
from shared.errors import FailedPrecondition, NotFound

SHA = "ab" * 32


@pytest.fixture
def state(database):
    state = CoordinatorState(database)
    for device in ("d1", "d2"):
        state.upsert_device(coordinator_pb2.Device(name=f"devices/{device}"), time.time())
    return state


@pytest.fixture
def scheduler(state) -> Scheduler:
    return Scheduler(state, lease_ttl_s=30.0, max_attempts=3)


def _job(candidate: str, build: str = "b1") -> agent_pb2.BenchmarkJob:
    return agent_pb2.BenchmarkJob(build=f"builds/{build}", candidate_id=candidate,
                                  artifact=f"artifacts/{SHA}", sha256=SHA, size_bytes=123)


def _enqueue(scheduler: Scheduler, candidate: str, device: str = "d1", build: str = "b1") -> str:
    return scheduler.enqueue(build, candidate, device, _job(candidate, build))


def _measurement(p90: float = 12.5) -> common_pb2.Measurement:
    return common_pb2.Measurement(latency=common_pb2.LatencyStats(p90_ms=p90, samples_ms=[p90]))


def _jobs(state: CoordinatorState, build: str = "b1") -> dict[str, dict]:
    return {row["candidate_id"]: row for row in state.jobs_of_build(build)}


def _far_future() -> float:
    return time.time() + 3600


# ---------------------------------------------------------------- leasing
def test_lease_hands_the_oldest_queued_job(scheduler, state):
    for candidate in ("c1", "c2", "c3"):
        _enqueue(scheduler, candidate)
    before = time.time()
    lease = scheduler.lease("d1", wait_s=0)
    assert lease.name.startswith("leases/")
    assert lease.job == _job("c1")
    assert lease.attempt == 1
    assert before + 30 <= lease.expire_time.ToNanoseconds() / 1e9 <= time.time() + 30
    jobs = _jobs(state)
    assert (jobs["c1"]["state"], jobs["c1"]["attempts"]) == (LEASED, 1)
    assert jobs["c1"]["lease_id"] == lease.name.removeprefix("leases/")
    assert jobs["c2"]["state"] == jobs["c3"]["state"] == QUEUED


def test_lease_only_hands_the_devices_own_jobs(scheduler):
    _enqueue(scheduler, "for-d2", device="d2")
    assert scheduler.lease("d1", wait_s=0) is None
    assert scheduler.lease("d2", wait_s=0).job.candidate_id == "for-d2"


def test_lease_on_unknown_device_is_not_found(scheduler):
    _enqueue(scheduler, "c1", device="ghost")
    with pytest.raises(NotFound) as info:
        scheduler.lease("ghost", wait_s=0)
    assert "devices/ghost" in info.value.message


def test_lease_without_work_returns_none_after_waiting(scheduler):
    start = time.monotonic()
    assert scheduler.lease("d1", wait_s=0.2) is None
    assert 0.15 <= time.monotonic() - start < 2.0


def test_waiting_lease_wakes_up_when_a_job_is_enqueued(scheduler):
    timer = threading.Timer(0.1, _enqueue, args=(scheduler, "late"))
    timer.start()
    start = time.monotonic()
    try:
        lease = scheduler.lease("d1", wait_s=5.0)
    finally:
        timer.join()
    assert lease is not None and lease.job.candidate_id == "late"
    assert time.monotonic() - start < 1.0


# ---------------------------------------------------------------- lapsed leases
def test_lapsed_lease_requeues_the_job_and_counts_the_attempt(scheduler, state):
    _enqueue(scheduler, "c1")
    first = scheduler.lease("d1", wait_s=0)
    scheduler.expire_stale(now=_far_future())
    job = _jobs(state)["c1"]
    assert (job["state"], job["attempts"], job["lease_id"]) == (QUEUED, 1, None)
    second = scheduler.lease("d1", wait_s=0)
    assert second.name != first.name
    assert second.attempt == 2
    assert _jobs(state)["c1"]["attempts"] == 2


def test_lease_lapses_with_a_tiny_ttl(state):
    scheduler = Scheduler(state, lease_ttl_s=0.05, max_attempts=3)
    _enqueue(scheduler, "c1")
    scheduler.lease("d1", wait_s=0)
    time.sleep(0.1)
    scheduler.expire_stale()
    assert _jobs(state)["c1"]["state"] == QUEUED


def test_job_fails_after_max_attempts_lapses(state):
    scheduler = Scheduler(state, lease_ttl_s=30.0, max_attempts=2)
    _enqueue(scheduler, "c1")
    for attempt in (1, 2):
        assert scheduler.lease("d1", wait_s=0).attempt == attempt
        scheduler.expire_stale(now=_far_future())
    job = _jobs(state)["c1"]
    assert (job["state"], job["attempts"], job["lease_id"]) == (FAILED, 2, None)
    error = status_pb2.Status.FromString(job["outcome"])
    assert "lapsed without a heartbeat" in error.message
    assert "gave up after 2 attempts" in error.message
    assert scheduler.lease("d1", wait_s=0) is None


def test_expire_stale_leaves_live_leases_alone(scheduler, state):
    _enqueue(scheduler, "c1")
    lease = scheduler.lease("d1", wait_s=0)
    scheduler.expire_stale()
    assert _jobs(state)["c1"]["state"] == LEASED
    assert scheduler.report(lease.name, _measurement(), None) is True


# ---------------------------------------------------------------- reporting
def test_report_is_accepted_once(scheduler, state):
    _enqueue(scheduler, "c1")
    lease = scheduler.lease("d1", wait_s=0)
    assert scheduler.report(lease.name, _measurement(12.5), None) is True
    assert scheduler.report(lease.name, _measurement(99.0), None) is False
    job = _jobs(state)["c1"]
    assert job["state"] == SUCCEEDED
    assert common_pb2.Measurement.FromString(job["outcome"]).latency.p90_ms == 12.5


def test_report_of_an_error_fails_the_job(scheduler, state):
    _enqueue(scheduler, "c1")
    lease = scheduler.lease("d1", wait_s=0)
    assert scheduler.report(lease.name, None, status_pb2.Status(code=13, message="runtime crashed"))
    job = _jobs(state)["c1"]
    assert job["state"] == FAILED
    assert status_pb2.Status.FromString(job["outcome"]).message == "runtime crashed"


def test_report_on_an_expired_lease_is_refused(scheduler, state):
    _enqueue(scheduler, "c1")
    lease = scheduler.lease("d1", wait_s=0)
    scheduler.expire_stale(now=_far_future())
    with pytest.raises(FailedPrecondition) as info:
        scheduler.report(lease.name, _measurement(), None)
    assert info.value.reason == "LEASE_EXPIRED"
    assert _jobs(state)["c1"]["state"] == QUEUED


def test_report_after_the_ttl_without_a_sweep_is_refused(state):
    scheduler = Scheduler(state, lease_ttl_s=0.05, max_attempts=3)
    _enqueue(scheduler, "c1")
    lease = scheduler.lease("d1", wait_s=0)
    time.sleep(0.1)
    with pytest.raises(FailedPrecondition):
        scheduler.report(lease.name, _measurement(), None)


def test_report_on_unknown_lease_is_not_found(scheduler):
    with pytest.raises(NotFound):
        scheduler.report("leases/nope", _measurement(), None)


def test_lease_artifact_only_while_active(scheduler):
    _enqueue(scheduler, "c1")
    lease = scheduler.lease("d1", wait_s=0)
    assert scheduler.lease_artifact(lease.name) == f"artifacts/{SHA}"
    scheduler.report(lease.name, _measurement(), None)
    with pytest.raises(FailedPrecondition) as info:
        scheduler.lease_artifact(lease.name)
    assert info.value.reason == "LEASE_EXPIRED"
    with pytest.raises(NotFound):
        scheduler.lease_artifact("leases/nope")


# ---------------------------------------------------------------- heartbeats
def test_heartbeat_extends_a_lease(scheduler, state):
    _enqueue(scheduler, "c1")
    lease = scheduler.lease("d1", wait_s=0)
    original_expiry = lease.expire_time.ToNanoseconds() / 1e9
    time.sleep(0.05)
    assert scheduler.heartbeat("d1", [lease.name]) == []
    scheduler.expire_stale(now=original_expiry + 0.01)      # the original expiry has passed
    assert _jobs(state)["c1"]["state"] == LEASED
    assert scheduler.report(lease.name, _measurement(), None) is True


def test_heartbeat_returns_unknown_and_foreign_leases_as_cancelled(scheduler):
    _enqueue(scheduler, "c1")
    lease = scheduler.lease("d1", wait_s=0)
    assert scheduler.heartbeat("d1", [lease.name, "leases/unknown"]) == ["leases/unknown"]
    assert scheduler.heartbeat("d2", [lease.name]) == [lease.name]


def test_heartbeat_cancels_a_lapsed_lease(state):
    scheduler = Scheduler(state, lease_ttl_s=0.05, max_attempts=3)
    _enqueue(scheduler, "c1")
    lease = scheduler.lease("d1", wait_s=0)
    time.sleep(0.1)
    assert scheduler.heartbeat("d1", [lease.name]) == [lease.name]
    assert _jobs(state)["c1"]["state"] == QUEUED


def test_heartbeat_records_the_device_and_refuses_strangers(scheduler, state):
    before = time.time()
    scheduler.heartbeat("d1", [])
    assert state.device("d1")[1] >= before
    with pytest.raises(NotFound):
        scheduler.heartbeat("ghost", [])


# ---------------------------------------------------------------- one lease per device
def test_asking_for_work_abandons_the_held_lease(scheduler, state):
    _enqueue(scheduler, "c1")
    _enqueue(scheduler, "c2")
    first = scheduler.lease("d1", wait_s=0)
    second = scheduler.lease("d1", wait_s=0)
    assert second.name != first.name
    assert (second.job.candidate_id, second.attempt) == ("c1", 2)   # requeued, still the oldest
    with pytest.raises(FailedPrecondition) as info:
        scheduler.report(first.name, _measurement(), None)
    assert info.value.reason == "LEASE_EXPIRED"
    assert scheduler.heartbeat("d1", [first.name, second.name]) == [first.name]


def test_abandoned_job_fails_when_out_of_attempts(state):
    scheduler = Scheduler(state, lease_ttl_s=30.0, max_attempts=1)
    _enqueue(scheduler, "c1")
    _enqueue(scheduler, "c2")
    scheduler.lease("d1", wait_s=0)
    assert scheduler.lease("d1", wait_s=0).job.candidate_id == "c2"
    job = _jobs(state)["c1"]
    assert job["state"] == FAILED
    assert "asked for new work instead" in status_pb2.Status.FromString(job["outcome"]).message


def test_leases_of_other_devices_are_not_abandoned(scheduler, state):
    _enqueue(scheduler, "c1", device="d1")
    _enqueue(scheduler, "c2", device="d2")
    held = scheduler.lease("d1", wait_s=0)
    scheduler.lease("d2", wait_s=0)
    assert scheduler.report(held.name, _measurement(), None) is True


# ---------------------------------------------------------------- cancellation
def test_cancel_build_cancels_queued_and_leased_jobs(scheduler, state):
    _enqueue(scheduler, "done")
    done = scheduler.lease("d1", wait_s=0)
    scheduler.report(done.name, _measurement(), None)
    _enqueue(scheduler, "leased")
    _enqueue(scheduler, "queued")
    _enqueue(scheduler, "other", build="b2")
    leased = scheduler.lease("d1", wait_s=0)
    assert leased.job.candidate_id == "leased"
    scheduler.cancel_build("b1")
    states = {c: row["state"] for c, row in _jobs(state).items()}
    assert states == {"done": SUCCEEDED, "leased": CANCELLED, "queued": CANCELLED}
    assert scheduler.heartbeat("d1", [leased.name]) == [leased.name]
    with pytest.raises(FailedPrecondition) as info:
        scheduler.report(leased.name, _measurement(), None)
    assert info.value.reason == "LEASE_EXPIRED"
    assert scheduler.lease("d1", wait_s=0).job.candidate_id == "other"
    assert _jobs(state, "b2")["other"]["state"] == LEASED


# ---------------------------------------------------------------- pools, priorities, runtimes, slots
def _register(state: CoordinatorState, device: str, slots: int = 1, **attributes) -> None:
    state.upsert_device(coordinator_pb2.Device(name=f"devices/{device}", attributes=attributes, slots=slots),
                        time.time())


def _pool_job(scheduler: Scheduler, candidate: str, selector: dict, *, build: str = "b1", priority: int = 0,
              runtime: str = "") -> str:
    job = _job(candidate, build)
    job.runtime, job.target = runtime, "pool"
    return scheduler.enqueue(build, candidate, "", job, selector=selector, priority=priority)


def test_a_pool_job_goes_to_any_matching_device_and_never_to_others(scheduler, state):
    _register(state, "phone-13", os="android", os_version="13")
    _register(state, "phone-15", os="android", os_version="15.0")
    _register(state, "laptop", os="linux")
    _pool_job(scheduler, "c1", {"os": "android", "os_version": "[13,15)"})
    assert scheduler.lease("laptop", wait_s=0) is None
    assert scheduler.lease("phone-15", wait_s=0) is None                   # 15 is outside [13,15)
    assert scheduler.lease("phone-13", wait_s=0).job.candidate_id == "c1"


def test_higher_priority_first_then_fifo(scheduler, state):
    _register(state, "dev", os="linux")
    for candidate, priority in (("low-1", 0), ("high-1", 5), ("low-2", 0), ("high-2", 5), ("urgent", 9)):
        _pool_job(scheduler, candidate, {"os": "linux"}, priority=priority)
    order = []
    for _ in range(5):
        lease = scheduler.lease("dev", wait_s=0)
        order.append(lease.job.candidate_id)
        scheduler.report(lease.name, _measurement(), None)
    assert order == ["urgent", "high-1", "high-2", "low-1", "low-2"]


def test_jobs_go_only_to_devices_with_the_runtime(scheduler, state):
    _register(state, "onnx-only", **{"os": "linux", "runtime:onnxruntime": "1.23"})
    _register(state, "both", **{"os": "linux", "runtime:onnxruntime": "1.23", "runtime:llama.cpp": "0.3"})
    _pool_job(scheduler, "gguf", {"os": "linux"}, runtime="llama.cpp")
    assert scheduler.lease("onnx-only", wait_s=0) is None
    assert scheduler.lease("both", wait_s=0).job.candidate_id == "gguf"


def test_a_lapsed_pool_job_completes_on_another_device(scheduler, state):
    _register(state, "a", os="linux")
    _register(state, "b", os="linux")
    _pool_job(scheduler, "c1", {"os": "linux"})
    first = scheduler.lease("a", wait_s=0)                          # then device a dies
    scheduler.expire_stale(now=_far_future())
    second = scheduler.lease("b", wait_s=0)
    assert second.job.candidate_id == "c1" and second.attempt == 2
    assert scheduler.report(second.name, _measurement(), None) is True
    row = _jobs(state)["c1"]
    assert (row["state"], row["measured_by"], row["attempts"]) == (SUCCEEDED, "b", 2)
    with pytest.raises(FailedPrecondition):                          # the dead device's late result
        scheduler.report(first.name, _measurement(), None)


def test_exhausted_attempts_fail_with_their_reason(state):
    from google.rpc import error_details_pb2
    scheduler = Scheduler(state, lease_ttl_s=30.0, max_attempts=1)
    _register(state, "a", os="linux")
    _pool_job(scheduler, "c1", {"os": "linux"})
    scheduler.lease("a", wait_s=0)
    scheduler.expire_stale(now=_far_future())
    error = status_pb2.Status.FromString(_jobs(state)["c1"]["outcome"])
    info = error_details_pb2.ErrorInfo()
    assert error.details[0].Unpack(info) and info.reason == "ATTEMPTS_EXHAUSTED"
    assert "gave up after 1 attempts" in error.message


def test_slots_let_a_device_hold_several_leases(scheduler, state):
    _register(state, "wide", slots=2, os="linux")
    for candidate in ("c1", "c2", "c3"):
        _pool_job(scheduler, candidate, {"os": "linux"})
    first, second = scheduler.lease("wide", wait_s=0), scheduler.lease("wide", wait_s=0)
    assert {first.job.candidate_id, second.job.candidate_id} == {"c1", "c2"}
    assert all(r["state"] == LEASED for r in _jobs(state).values() if r["candidate_id"] in ("c1", "c2"))
    third = scheduler.lease("wide", wait_s=0)                        # a third ask abandons the oldest lease
    jobs = _jobs(state)
    assert third.job.candidate_id in ("c1", "c3")
    assert sum(r["state"] == LEASED for r in jobs.values()) == 2
