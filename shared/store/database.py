"""One SQLite database in WAL mode, shared by the artifact store and the coordinator's state.

A single connection guarded by a lock: SQLite serialises writers anyway, and one connection keeps
transactions simple. `transaction()` opens BEGIN IMMEDIATE so read-modify-write sequences are atomic.
A full disk (SQLITE_FULL) is ResourceExhausted with reason STORAGE_FULL naming the database file; the
transaction is rolled back, so the database keeps its previous state.
"""
from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Iterator

from shared.store.blobs import storage_full

SQLITE_FULL = 13


class Database:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                     timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")   # a committed row survives power loss
        self._conn.execute("PRAGMA foreign_keys=ON")

    def migrate(self, statements: list[str]) -> None:
        """Applies idempotent schema statements (CREATE TABLE IF NOT EXISTS ...)."""
        with self.transaction() as conn:
            for statement in statements:
                conn.execute(statement)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
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

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
