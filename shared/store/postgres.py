"""The PostgreSQL metadata backend: `Database` (shared/store/database.py) over psycopg 3.

Design decisions
- One connection guarded by a re-entrant lock, as the SQLite backend: a coordinator's database work
  is short statements, and one connection per process keeps "the transaction of this thread" trivial.
  Processes (several coordinators) each hold their own connection; PostgreSQL arbitrates between them.
- Exclusive transactions take `pg_advisory_xact_lock(ADVISORY_LOCK_KEY)` as their first statement.
  Every exclusive transaction of every process waits for that one lock, which PostgreSQL releases at
  COMMIT or ROLLBACK, so they run one at a time — the semantics of SQLite's BEGIN IMMEDIATE that the
  callers were written for. Under READ COMMITTED each statement sees everything committed before it
  started, so a transaction that got the lock reads its predecessors' writes. Advisory locks are per
  database: two edgeforge installations on one server do not contend. `transaction(exclusive=False)`
  skips the lock, for code that locks rows with `SELECT ... FOR UPDATE SKIP LOCKED` (`skip_locked`).
- SQL arrives in the portable subset (see database.py): `?` becomes psycopg's `%s` and a literal `%`
  becomes `%%` (outside quoted strings and identifiers for `?`; everywhere for `%`, which psycopg
  parses everywhere); schema statements (CREATE, ALTER) get the types INTEGER, REAL and BLOB mapped
  to BIGINT, DOUBLE PRECISION and BYTEA (REAL would be 4 bytes here, not SQLite's 8; INTEGER 4 bytes, too small for
  sizes in bytes). Types are matched in upper case, as every schema here writes them.
- Rows are dicts (`row["col"]`, `dict(row)`); BYTEA comes back as `bytes`.
- A connection the server dropped (restart, failover, idle timeout) is replaced on the next use: a
  read or the start of a transaction retries once on a fresh connection. A transaction already under
  way when the connection drops fails with UNAVAILABLE (its statements cannot be replayed here); the
  caller's next call reconnects. The server ends a session idle in a transaction for IDLE_IN_TRANSACTION_S
  (and TCP keepalives notice a vanished peer), so a coordinator cut off mid-transaction cannot hold the
  exclusive lock for long. An unreachable server is UNAVAILABLE naming host:port; a wrong
  password, an unknown user or database is FAILED_PRECONDITION, and a malformed URL INVALID_ARGUMENT.
  No message ever carries the password.
"""
from __future__ import annotations

import contextlib
import functools
import re
import threading
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from shared.errors import FailedPrecondition, Internal, InvalidArgument, ResourceExhausted, Unavailable
from shared.store.database import Database, _redact

ADVISORY_LOCK_KEY = 0x6564676566_6F7267   # "edgeforg" in ASCII: the exclusive transactions' lock
CONNECT_TIMEOUT_S = 10
# A session idle inside a transaction this long is ended by the server, releasing its locks: a coordinator
# cut off mid-transaction (host gone, network split) must not hold the exclusive lock until TCP gives up.
IDLE_IN_TRANSACTION_S = 60
SCHEMA_TYPES = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "BLOB": "BYTEA"}
DISK_FULL = "53100"
_QUOTED = re.compile(r"""('(?:[^']|'')*'|"(?:[^"]|"")*")""")   # string literals and quoted identifiers
_TYPE_WORDS = re.compile(r"\b(" + "|".join(SCHEMA_TYPES) + r")\b")


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """Portable SQL to psycopg's: `?` placeholders to `%s` outside quotes, every literal `%` to `%%`;
    schema statements (CREATE, ALTER) also get PostgreSQL's types (`schema_sql`)."""
    if sql.lstrip()[:6].upper() in ("CREATE", "ALTER "):
        sql = schema_sql(sql)
    parts = _QUOTED.split(sql.replace("%", "%%"))
    return "".join(part if index % 2 else part.replace("?", "%s") for index, part in enumerate(parts))


def schema_sql(statement: str) -> str:
    """A portable schema statement with PostgreSQL's types (INTEGER → BIGINT, REAL → DOUBLE PRECISION,
    BLOB → BYTEA) outside quoted strings and identifiers."""
    parts = _QUOTED.split(statement)
    return "".join(part if index % 2 else _TYPE_WORDS.sub(lambda m: SCHEMA_TYPES[m.group(1)], part)
                   for index, part in enumerate(parts))


