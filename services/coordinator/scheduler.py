"""Benchmark jobs and their leases.

A job is measured by exactly one device: either one named device (a target with each_device), or
any device of a pool — the online devices matching the target's selector that have the runtime the
job needs. LeaseJob hands a device the first job it may run, by priority (higher first) and then
FIFO, under a lease with a TTL; heartbeats extend it. A lease that lapses (agent died, phone
unplugged) sends the job back to the queue, where another device of the pool can take it, until
`max_attempts` leases have lapsed — then the job fails with reason ATTEMPTS_EXHAUSTED. A result is
accepted once per lease (idempotent by lease id); a result for a lapsed or cancelled lease is
refused with LEASE_EXPIRED. A device holds at most `slots` leases (default 1, so measurements never
disturb each other): asking for work while at that limit abandons its oldest lease, which is what a
restarted agent does.

A coordinator that starts over an existing database gives every active lease one fresh TTL: its own
downtime must not count against agents that kept measuring through it (their heartbeats and results
resume on their own). A lease whose agent is gone too lapses after that TTL, as any other.

Every lapse is counted in `lease_lapses` (edgeforge_lease_lapses_total, services/coordinator/metrics.py)
when the coordinator passes that counter; a lease abandoned for new work is not a lapse.
"""
from __future__ import annotations

import json
import threading
import time
import uuid

from google.protobuf import timestamp_pb2
from google.rpc import status_pb2

from edgeforge.v1 import agent_pb2, common_pb2, coordinator_pb2
from services.coordinator import selectors
from services.coordinator.state import CANCELLED, FAILED, LEASED, QUEUED, SUCCEEDED, CoordinatorState
from shared import logs
from shared.errors import FailedPrecondition, NotFound
from shared.grpc_status import status_of

ACTIVE, EXPIRED, REPORTED = "ACTIVE", "EXPIRED", "REPORTED"


