"""The metadata database under test, on each backend: a test that asks for `database` runs twice, on a
fresh SQLite file and on a fresh PostgreSQL database (tests/backends/postgres.py's server).

`database_kind` is the parameter ("sqlite", "postgresql"); `database_url` the fresh database's target (a
path or a postgresql:// URL, for tests that reopen it); `database` the open Database, closed after the
test. `make_database` is the plain function behind them, for fixtures that add dimensions (blobs).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from shared.store.database import Database, open_database

DATABASE_KINDS = ["sqlite", "postgresql"]


def database_target(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database of `kind`: its path (SQLite) or URL (PostgreSQL, dropped after the test)."""
    if kind == "sqlite":
        return str(tmp_path / "state" / "edgeforge.db")
    if kind == "postgresql":
        return request.getfixturevalue("postgres_url")
    raise ValueError(f"unknown database kind {kind!r}; known: {', '.join(DATABASE_KINDS)}")


def make_database(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Database:
    """A fresh database of `kind`, opened, and closed when the test ends."""
    db = open_database(database_target(kind, tmp_path, request))
    request.addfinalizer(db.close)
    return db


@pytest.fixture(params=DATABASE_KINDS)
def database_kind(request) -> str:
    return request.param


@pytest.fixture
def database_url(database_kind, tmp_path, request) -> str:
    return database_target(database_kind, tmp_path, request)


@pytest.fixture
def database(database_url):
    db = open_database(database_url)
    yield db
    db.close()