class PostgresConnection:
    """The connection inside a transaction: portable SQL in, psycopg cursors out."""

    def __init__(self, connection: psycopg.Connection):
        self._connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        return self._connection.execute(translate(sql), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> psycopg.Cursor:
        cursor = self._connection.cursor()
        cursor.executemany(translate(sql), [tuple(row) for row in rows])
        return cursor


class PostgresDatabase(Database):
    dialect = "postgresql"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    IntegrityError = psycopg.IntegrityError

    def __init__(self, url: str, *, connect_timeout_s: int = CONNECT_TIMEOUT_S,
                 idle_in_transaction_s: float = IDLE_IN_TRANSACTION_S):
        self.target = _redact(url)
        self.address = _check_url(url, self.target)
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        self._idle_in_transaction_ms = int(idle_in_transaction_s * 1000)
        self._lock = threading.RLock()
        self._depth = 0                     # open transactions on the connection (0 or 1)
        self._conn: psycopg.Connection | None = None
        self._connection()                  # a bad URL, password or database fails here, at startup

    # ------------------------------------------------------------------ connection
    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(
                    self._url, autocommit=True, row_factory=dict_row, connect_timeout=self._connect_timeout_s,
                    application_name="edgeforge", keepalives=1, keepalives_idle=30, keepalives_interval=10,
                    keepalives_count=3, options=f"-c idle_in_transaction_session_timeout={self._idle_in_transaction_ms}")
            except psycopg.OperationalError as error:
                raise self._connect_error(error) from error
        return self._conn

    def _connect_error(self, error: psycopg.OperationalError) -> Exception:
        why = _last_line(error)
        metadata = {"database": self.target}
        if "password authentication failed" in why or ("role" in why and "does not exist" in why):
            return FailedPrecondition(f"PostgreSQL at {self.address} refused the credentials in {self.target}: "
                                      f"{why}; check the user and password of --database", reason="DEPENDENCY_FAILED",
                                      metadata=metadata)
        if "database" in why and "does not exist" in why:
            return FailedPrecondition(f"PostgreSQL at {self.address}: {why}; create it (createdb) or fix the "
                                      f"database name in --database", reason="DEPENDENCY_FAILED", metadata=metadata)
        return Unavailable(f"cannot reach PostgreSQL at {self.address} ({self.target}): {why}; start the server "
                           "or fix the host and port of --database", metadata=metadata)

    def _lost(self, error: psycopg.Error) -> Exception:
        """A statement's error, typed: a dropped connection is UNAVAILABLE, a full disk STORAGE_FULL."""
        if getattr(error, "sqlstate", None) == DISK_FULL:
            return ResourceExhausted(f"PostgreSQL at {self.address} is out of disk space: {_last_line(error)}",
                                     reason="STORAGE_FULL", metadata={"database": self.target})
        if self._conn is not None and self._conn.broken:
            self._conn = None
            return Unavailable(f"lost the connection to PostgreSQL at {self.address} ({self.target}): "
                               f"{_last_line(error)}; the statement did not complete and the server rolls back an "
                               "uncommitted transaction; the next call reconnects", metadata={"database": self.target})
        return error

    def _fresh(self, attempt: int, error: psycopg.OperationalError) -> None:
        """After `error` on a statement: retry (return) when the connection had dropped and this was the
        first attempt, else raise the typed error."""
        broken = self._conn is not None and self._conn.broken
        if not broken or attempt or self._depth:
            self._raise_typed(error)
        self._conn = None

    def _raise_typed(self, error: psycopg.Error) -> None:
        typed = self._lost(error)
        if typed is error:
            raise error
        raise typed from error

    # ------------------------------------------------------------------ Database
    def migrate(self, statements: list[str]) -> None:
        with self.transaction() as conn:
            for statement in statements:
                conn.execute(statement)

    @contextlib.contextmanager
    def transaction(self, exclusive: bool = True) -> Iterator[PostgresConnection]:
        with self._lock:
            if self._depth:
                raise Internal("a transaction is already open on this thread; PostgreSQL (like SQLite) does not "
                               "nest them")
            conn = self._begin(exclusive)
            self._depth = 1
            try:
                try:
                    yield PostgresConnection(conn)
                except BaseException as error:
                    if not conn.broken:
                        with contextlib.suppress(psycopg.OperationalError):   # the server drops it anyway
                            conn.execute("ROLLBACK")
                    if isinstance(error, psycopg.Error):
                        self._raise_typed(error)
                    raise
                try:
                    conn.execute("COMMIT")
                except psycopg.Error as error:
                    self._raise_typed(error)
            finally:
                self._depth = 0

    def _begin(self, exclusive: bool) -> psycopg.Connection:
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.execute("BEGIN")
                if exclusive:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
                return conn
            except psycopg.OperationalError as error:
                if not conn.broken:
                    with contextlib.suppress(psycopg.OperationalError):
                        conn.execute("ROLLBACK")
                self._fresh(attempt, error)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            for attempt in (0, 1):
                conn = self._connection()
                try:
                    return conn.execute(translate(sql), tuple(params)).fetchall()
                except psycopg.OperationalError as error:
                    self._fresh(attempt, error)
            raise AssertionError("unreachable: the second attempt returns or raises")

    def columns(self, table: str) -> list[str]:
        rows = self.query("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                          "AND table_name = ? ORDER BY ordinal_position", (table.lower(),))
        return [row["column_name"] for row in rows]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _check_url(url: str, shown: str) -> str:
    """Validates a postgresql:// URL; returns its host:port for messages."""
    usage = "write postgresql://user:password@host:port/dbname"
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise InvalidArgument(f"{shown} is not a PostgreSQL URL: {usage}", field="database")
    try:
        port = parts.port or 5432
    except ValueError:
        raise InvalidArgument(f"{shown} has an invalid port: {usage} (the port a number, e.g. 5432)",
                              field="database") from None
    host = parts.hostname or dict(pair.partition("=")[::2] for pair in parts.query.split("&")).get("host")
    if not host:
        raise InvalidArgument(f"{shown} names no host: {usage}", field="database")
    if not parts.path.strip("/") or "/" in parts.path.strip("/"):
        raise InvalidArgument(f"{shown} names no database (or more than one path segment): {usage}",
                              field="database")
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError as error:
        raise InvalidArgument(f"{shown} is not a valid PostgreSQL URL ({_last_line(error)}): {usage}",
                              field="database") from None
    return f"{host}:{port}"


def _last_line(error: BaseException) -> str:
    """The most specific line of a libpq message, without the "connection failed: ..." preamble."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    first = first.rsplit(" failed: ", 1)[-1] if " failed: " in first else first
    return first.removeprefix("FATAL:").strip()
