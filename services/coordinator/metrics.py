"""The coordinator's own Prometheus metrics, beside the RPC metrics of shared/metrics.py.

Gauges of what is in the database are read from it at scrape time by a custom collector, so they can
never drift from the truth (no shadow counts kept in memory), and every state is always present, at 0
when empty, so alerts see a series rather than an absence:

    edgeforge_builds{state}                       running, succeeded, failed, cancelled
    edgeforge_benchmark_jobs{state}               queued (the queue depth), leased, succeeded, failed, cancelled
    edgeforge_benchmark_queue_oldest_age_seconds  how long the oldest queued job has waited (0: none queued)
    edgeforge_devices{state}                      online, offline (by heartbeat age)
    edgeforge_artifacts{kind}, edgeforge_artifact_size_bytes{kind}   the artifact store's contents
    edgeforge_worker_replicas{role,state}         worker replicas by health: up, down, unknown (workers.py)

Events are counters and a histogram, counted where they happen, since this process started:

    edgeforge_lease_lapses_total                  leases that expired without a heartbeat (in scheduler.py)
    edgeforge_builds_finished_total{state}        builds that ended, by final state
    edgeforge_build_duration_seconds{state}       creation to end of each finished build

Label values are drawn from fixed sets (states, artifact kinds): never a build, device or token id.
"""
from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from edgeforge.v1 import coordinator_pb2
from services.coordinator.context import OFFLINE_AFTER_S
from services.coordinator.state import CANCELLED, FAILED, LEASED, QUEUED, SUCCEEDED, CoordinatorState
from services.coordinator.workers import ROLES, STATES, Workers
from shared.store.records import ArtifactKind

BUILD_STATES = {coordinator_pb2.BUILD_STATE_RUNNING: "running", coordinator_pb2.BUILD_STATE_SUCCEEDED: "succeeded",
                coordinator_pb2.BUILD_STATE_FAILED: "failed", coordinator_pb2.BUILD_STATE_CANCELLED: "cancelled"}
JOB_STATES = (QUEUED, LEASED, SUCCEEDED, FAILED, CANCELLED)
# Builds take from seconds (all stages memoised) to hours (QAT, many devices).
BUILD_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)


class CoordinatorMetrics:
    """The coordinator's counters and its database collector, registered in a server's registry."""

    def __init__(self, registry: CollectorRegistry, state: CoordinatorState):
        self.lease_lapses = Counter("edgeforge_lease_lapses_total",
                                    "Benchmark leases that expired without a heartbeat (their job went back to the "
                                    "queue, or failed after its last attempt).", registry=registry)
        self.builds_finished = Counter("edgeforge_builds_finished_total", "Builds that ended, by final state.",
                                       ["state"], registry=registry)
        self.build_seconds = Histogram("edgeforge_build_duration_seconds",
                                       "Time from a build's creation to its end, by final state.", ["state"],
                                       buckets=BUILD_BUCKETS_S, registry=registry)
        for label in BUILD_STATES.values():
            if label != "running":
                self.builds_finished.labels(label)
        registry.register(DatabaseCollector(state))
        self.registry = registry

    def watch_workers(self, workers: Workers) -> None:
        """Reports `workers`' replicas by role and health state on every scrape."""
        self.registry.register(WorkerReplicasCollector(workers))

    def build_finished(self, build: coordinator_pb2.Build) -> None:
        """Counts a build that just ended (called once per run that ends it)."""
        label = BUILD_STATES.get(build.state, "failed")
        self.builds_finished.labels(label).inc()
        created = build.create_time.ToNanoseconds() / 1e9
        if created > 0:
            self.build_seconds.labels(label).observe(max(time.time() - created, 0.0))


class DatabaseCollector(Collector):
    """Gauges read from the coordinator's database on every scrape (a few aggregate queries)."""

    def __init__(self, state: CoordinatorState):
        self.db = state.db

    def collect(self):
        now = time.time()
        builds = GaugeMetricFamily("edgeforge_builds", "Builds in the database, by state.", labels=["state"])
        counts = {row["state"]: row["n"] for row in self.db.query(        # not done is running, whatever it says
            "SELECT CASE WHEN done = 0 THEN ? ELSE state END AS state, COUNT(*) AS n FROM builds GROUP BY 1",
            (coordinator_pb2.BUILD_STATE_RUNNING,))}
        for value, label in BUILD_STATES.items():
            builds.add_metric([label], counts.get(value, 0))
        yield builds

        jobs = GaugeMetricFamily("edgeforge_benchmark_jobs", "Benchmark jobs by state; queued is the queue depth.",
                                 labels=["state"])
        counts = {row["state"]: row["n"] for row in self.db.query("SELECT state, COUNT(*) AS n FROM jobs "
                                                                  "GROUP BY state")}
        for state in JOB_STATES:
            jobs.add_metric([state.lower()], counts.get(state, 0))
        yield jobs
        oldest = self.db.query("SELECT MIN(create_time) AS t FROM jobs WHERE state = ?", (QUEUED,))[0]["t"]
        yield GaugeMetricFamily("edgeforge_benchmark_queue_oldest_age_seconds",
                                "How long the oldest queued benchmark job has waited (0 when none is queued).",
                                value=max(now - oldest, 0.0) if oldest is not None else 0.0)

        row = self.db.query("SELECT COUNT(*) AS total, COALESCE(SUM(CASE WHEN last_heartbeat >= ? THEN 1 ELSE 0 END), "
                            "0) AS online FROM devices", (now - OFFLINE_AFTER_S,))[0]
        devices = GaugeMetricFamily("edgeforge_devices", "Registered devices, online when heard from in the last "
                                    f"{OFFLINE_AFTER_S:g} s.", labels=["state"])
        devices.add_metric(["online"], row["online"])
        devices.add_metric(["offline"], row["total"] - row["online"])
        yield devices

        rows = {r["kind"]: r for r in self.db.query("SELECT kind, COUNT(*) AS n, SUM(size_bytes) AS size "
                                                    "FROM artifacts GROUP BY kind")}
        count = GaugeMetricFamily("edgeforge_artifacts", "Artifacts in the store, by kind.", labels=["kind"])
        size = GaugeMetricFamily("edgeforge_artifact_size_bytes", "Bytes of artifacts in the store, by kind.",
                                 labels=["kind"])
        for kind in ArtifactKind:
            found = rows.get(kind.value)
            count.add_metric([kind.value.lower()], found["n"] if found else 0)
            size.add_metric([kind.value.lower()], int(found["size"]) if found else 0)   # PostgreSQL: a Decimal
        yield count
        yield size


class WorkerReplicasCollector(Collector):
    """edgeforge_worker_replicas{role,state}: the replicas of each worker role by health, read from
    `Workers.snapshot()` at scrape time; every role and state is present, at 0 when none."""

    def __init__(self, workers: Workers):
        self.workers = workers

    def collect(self):
        counts = {(role, state): 0 for role in ROLES for state in STATES}
        for replica in self.workers.snapshot():
            counts[replica.role, replica.state] += 1
        replicas = GaugeMetricFamily("edgeforge_worker_replicas", "Worker replicas by role and health state (up, "
                                     "down, or unknown before the first probe or call).", labels=["role", "state"])
        for (role, state), count in counts.items():
            replicas.add_metric([role, state], count)
        yield replicas
