"""The Database interface on each backend (a real SQLite file, a real PostgreSQL database): exclusive
transactions serialize across connections, rollback, schema introspection, the portable upserts of the
token, grant and coordinator stores, and the migration of a SQLite database made by an older release."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from edgeforge.v1 import coordinator_pb2
from services.coordinator.state import CoordinatorState
from shared.auth import TokenStore
from shared.errors import Unauthenticated
from shared.store.database import Database, SqliteDatabase, open_database
from shared.store.grants import Grants

COUNTER = ["CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"]


def test_open_database_picks_the_backend(database, database_kind):
    assert database.dialect == database_kind
    assert database.skip_locked == ("" if database_kind == "sqlite" else " FOR UPDATE SKIP LOCKED")
    assert isinstance(database, Database)


def test_database_of_a_path_is_still_sqlite(tmp_path):
    db = Database(tmp_path / "old-callers.db")
    try:
        assert isinstance(db, SqliteDatabase) and db.dialect == "sqlite"
    finally:
        db.close()
    url = open_database(f"sqlite://{tmp_path}/by-url.db")
    url.close()
    assert (tmp_path / "by-url.db").is_file()


def test_exclusive_transactions_serialize_a_read_modify_write(database, database_url):
    """Two connections (two Database objects, as two processes would hold) each add 1 to a counter 40
    times by reading it, pausing, and writing read + 1: no increment is lost."""
    database.migrate(COUNTER)
    with database.transaction() as conn:
        conn.execute("INSERT INTO counter VALUES (1, 0)")
    other = open_database(database_url)
    failures = []

    def add(db: Database, times: int) -> None:
        try:
            for _ in range(times):
                with db.transaction() as conn:
                    n = conn.execute("SELECT n FROM counter WHERE id = 1").fetchone()["n"]
                    time.sleep(0.001)                     # widen the window a lost update would need
                    conn.execute("UPDATE counter SET n = ? WHERE id = 1", (n + 1,))
        except Exception as error:                        # reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=add, args=(db, 40)) for db in (database, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    other.close()
    assert not failures
    assert database.query("SELECT n FROM counter WHERE id = 1")[0]["n"] == 80


def test_an_exclusive_transaction_waits_for_the_one_in_progress(database, database_url):
    database.migrate(COUNTER)
    other = open_database(database_url)
    entered = threading.Event()

    def second() -> None:
        with other.transaction() as conn:
            entered.set()
            conn.execute("INSERT INTO counter VALUES (2, 2)")

    try:
        with database.transaction() as conn:
            conn.execute("INSERT INTO counter VALUES (1, 1)")
            waiter = threading.Thread(target=second)
            waiter.start()
            assert not entered.wait(0.5)          # the other connection cannot begin while this one runs
        assert entered.wait(30)
        waiter.join(30)
        assert [r["id"] for r in database.query("SELECT id FROM counter ORDER BY id")] == [1, 2]
    finally:
        other.close()


def test_a_failed_transaction_leaves_nothing(database):
    database.migrate(COUNTER)
    with pytest.raises(database.IntegrityError):
        with database.transaction() as conn:
            conn.execute("INSERT INTO counter VALUES (1, 0)")
            conn.execute("INSERT INTO counter VALUES (1, 0)")      # the primary key again
    assert database.query("SELECT COUNT(*) AS n FROM counter")[0]["n"] == 0
    with database.transaction() as conn:                           # the connection is usable after it
        conn.execute("INSERT INTO counter VALUES (1, 0)")
    assert database.query("SELECT COUNT(*) AS n FROM counter")[0]["n"] == 1


def test_columns_introspects_the_schema(database):
    assert database.columns("counter") == []
    database.migrate(COUNTER + ["ALTER TABLE counter ADD COLUMN note TEXT NOT NULL DEFAULT ''"])
    assert database.columns("counter") == ["id", "n", "note"]


def test_blob_columns_hold_any_bytes(database):
    database.migrate(["CREATE TABLE IF NOT EXISTS b (k TEXT PRIMARY KEY, v BLOB NOT NULL, t REAL NOT NULL, "
                      "i INTEGER NOT NULL)"])
    data = bytes(range(256)) * 3
    with database.transaction() as conn:
        conn.execute("INSERT INTO b VALUES (?, ?, ?, ?)", ("k", data, 1764300000.123456, 1 << 40))
    row = database.query("SELECT * FROM b")[0]
    assert type(row["v"]) is bytes and row["v"] == data
    assert row["t"] == 1764300000.123456 and row["i"] == 1 << 40     # REAL is 8 bytes, INTEGER 64 bits
    assert dict(row) == {"k": "k", "v": data, "t": 1764300000.123456, "i": 1 << 40}


def test_token_store_creates_verifies_and_revokes(database):
    tokens = TokenStore(database)
    token, secret = tokens.create("builder", "ci")
    assert tokens.verify(secret) == token
    assert tokens.revoke(token.id).revoked
    with pytest.raises(Unauthenticated):
        tokens.verify(secret)
    assert [t.id for t in tokens.list()] == [token.id]


def test_grants_upsert_and_ignore_duplicates(database):
    grants = Grants(database)
    grants.own_build("b1", "alice")
    grants.own_build("b1", "mallory")                   # ON CONFLICT DO NOTHING: the first owner stays
    assert grants.build_owner("b1") == "alice"
    grants.grant("alice", ["a" * 64, "b" * 64, "a" * 64], "upload")       # executemany, a duplicate inside
    grants.grant("alice", ["a" * 64], "build")
    assert grants.granted("alice") == {"a" * 64, "b" * 64}
    grants.bind_device("d1", "agent-1")
    grants.bind_device("d1", "agent-2")                 # ON CONFLICT DO UPDATE: the device re-registered
    assert grants.device_owner("d1") == "agent-2"
    grants.own_build("b2", "alice")
    assert sorted(grants.owned_builds("alice")) == ["b1", "b2"] and len(grants.owned_builds("alice", 1)) == 1


def test_stage_runs_keep_insertion_order(database):
    state = CoordinatorState(database)
    for stage in ("calibrate", "compress", "export"):
        state.memo_put(f"k-{stage}", b"result", build_id="b1", run=1, stage=stage)
    state.record_reuse("b1", 2, "calibrate", "k-calibrate")
    state.memo_put("k-compress", b"again", build_id="b1", run=2, stage="compress")      # the memo upserts
    assert [(r["run"], r["stage"], r["reused"]) for r in state.stage_runs("b1")] == [
        (1, "calibrate", False), (1, "compress", False), (1, "export", False), (2, "calibrate", True),
        (2, "compress", False)]
    assert state.memo_get("k-compress") == b"again"
    state.upsert_device(coordinator_pb2.Device(name="devices/d1", slots=1), 10.0)
    state.upsert_device(coordinator_pb2.Device(name="devices/d1", slots=2), 20.0)
    assert [(d.slots, seen) for d, seen in state.devices()] == [(2, 20.0)]


# The previous release's stage_runs and builds, as `CoordinatorState` created them before stage_runs had
# an explicit order (it relied on SQLite's rowid).
OLD_SCHEMA = [
    """CREATE TABLE builds (
        id TEXT PRIMARY KEY, request_id TEXT UNIQUE, request_hash TEXT NOT NULL, build BLOB NOT NULL,
        progress BLOB NOT NULL, done INTEGER NOT NULL, cancel_requested INTEGER NOT NULL,
        create_time REAL NOT NULL, runs INTEGER NOT NULL DEFAULT 0, state INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE stage_runs (
        build_id TEXT NOT NULL, run INTEGER NOT NULL, stage TEXT NOT NULL, key TEXT NOT NULL,
        reused INTEGER NOT NULL, create_time REAL NOT NULL)""",
]


def test_a_sqlite_database_of_the_previous_release_migrates(tmp_path):
    path = tmp_path / "edgeforge.db"
    with sqlite3.connect(path) as old:
        for statement in OLD_SCHEMA:
            old.execute(statement)
        # Same timestamps, stages not in alphabetical order: only the insertion order tells them apart.
        old.executemany("INSERT INTO stage_runs VALUES ('b1', 1, ?, ?, 0, 5.0)",
                        [("export", "k3"), ("calibrate", "k1"), ("compress", "k2")])
    old.close()
    db = Database(path)
    try:
        state = CoordinatorState(db)
        assert {"seq", "coordinator"} <= set(db.columns("stage_runs"))
        state.record_reuse("b1", 2, "calibrate", "k1")
        assert [(r["run"], r["stage"]) for r in state.stage_runs("b1")] == [
            (1, "export"), (1, "calibrate"), (1, "compress"), (2, "calibrate")]
    finally:
        db.close()
    reopened = Database(path)                                   # the migration runs once
    try:
        assert len(CoordinatorState(reopened).stage_runs("b1")) == 4
    finally:
        reopened.close()
