"""A real PostgreSQL server for tests: Debian's postgresql binaries, one cluster per test session.

`PostgresServer` runs initdb into a temporary directory and postgres on 127.0.0.1 at a free port (its
Unix socket in that directory, so it never touches /var/run/postgresql). TCP connections authenticate
with SCRAM-SHA-256, so a wrong password fails the way it does in production; durability settings
are off (fsync, synchronous_commit, full_page_writes) because a test cluster never outlives a crash.
PostgreSQL refuses to run as root: as root the commands run as the `postgres` user, which owns the
directory.

Fixtures: `postgres_server` (session) and `postgres_url` (a fresh, empty database per test, dropped
after it).
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.backends import start_for_session

SUPERUSER = "postgres"


def postgres_bindir() -> Path | None:
    """The directory of initdb/pg_ctl: $EDGEFORGE_PG_BINDIR, Debian's newest /usr/lib/postgresql/*/bin, or PATH."""
    if os.environ.get("EDGEFORGE_PG_BINDIR"):
        return Path(os.environ["EDGEFORGE_PG_BINDIR"])
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if debian:
        return Path(debian[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1:`port`; the superuser `postgres` has password `password`."""

    def __init__(self, bindir: Path | None = None):
        bindir = bindir or postgres_bindir()
        if bindir is None or not (bindir / "initdb").is_file():
            raise FileNotFoundError("PostgreSQL's initdb was not found: install Debian's postgresql package "
                                    "or set EDGEFORGE_PG_BINDIR to the directory holding initdb and pg_ctl")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="edgeforge-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.password = secrets.token_hex(12)
        self.host = "127.0.0.1"
        self.port = 0
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout}"
                               f"{result.stderr}\n{log}")

    def start(self) -> "PostgresServer":
        if not self.data.exists():
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._as_postgres:
                shutil.chown(pwfile, "postgres", "postgres")
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--pwfile", str(pwfile), "--no-sync",
                      "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C")
            pwfile.unlink()
        for attempt in range(3):                # a free port may be taken between probing and binding it
            self.port = self.port or free_port()
            options = (f"-h {self.host} -p {self.port} -k {self.root} -c fsync=off -c synchronous_commit=off "
                       "-c full_page_writes=off -c max_connections=100")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options,
                          "start")
                return self
            except RuntimeError:
                if attempt == 2:
                    raise
                self.port = 0
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def restart(self) -> None:
        """Stops the server (every connection drops) and starts it again on the same port."""
        self.stop()
        self.start()

    def url(self, dbname: str = "postgres", *, password: str | None = None) -> str:
        return f"postgresql://{SUPERUSER}:{self.password if password is None else password}@" \
               f"{self.host}:{self.port}/{dbname}"

    def admin(self, sql: str) -> None:
        """Runs one statement as the superuser outside a transaction (CREATE/DROP DATABASE)."""
        import psycopg
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as connection:
            connection.execute(sql)

    def create_database(self) -> str:
        name = f"t_{secrets.token_hex(6)}"
        self.admin(f"CREATE DATABASE {name}")
        return name

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    server = start_for_session(PostgresServer)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server):
    """The URL of a fresh, empty database on the session's server; dropped after the test."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
