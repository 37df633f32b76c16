"""The PostgreSQL backend against a real server (tests/backends/postgres.py): the portable SQL it
translates, the types it maps, the advisory lock behind exclusive transactions, SKIP LOCKED, surviving a
server restart, and precise errors for a wrong password, an unreachable server or a bad URL."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable
from shared.store.database import open_database
from shared.store.postgres import ADVISORY_LOCK_KEY, PostgresDatabase, schema_sql, translate
from tests.backends.postgres import free_port

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def pg(postgres_url):
    db = open_database(postgres_url)
    yield db
    db.close()


def test_placeholders_become_psycopg_ones_outside_quotes():
    assert translate("SELECT * FROM t WHERE a = ? AND b LIKE 'x%' AND c = '?' AND \"d?\" = ?") == \
        "SELECT * FROM t WHERE a = %s AND b LIKE 'x%%' AND c = '?' AND \"d?\" = %s"
    assert translate("SELECT 'it''s ?', ?") == "SELECT 'it''s ?', %s"


def test_translated_statements_run(pg):
    row = pg.query("SELECT ? AS a, '?' AS q, '100%' AS p, ? || '%' AS s", (7, "50"))[0]
    assert dict(row) == {"a": 7, "q": "?", "p": "100%", "s": "50%"}


def test_schema_types_are_mapped_in_create_and_alter(pg):
    assert schema_sql("CREATE TABLE t (i INTEGER, r REAL, b BLOB, s TEXT DEFAULT 'INTEGER')") == \
        "CREATE TABLE t (i BIGINT, r DOUBLE PRECISION, b BYTEA, s TEXT DEFAULT 'INTEGER')"
    pg.migrate(["CREATE TABLE IF NOT EXISTS t (i INTEGER, r REAL, b BLOB, s TEXT)",
                "ALTER TABLE t ADD COLUMN added INTEGER NOT NULL DEFAULT 0"])
    types = {r["column_name"]: r["data_type"] for r in pg.query(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 't'")}
    assert types == {"i": "bigint", "r": "double precision", "b": "bytea", "s": "text", "added": "bigint"}


def test_bytes_round_trip_exactly(pg):
    pg.migrate(["CREATE TABLE IF NOT EXISTS blobs (k TEXT PRIMARY KEY, v BLOB NOT NULL)"])
    payloads = [b"", b"\x00", bytes(range(256)) * 64, b"%s?'"]
    with pg.transaction() as conn:
        conn.executemany("INSERT INTO blobs VALUES (?, ?)", [(str(i), v) for i, v in enumerate(payloads)])
    rows = pg.query("SELECT v FROM blobs ORDER BY k")
    assert [type(r["v"]) for r in rows] == [bytes] * 4 and [r["v"] for r in rows] == payloads


def test_without_the_lock_an_update_is_lost(pg, postgres_url):
    """The control for the exclusive-transaction tests: two plain transactions that read, then write
    read + 1, lose one increment; the same interleaving under `transaction()` cannot happen."""
    pg.migrate(["CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"])
    with pg.transaction() as conn:
        conn.execute("INSERT INTO counter VALUES (1, 0)")
    other = open_database(postgres_url)
    try:
        with pg.transaction(exclusive=False) as first:
            n = first.execute("SELECT n FROM counter").fetchone()["n"]
            with other.transaction(exclusive=False) as second:       # runs entirely inside the first
                m = second.execute("SELECT n FROM counter").fetchone()["n"]
                second.execute("UPDATE counter SET n = ?", (m + 1,))
            first.execute("UPDATE counter SET n = ?", (n + 1,))
        assert pg.query("SELECT n FROM counter")[0]["n"] == 1
    finally:
        other.close()


def test_exclusive_transactions_serialize_across_processes(pg, postgres_url):
    """Three processes and this one add 1 to a counter 25 times each, reading and then writing it."""
    pg.migrate(["CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"])
    with pg.transaction() as conn:
        conn.execute("INSERT INTO counter VALUES (1, 0)")
    script = ("import sys, time\n"
              "from shared.store.database import open_database\n"
              "db = open_database(sys.argv[1])\n"
              "for _ in range(25):\n"
              "    with db.transaction() as conn:\n"
              "        n = conn.execute('SELECT n FROM counter').fetchone()['n']\n"
              "        time.sleep(0.002)\n"
              "        conn.execute('UPDATE counter SET n = ?', (n + 1,))\n")
    children = [subprocess.Popen([sys.executable, "-c", script, postgres_url], cwd=ROOT) for _ in range(3)]
    for _ in range(25):
        with pg.transaction() as conn:
            n = conn.execute("SELECT n FROM counter").fetchone()["n"]
            conn.execute("UPDATE counter SET n = ?", (n + 1,))
    assert [child.wait(120) for child in children] == [0, 0, 0]
    assert pg.query("SELECT n FROM counter")[0]["n"] == 100


def test_skip_locked_passes_over_a_row_another_transaction_holds(pg, postgres_url):
    pg.migrate(["CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY)"])
    with pg.transaction() as conn:
        conn.executemany("INSERT INTO queue VALUES (?)", [(1,), (2,)])
    other = open_database(postgres_url)
    take = "SELECT id FROM queue ORDER BY id LIMIT 1" + pg.skip_locked
    try:
        with pg.transaction(exclusive=False) as first:
            assert first.execute(take).fetchone()["id"] == 1
            with other.transaction(exclusive=False) as second:
                assert second.execute(take).fetchone()["id"] == 2          # not blocked behind row 1
                assert second.execute(take.replace("LIMIT 1", "")).fetchall() == [{"id": 2}]
        with other.transaction(exclusive=False) as second:                 # released at commit
            assert second.execute(take).fetchone()["id"] == 1
    finally:
        other.close()


def test_the_database_survives_a_server_restart(pg, postgres_server):
    pg.migrate(["CREATE TABLE IF NOT EXISTS t (x INTEGER)"])
    with pg.transaction() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    postgres_server.restart()
    assert pg.query("SELECT x FROM t")[0]["x"] == 1          # a read reconnects by itself
    postgres_server.restart()
    with pg.transaction() as conn:                           # so does a transaction, before it starts
        conn.execute("INSERT INTO t VALUES (2)")
    with pytest.raises(Unavailable, match=f"lost the connection to PostgreSQL at 127.0.0.1:{postgres_server.port}"):
        with pg.transaction() as conn:                       # one the restart cuts is not committed
            conn.execute("INSERT INTO t VALUES (3)")
            postgres_server.restart()
            conn.execute("INSERT INTO t VALUES (4)")
    assert [r["x"] for r in pg.query("SELECT x FROM t ORDER BY x")] == [1, 2]


def test_a_wrong_password_is_a_precise_error(postgres_server, postgres_url):
    wrong = postgres_url.replace(postgres_server.password, "not-the-password")
    with pytest.raises(FailedPrecondition) as refused:
        open_database(wrong)
    message = refused.value.message
    assert f"127.0.0.1:{postgres_server.port}" in message and "password authentication failed" in message
    assert "not-the-password" not in message and postgres_server.password not in message


def test_a_missing_database_is_a_precise_error(postgres_server):
    with pytest.raises(FailedPrecondition, match='database "no_such_db" does not exist; create it'):
        open_database(postgres_server.url("no_such_db"))


def test_an_unreachable_server_is_unavailable(postgres_server):
    port = free_port()
    with pytest.raises(Unavailable) as unreachable:
        open_database(f"postgresql://postgres:secret-pw@127.0.0.1:{port}/edgeforge")
    assert f"cannot reach PostgreSQL at 127.0.0.1:{port}" in unreachable.value.message
    assert "Connection refused" in unreachable.value.message and "secret-pw" not in unreachable.value.message


@pytest.mark.parametrize("url, complaint", [
    ("postgresql://u:secret-pw@127.0.0.1:port/db", "invalid port"),
    ("postgresql://u:secret-pw@127.0.0.1:5432/", "names no database"),
    ("postgresql://u:secret-pw@:5432/db", "names no host"),
    ("postgresql://u:secret-pw@127.0.0.1:5432/db?colour=blue", "is not a valid PostgreSQL URL"),
    ("mysql://u:secret-pw@127.0.0.1/db", "unknown database scheme 'mysql'"),
])
def test_a_bad_url_is_invalid_argument(url, complaint):
    with pytest.raises(InvalidArgument) as bad:
        open_database(url)
    assert complaint in bad.value.message and "secret-pw" not in bad.value.message
    assert bad.value.field == "database"


def test_a_nested_transaction_is_refused(pg):
    with pg.transaction():
        with pytest.raises(Internal, match="does not nest"):
            with pg.transaction():
                pass
    assert isinstance(pg, PostgresDatabase) and pg.query("SELECT 1 AS one") == [{"one": 1}]


def test_store_check_reads_the_rows_from_postgresql(pg, postgres_url, tmp_path):
    from shared.errors import NotFound
    from shared.store.artifacts import ArtifactStore
    from shared.store.check import check_store
    from shared.store.records import ArtifactKind
    with pytest.raises(NotFound, match="table artifacts, uploads does not exist"):
        check_store(tmp_path, database=postgres_url)
    store = ArtifactStore(pg, tmp_path)
    (tmp_path / "model.bin").write_bytes(b"weights" * 100)
    record = store.put_file(tmp_path / "model.bin", ArtifactKind.MODEL)
    report = check_store(tmp_path, database=postgres_url)
    assert report.clean and report.artifacts == 1 and report.bytes_verified == record.size_bytes
    upload = store.create_upload(ArtifactKind.MODEL, 10, "c" * 64)
    with pg.transaction() as conn:                    # rows that contradict each other
        conn.execute("UPDATE uploads SET committed_bytes = 11 WHERE upload_id = ?", (upload.name.split("/")[-1],))
    problems = {p.kind: p for p in check_store(tmp_path, database=postgres_url).problems}
    assert set(problems) == {"DATABASE_INCONSISTENT", "LOST_UPLOAD_BYTES"}     # the part file has none of them
    assert "11 bytes committed of an upload of 10" in problems["DATABASE_INCONSISTENT"].detail


def test_a_holder_cut_off_mid_transaction_releases_the_lock(postgres_url):
    """A coordinator that stops talking inside an exclusive transaction (frozen, partitioned) is ended by
    the server after idle_in_transaction_s, so the others are not blocked behind it for good."""
    stuck = PostgresDatabase(postgres_url, idle_in_transaction_s=1)
    other = open_database(postgres_url)
    try:
        with pytest.raises(Unavailable, match="lost the connection"):
            with stuck.transaction() as conn:
                conn.execute("SELECT 1")
                with other.transaction(exclusive=False) as probe:      # the lock is held right now
                    assert not probe.execute("SELECT pg_try_advisory_xact_lock(?) AS got",
                                             (ADVISORY_LOCK_KEY,)).fetchone()["got"]
                time.sleep(2.5)                                        # idle past the timeout
                conn.execute("SELECT 1")
        with other.transaction() as conn:                              # the lock is free again
            conn.execute("SELECT 1")
        assert stuck.query("SELECT 1 AS one") == [{"one": 1}]          # and the stuck one reconnects
    finally:
        stuck.close()
        other.close()
