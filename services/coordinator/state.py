"""The coordinator's durable state in the metadata database (SQLite or PostgreSQL, shared/store/database.py):
builds (with their operation), memoised stage results, devices, and benchmark jobs with their leases.
Protos are stored as serialized bytes; every change is one transaction, so a crash leaves either the old or
the new state.

Crash recovery: a build counts its runs (`begin_run`; run 2 and later are resumes after a restart), and
`stage_runs` records, per run, every stage it ran or reused from the memo. A stage's memo entry and its
"ran" record are one transaction, so after a kill -9 the finished stages are exactly the memoised ones.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

from edgeforge.v1 import agent_pb2, coordinator_pb2
from shared.errors import AlreadyExists, NotFound
from shared.store.database import Database

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS builds (
        id TEXT PRIMARY KEY, request_id TEXT UNIQUE, request_hash TEXT NOT NULL, build BLOB NOT NULL,
        progress BLOB NOT NULL, done INTEGER NOT NULL, cancel_requested INTEGER NOT NULL,
        create_time REAL NOT NULL, runs INTEGER NOT NULL DEFAULT 0, state INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS memo (key TEXT PRIMARY KEY, value BLOB NOT NULL, create_time REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS stage_runs (
        build_id TEXT NOT NULL, run INTEGER NOT NULL, stage TEXT NOT NULL, key TEXT NOT NULL,
        reused INTEGER NOT NULL, create_time REAL NOT NULL, coordinator TEXT NOT NULL DEFAULT '',
        seq INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS stage_runs_by_build ON stage_runs(build_id, run)",
    """CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, device BLOB NOT NULL, last_heartbeat REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY, build_id TEXT NOT NULL, candidate_id TEXT NOT NULL, device_id TEXT NOT NULL,
        job BLOB NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL, lease_id TEXT,
        lease_expire REAL, outcome BLOB, create_time REAL NOT NULL, target TEXT NOT NULL DEFAULT '',
        selector TEXT NOT NULL DEFAULT '', priority INTEGER NOT NULL DEFAULT 0, measured_by TEXT)""",
    "CREATE INDEX IF NOT EXISTS jobs_by_device ON jobs(device_id, state, create_time)",
    "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, priority, create_time)",
    """CREATE TABLE IF NOT EXISTS leases (
        id TEXT PRIMARY KEY, job_id TEXT NOT NULL, device_id TEXT NOT NULL, state TEXT NOT NULL,
        expire_time REAL NOT NULL)""",
]

QUEUED, LEASED, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "LEASED", "SUCCEEDED", "FAILED", "CANCELLED"
# Columns added after the first release, for databases created before them: (table, column, declaration).
ADDED_COLUMNS = [("builds", "runs", "INTEGER NOT NULL DEFAULT 0"), ("builds", "state", "INTEGER NOT NULL DEFAULT 0"),
                 ("jobs", "target", "TEXT NOT NULL DEFAULT ''"), ("jobs", "selector", "TEXT NOT NULL DEFAULT ''"),
                 ("jobs", "priority", "INTEGER NOT NULL DEFAULT 0"), ("jobs", "measured_by", "TEXT"),
                 ("stage_runs", "coordinator", "TEXT NOT NULL DEFAULT ''"),
                 ("stage_runs", "seq", "INTEGER NOT NULL DEFAULT 0")]
# A build's stage_runs in the order they were recorded: one more than the build's last (every insert is in
# an exclusive transaction, so two never take the same number).
NEXT_SEQ = "(SELECT COALESCE(MAX(seq), 0) + 1 FROM stage_runs WHERE build_id = ?)"


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class CoordinatorState:
    def __init__(self, db: Database):
        self.db = db
        with db.transaction() as conn:          # older databases first get the columns added since
            for table, column, declaration in ADDED_COLUMNS:
                known = db.columns(table)
                if known and column not in known:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
                    if (table, column) == ("stage_runs", "seq"):
                        # Only SQLite databases predate seq: their rows keep the order SQLite kept for them
                        # (rowid, which grew with every insert).
                        conn.execute("UPDATE stage_runs SET seq = rowid")
        db.migrate(SCHEMA)
        with db.transaction() as conn:          # builds.state mirrors Build.state (metrics count it in SQL)
            for row in conn.execute("SELECT id, build FROM builds WHERE state = 0").fetchall():
                conn.execute("UPDATE builds SET state = ? WHERE id = ?",
                             (coordinator_pb2.Build.FromString(row["build"]).state, row["id"]))

    # ------------------------------------------------------------------ builds
    def create_build(self, build: coordinator_pb2.Build, progress: coordinator_pb2.BuildProgress,
                     request_id: str, request_hash: str) -> tuple[str, bool]:
        """Inserts a build; with a known request_id returns (existing id, False) or ALREADY_EXISTS."""
        with self.db.transaction() as conn:
            if request_id:
                row = conn.execute("SELECT id, request_hash FROM builds WHERE request_id = ?",
                                   (request_id,)).fetchone()
                if row is not None:
                    if row["request_hash"] != request_hash:
                        raise AlreadyExists(f"request_id {request_id!r} was already used for a different build spec",
                                            field="request_id")
                    return row["id"], False
            build_id = build.name.removeprefix("builds/")
            conn.execute("INSERT INTO builds (id, request_id, request_hash, build, progress, done, cancel_requested, "
                         "create_time, state) VALUES (?, ?, ?, ?, ?, 0, 0, ?, ?)",
                         (build_id, request_id or None, request_hash, build.SerializeToString(),
                          progress.SerializeToString(), time.time(), build.state))
        return build_id, True

    def save_build(self, build: coordinator_pb2.Build, progress: coordinator_pb2.BuildProgress, done: bool) -> None:
        with self.db.transaction() as conn:
            conn.execute("UPDATE builds SET build = ?, progress = ?, done = ?, state = ? WHERE id = ?",
                         (build.SerializeToString(), progress.SerializeToString(), int(done), build.state,
                          build.name.removeprefix("builds/")))

    def load_build(self, build_id: str) -> tuple[coordinator_pb2.Build, coordinator_pb2.BuildProgress, bool, bool]:
        rows = self.db.query("SELECT * FROM builds WHERE id = ?", (build_id,))
        if not rows:
            raise NotFound(f"build builds/{build_id} does not exist")
        row = rows[0]
        return (coordinator_pb2.Build.FromString(row["build"]), coordinator_pb2.BuildProgress.FromString(row["progress"]),
                bool(row["done"]), bool(row["cancel_requested"]))

    def list_builds(self, limit: int, offset: int) -> list[str]:
        rows = self.db.query("SELECT id FROM builds ORDER BY create_time DESC, id LIMIT ? OFFSET ?", (limit, offset))
        return [r["id"] for r in rows]

    def unfinished_builds(self) -> list[str]:
        return [r["id"] for r in self.db.query("SELECT id FROM builds WHERE done = 0 ORDER BY create_time")]

    def begin_run(self, build_id: str) -> int:
        """Counts a new run of the build (1 the first time; more after restarts) and returns its number."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE builds SET runs = runs + 1 WHERE id = ?", (build_id,))
            row = conn.execute("SELECT runs FROM builds WHERE id = ?", (build_id,)).fetchone()
        if row is None:
            raise NotFound(f"build builds/{build_id} does not exist")
        return row["runs"]

    def request_cancel(self, build_id: str) -> None:
        self.load_build(build_id)
        with self.db.transaction() as conn:
            conn.execute("UPDATE builds SET cancel_requested = 1 WHERE id = ?", (build_id,))

    def delete_build(self, build_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM jobs WHERE build_id = ?", (build_id,))
            conn.execute("DELETE FROM stage_runs WHERE build_id = ?", (build_id,))
            conn.execute("DELETE FROM builds WHERE id = ?", (build_id,))

    # ------------------------------------------------------------------ memo
    def memo_get(self, key: str) -> bytes | None:
        rows = self.db.query("SELECT value FROM memo WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def memo_put(self, key: str, value: bytes, *, build_id: str = "", run: int = 0, stage: str = "",
                 coordinator: str = "") -> None:
        """Memoises a stage's result; with `build_id`, records in the same transaction that its run ran it
        (on `coordinator`, the id of the coordinator that ran it)."""
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO memo (key, value, create_time) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE "
                         "SET value = excluded.value, create_time = excluded.create_time", (key, value, time.time()))
            if build_id:
                conn.execute("INSERT INTO stage_runs (build_id, run, stage, key, reused, create_time, coordinator, "
                             f"seq) VALUES (?, ?, ?, ?, 0, ?, ?, {NEXT_SEQ})",
                             (build_id, run, stage, key, time.time(), coordinator, build_id))

    def record_reuse(self, build_id: str, run: int, stage: str, key: str, *, coordinator: str = "") -> None:
        """Records that the build's run (on `coordinator`) took `stage`'s result from the memo instead of
        running it."""
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO stage_runs (build_id, run, stage, key, reused, create_time, coordinator, seq) "
                         f"VALUES (?, ?, ?, ?, 1, ?, ?, {NEXT_SEQ})",
                         (build_id, run, stage, key, time.time(), coordinator, build_id))

    def stage_runs(self, build_id: str) -> list[dict]:
        """Every stage the build ran or reused, in order: {run, stage, key, reused, create_time, coordinator}."""
        rows = self.db.query("SELECT run, stage, key, reused, create_time, coordinator FROM stage_runs "
                             "WHERE build_id = ? ORDER BY seq", (build_id,))
        return [dict(r) | {"reused": bool(r["reused"])} for r in rows]

    # ------------------------------------------------------------------ devices
    def upsert_device(self, device: coordinator_pb2.Device, now: float) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO devices (id, device, last_heartbeat) VALUES (?, ?, ?) ON CONFLICT (id) DO "
                         "UPDATE SET device = excluded.device, last_heartbeat = excluded.last_heartbeat",
                         (device.name.removeprefix("devices/"), device.SerializeToString(), now))

    def touch_device(self, device_id: str, now: float) -> None:
        with self.db.transaction() as conn:
            updated = conn.execute("UPDATE devices SET last_heartbeat = ? WHERE id = ?", (now, device_id)).rowcount
        if not updated:
            raise NotFound(f"device devices/{device_id} is not registered; call RegisterAgent first")

    def devices(self) -> list[tuple[coordinator_pb2.Device, float]]:
        rows = self.db.query("SELECT device, last_heartbeat FROM devices ORDER BY id")
        return [(coordinator_pb2.Device.FromString(r["device"]), r["last_heartbeat"]) for r in rows]

    def device(self, device_id: str) -> tuple[coordinator_pb2.Device, float]:
        rows = self.db.query("SELECT device, last_heartbeat FROM devices WHERE id = ?", (device_id,))
        if not rows:
            raise NotFound(f"device devices/{device_id} is not registered")
        return coordinator_pb2.Device.FromString(rows[0]["device"]), rows[0]["last_heartbeat"]

    # ------------------------------------------------------------------ jobs
    def add_job(self, build_id: str, candidate_id: str, device_id: str, job: agent_pb2.BenchmarkJob, *,
                target: str = "", selector: dict[str, str] | None = None, priority: int = 0,
                failed: bytes | None = None) -> str:
        """A QUEUED job for one device (`device_id`) or for any device of a pool (`selector`, device_id "");
        with `failed` (a serialized google.rpc.Status) a job that is already FAILED, e.g. no runtime."""
        job_id = uuid.uuid4().hex
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO jobs (id, build_id, candidate_id, device_id, job, state, attempts, outcome, "
                         "create_time, target, selector, priority) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
                         (job_id, build_id, candidate_id, device_id, job.SerializeToString(),
                          FAILED if failed else QUEUED, failed, time.time(), target,
                          json.dumps(selector or {}, sort_keys=True), priority))
        return job_id

    def jobs_of_build(self, build_id: str) -> list[dict]:
        return [dict(r) for r in self.db.query("SELECT * FROM jobs WHERE build_id = ? ORDER BY create_time",
                                               (build_id,))]