class Scheduler:
    def __init__(self, state: CoordinatorState, *, lease_ttl_s: float = 30.0, max_attempts: int = 3,
                 lease_lapses=None):
        self.state, self.db = state, state.db
        self.lease_ttl_s, self.max_attempts = lease_ttl_s, max_attempts
        self.lease_lapses = lease_lapses        # a prometheus_client Counter, or None
        self._wakeup = threading.Condition()
        self._enqueued = 0                      # bumped by every enqueue, so a waiter never misses one
        self.renew_active_leases()

    def renew_active_leases(self, now: float | None = None) -> int:
        """Extends every active lease to at least one TTL from `now` (at startup); returns how many."""
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            return conn.execute("UPDATE leases SET expire_time = ? WHERE state = ? AND expire_time < ?",
                                (now + self.lease_ttl_s, ACTIVE, now + self.lease_ttl_s)).rowcount

    def enqueue(self, build_id: str, candidate_id: str, device_id: str, job: agent_pb2.BenchmarkJob, *,
                selector: dict[str, str] | None = None, priority: int = 0) -> str:
        """Queues `job` for `device_id`, or with device_id "" for any device matching `selector`."""
        job_id = self.state.add_job(build_id, candidate_id, device_id, job, target=job.target,
                                    selector=selector, priority=priority)
        with self._wakeup:
            self._enqueued += 1
            self._wakeup.notify_all()
        return job_id

    @staticmethod
    def may_run(device: coordinator_pb2.Device, row, job: agent_pb2.BenchmarkJob | None = None) -> bool:
        """Whether `device` may lease the queued job `row`: its own, or its pool's with the runtime."""
        if row["device_id"]:
            if row["device_id"] != device.name.removeprefix("devices/"):
                return False
        elif not selectors.parse(json.loads(row["selector"] or "{}")).matches(device.attributes):
            return False
        job = job or agent_pb2.BenchmarkJob.FromString(row["job"])
        return not job.runtime or f"runtime:{job.runtime}" in device.attributes

    def expire_stale(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            self._expire(conn, now)

    def _expire(self, conn, now: float) -> None:
        for lease in conn.execute("SELECT * FROM leases WHERE state = ? AND expire_time < ?", (ACTIVE, now)).fetchall():
            self._release(conn, lease["id"], lease["job_id"], f"lease {lease['id']} lapsed without a heartbeat")
            if self.lease_lapses is not None:
                self.lease_lapses.inc()

    def _release(self, conn, lease_id: str, job_id: str, why: str) -> None:
        conn.execute("UPDATE leases SET state = ? WHERE id = ?", (EXPIRED, lease_id))
        job = conn.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if job["attempts"] >= self.max_attempts:
            error = status_of(FailedPrecondition(f"{why}; gave up after {job['attempts']} attempts",
                                                 reason="ATTEMPTS_EXHAUSTED"))
            error.code = 4                                   # DEADLINE_EXCEEDED: no device finished it in time
            conn.execute("UPDATE jobs SET state = ?, outcome = ?, lease_id = NULL WHERE id = ?",
                         (FAILED, error.SerializeToString(), job_id))
        else:
            conn.execute("UPDATE jobs SET state = ?, lease_id = NULL WHERE id = ?", (QUEUED, job_id))

    def lease(self, device_id: str, wait_s: float) -> agent_pb2.Lease | None:
        logs.bind(device=f"devices/{device_id}")                        # for the rest of this call's log lines
        device, _ = self.state.device(device_id)                        # NOT_FOUND for strangers
        slots = max(device.slots, 1)
        deadline = time.monotonic() + wait_s
        while True:
            now = time.time()
            with self._wakeup:
                seen = self._enqueued
            with self.db.transaction() as conn:
                self._expire(conn, now)
                held = conn.execute("SELECT * FROM leases WHERE device_id = ? AND state = ? ORDER BY expire_time",
                                    (device_id, ACTIVE)).fetchall()
                for lease in held[:max(len(held) - slots + 1, 0)]:
                    self._release(conn, lease["id"], lease["job_id"], "the device asked for new work instead")
                row = next((r for r in conn.execute("SELECT * FROM jobs WHERE state = ? ORDER BY priority DESC, "
                                                    "create_time, id", (QUEUED,))
                            if self.may_run(device, r)), None)
                if row is not None:
                    lease_id = uuid.uuid4().hex
                    expire = now + self.lease_ttl_s
                    conn.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?)", (lease_id, row["id"], device_id,
                                                                              ACTIVE, expire))
                    conn.execute("UPDATE jobs SET state = ?, lease_id = ?, attempts = attempts + 1 WHERE id = ?",
                                 (LEASED, lease_id, row["id"]))
                    expire_time = timestamp_pb2.Timestamp()
                    expire_time.FromNanoseconds(int(expire * 1e9))
                    return agent_pb2.Lease(name=f"leases/{lease_id}", job=agent_pb2.BenchmarkJob.FromString(row["job"]),
                                           expire_time=expire_time, attempt=row["attempts"] + 1)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with self._wakeup:                  # an enqueue since `seen` was read: look again at once
                if self._enqueued == seen:
                    self._wakeup.wait(min(remaining, 1.0))

    def heartbeat(self, device_id: str, lease_names: list[str]) -> list[str]:
        """Extends the device's named leases; returns those it must abandon."""
        now = time.time()
        logs.bind(device=f"devices/{device_id}")
        self.state.touch_device(device_id, now)
        cancelled = []
        with self.db.transaction() as conn:
            self._expire(conn, now)
            for name in lease_names:
                lease_id = name.removeprefix("leases/")
                updated = conn.execute("UPDATE leases SET expire_time = ? WHERE id = ? AND device_id = ? AND state = ?",
                                       (now + self.lease_ttl_s, lease_id, device_id, ACTIVE)).rowcount
                if not updated:
                    cancelled.append(name)
        return cancelled

    def report(self, lease_name: str, measurement: common_pb2.Measurement | None,
               error: status_pb2.Status | None) -> bool:
        """Records a lease's outcome. True when recorded now, False when it had been already."""
        lease_id = lease_name.removeprefix("leases/")
        with self.db.transaction() as conn:
            self._expire(conn, time.time())                  # a result after the TTL is late, swept or not
            lease = conn.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if lease is None:
                raise NotFound(f"lease {lease_name} does not exist")
            if lease["state"] == REPORTED:
                return False
            if lease["state"] != ACTIVE:
                raise FailedPrecondition(f"lease {lease_name} has {lease['state'].lower()}; its result is not "
                                         "accepted (the job was requeued or cancelled)", reason="LEASE_EXPIRED")
            if measurement is not None:
                conn.execute("UPDATE jobs SET state = ?, outcome = ?, measured_by = ? WHERE id = ?",
                             (SUCCEEDED, measurement.SerializeToString(), lease["device_id"], lease["job_id"]))
            else:
                conn.execute("UPDATE jobs SET state = ?, outcome = ?, measured_by = ? WHERE id = ?",
                             (FAILED, error.SerializeToString(), lease["device_id"], lease["job_id"]))
            conn.execute("UPDATE leases SET state = ? WHERE id = ?", (REPORTED, lease_id))
        return True

    def lease_artifact(self, lease_name: str) -> str:
        """The artifact name an active lease may fetch."""
        lease_id = lease_name.removeprefix("leases/")
        rows = self.db.query("SELECT l.state, j.job FROM leases l JOIN jobs j ON j.id = l.job_id WHERE l.id = ?",
                             (lease_id,))
        if not rows:
            raise NotFound(f"lease {lease_name} does not exist")
        if rows[0]["state"] != ACTIVE:
            raise FailedPrecondition(f"lease {lease_name} is {rows[0]['state'].lower()}", reason="LEASE_EXPIRED")
        return agent_pb2.BenchmarkJob.FromString(rows[0]["job"]).artifact

    def cancel_build(self, build_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("UPDATE leases SET state = ? WHERE state = ? AND job_id IN "
                         "(SELECT id FROM jobs WHERE build_id = ?)", (CANCELLED, ACTIVE, build_id))
            conn.execute("UPDATE jobs SET state = ? WHERE build_id = ? AND state IN (?, ?)",
                         (CANCELLED, build_id, QUEUED, LEASED))
