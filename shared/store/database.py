"""The metadata database behind one small interface: SQLite (embedded, the default) or PostgreSQL.

Everything edgeforge stores besides blobs — artifacts, uploads, builds, jobs, leases, tokens, grants —
goes through `Database`:

    with db.transaction() as conn:            # one serialized writer (SQLite's BEGIN IMMEDIATE)
        row = conn.execute("SELECT ... WHERE id = ?", (key,)).fetchone()
        conn.execute("UPDATE ... SET ... WHERE id = ?", (..., key))
    rows = db.query("SELECT ...", params)     # reads outside a transaction

SQL written against it is a portable subset of SQLite and PostgreSQL: `?` placeholders; column types
TEXT, INTEGER, REAL and BLOB (PostgreSQL maps them in CREATE and ALTER to TEXT, BIGINT, DOUBLE PRECISION and
BYTEA); upserts as `INSERT ... ON CONFLICT (col) DO UPDATE SET ... / DO NOTHING`; no `rowid` (tables that
need an order carry an explicit column); no PRAGMA (`columns(table)` introspects the schema). Rows
support `row["col"]` and `dict(row)`; BLOB columns come back as `bytes` on both.

`transaction()` is exclusive: at most one such transaction runs at a time against the database, across
threads and processes, so read-modify-write sequences need no further locking. `transaction(
exclusive=False)` is a plain transaction for code that locks rows itself: it appends `db.skip_locked`
to a SELECT (" FOR UPDATE SKIP LOCKED" on PostgreSQL; "" on SQLite, which has no row locks and where
every transaction holds the database's write lock anyway).

`Database(path)` still opens SQLite (as `pathlib.Path(...)` builds a PosixPath, calling the base
class picks the default implementation), so callers that predate the PostgreSQL backend keep working;
`open_database(target)` chooses by the target's form. The PostgreSQL implementation is in
shared/store/postgres.py.

SQLite: a single connection in WAL mode guarded by a lock; SQLite serialises writers anyway, and one
connection keeps transactions simple. A full disk (SQLITE_FULL) is ResourceExhausted with reason
STORAGE_FULL naming the database file; the transaction is rolled back, so the database keeps its
previous state.
"""
from __future__ import annotations

import abc
import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit

from shared.errors import InvalidArgument
from shared.store.blobs import storage_full

SQLITE_FULL = 13


class Database(abc.ABC):
    """The backend-neutral interface. `Database(path)` opens the SQLite default (see the module docstring)."""

    dialect: str = ""          # "sqlite" or "postgresql"
    skip_locked: str = ""      # appended to a SELECT that locks the rows it reads, skipping those locked
    target: str = ""           # where the database lives, fit for messages (never a password)
    IntegrityError: type[Exception] = Exception   # the driver's constraint violation (as DB-API connections name it)

    def __new__(cls, *args: Any, **kwargs: Any) -> "Database":
        if cls is Database:
            cls = SqliteDatabase
        return super().__new__(cls)

    @abc.abstractmethod
    def migrate(self, statements: list[str]) -> None:
        """Applies idempotent schema statements (CREATE TABLE IF NOT EXISTS ..., ALTER TABLE ... ADD COLUMN)."""

    @abc.abstractmethod
    def transaction(self, exclusive: bool = True) -> contextlib.AbstractContextManager[Any]:
        """A transaction: committed when the block ends, rolled back when it raises. Exclusive (the
        default): the only exclusive transaction running against this database, across processes."""

    @abc.abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """All rows of one read."""

    @abc.abstractmethod
    def columns(self, table: str) -> list[str]:
        """The table's column names in order; [] when the table does not exist."""

    @abc.abstractmethod
    def close(self) -> None:
        """Closes the connection; the object is unusable after."""


class SqliteDatabase(Database):
    dialect = "sqlite"
    skip_locked = ""
    IntegrityError = sqlite3.IntegrityError

    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.target = str(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                     timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")   # a committed row survives power loss
        self._conn.execute("PRAGMA foreign_keys=ON")

    def migrate(self, statements: list[str]) -> None:
        with self.transaction() as conn:
            for statement in statements:
                conn.execute(statement)

    @contextlib.contextmanager
    def transaction(self, exclusive: bool = True) -> Iterator[sqlite3.Connection]:
        # Always BEGIN IMMEDIATE, even when not exclusive: SQLite has no row locks, and a deferred
        # transaction that reads and then writes fails at once with SQLITE_BUSY when another process
        # wrote in between; taking the write lock up front makes it wait its turn instead.
        del exclusive
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    if self._conn.in_transaction:        # SQLite may have rolled back already (disk full)
                        self._conn.execute("ROLLBACK")
                    raise
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as error:
                if getattr(error, "sqlite_errorcode", None) != SQLITE_FULL:
                    raise
                raise storage_full(self.path, None, str(error)) from error

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def columns(self, table: str) -> list[str]:
        with self._lock:
            return [row["name"] for row in self._conn.execute("SELECT name FROM pragma_table_info(?)", (table,))]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_database(target: str | Path) -> Database:
    """The database at `target`: a file path or `sqlite:///abs/path` (SQLite), or
    `postgresql://user:password@host:port/dbname` (PostgreSQL; `postgres://` too)."""
    if isinstance(target, Path):
        return SqliteDatabase(target)
    if not target:
        raise InvalidArgument("the database is empty: give a file path, sqlite:///abs/path or "
                              "postgresql://user:password@host:port/dbname", field="database")
    scheme = target.split("://", 1)[0].lower() if "://" in target else ""
    if not scheme:
        return SqliteDatabase(Path(target))
    if scheme == "sqlite":
        parts = urlsplit(target)
        if parts.netloc or not parts.path.startswith("/"):
            raise InvalidArgument(f"{target!r} is not a SQLite URL: write sqlite:///absolute/path/edgeforge.db "
                                  "(three slashes, then the absolute path) or give the plain path",
                                  field="database")
        return SqliteDatabase(Path("/" + parts.path.lstrip("/")))
    if scheme in ("postgresql", "postgres"):
        from shared.store.postgres import PostgresDatabase
        return PostgresDatabase(target)
    raise InvalidArgument(f"unknown database scheme {scheme!r} in {_redact(target)}: use a file path, "
                          "sqlite:///abs/path or postgresql://user:password@host:port/dbname", field="database")


def _redact(target: str) -> str:
    """`target` without the password of its user info, for messages."""
    head, sep, rest = target.partition("://")
    authority, slash, path = rest.partition("/")
    if not sep or "@" not in authority:
        return target
    user_info, _, host = authority.rpartition("@")
    return f"{head}://{user_info.split(':', 1)[0]}@{host}{slash}{path}"
