"""The coordinator's storage and replication flags (services/coordinator/cluster.py): bad values are usage
errors naming the flag (or the environment variable standing in for it), and coordinators sharing a
database each get an admin token that every one of them accepts."""
from __future__ import annotations

import sys
import time

import pytest

from services.coordinator import server as coordinator_server
from services.coordinator.server import create_server
from shared.auth import TokenStore


def usage_error(monkeypatch, capsys, tmp_path, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", ["coordinator", "--data-dir", str(tmp_path / "data"), *args])
    with pytest.raises(SystemExit) as exit:
        coordinator_server.main()
    assert exit.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["--database", "ftp://host/db"], "--database: unknown database scheme 'ftp'"),
    (["--database", "sqlite://relative/edgeforge.db"], "--database: 'sqlite://relative/edgeforge.db' is not a "
                                                       "SQLite URL: write sqlite:///absolute/path"),
    (["--blobs", "gs://bucket"], "--blobs: blobs 'gs://bucket': unknown scheme gs://"),
    (["--blobs", "s3://"], "--blobs: blobs 's3://': no bucket"),
    (["--claim-ttl-s", "0.5"], "--claim-ttl-s must be at least 1 s"),
    (["--claim-ttl-s", "nan"], "--claim-ttl-s must be at least 1 s"),
    (["--coordinator-id="], "--coordinator-id must not be empty"),
])
def test_bad_values_are_usage_errors_naming_the_flag(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.delenv("EDGEFORGE_DATABASE", raising=False)
    monkeypatch.delenv("EDGEFORGE_BLOBS", raising=False)
    assert message in usage_error(monkeypatch, capsys, tmp_path, *args)


def test_an_environment_variable_in_error_is_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("EDGEFORGE_DATABASE", "mysql://db.internal/edgeforge")
    assert usage_error(monkeypatch, capsys, tmp_path).endswith(
        "$EDGEFORGE_DATABASE (for --database): unknown database scheme 'mysql' in mysql://db.internal/edgeforge: use "
        "a file path, sqlite:///abs/path or postgresql://user:password@host:port/dbname")


def test_an_unreachable_postgresql_is_a_usage_error_without_the_password(monkeypatch, capsys, tmp_path):
    line = usage_error(monkeypatch, capsys, tmp_path, "--database", "postgresql://edgeforge:s3cret@127.0.0.1:1/meta")
    assert "127.0.0.1:1" in line and "s3cret" not in line


def test_coordinators_sharing_a_database_accept_each_others_admin_tokens(tmp_path):
    """Each coordinator keeps its admin token in its own data dir; a second one on the same data dir reuses
    the live token there instead of minting another."""
    shared = {"database": str(tmp_path / "shared.db"), "blobs": str(tmp_path / "blobs")}
    started = [create_server("127.0.0.1:0", tmp_path / name, coordinator_id=name, **shared)
               for name in ("a", "b", "b-again")]
    try:
        tokens = [ctx.admin_token for _, _, ctx in started]
        assert tokens[0] != tokens[1]
        verify = started[0][2].tokens.verify
        assert {verify(token).role for token in tokens} == {"admin"}
        assert (tmp_path / "b" / "admin.token").read_text().strip() == tokens[1]
        again = create_server("127.0.0.1:0", tmp_path / "b", coordinator_id="b2", **shared)
        started.append(again)
        assert again[2].admin_token == tokens[1]                  # reused: still live in the shared database
        assert len(TokenStore(started[0][2].state.db).list()) == 3      # a, b, b-again
        assert {ctx.claims.coordinator_id for _, _, ctx in started} == {"a", "b", "b-again", "b2"}
    finally:
        for server, _, _ in started:
            server.stop(0).wait()


def test_a_coordinator_alone_on_its_data_dir_keeps_its_id_across_restarts(tmp_path):
    """The default id is host:data-dir while one coordinator holds the data dir's lock, so a coordinator killed
    and restarted there gets its builds back at once; a second live coordinator on the same data dir (or one
    while another process holds the lock) gets a random id instead. The kernel drops the lock of a dead process."""
    import socket
    import subprocess

    from services.coordinator.cluster import data_dir_identity, release_identity
    data_dir = tmp_path / "data"
    first = data_dir_identity(data_dir)
    assert first == f"{socket.gethostname()}:{data_dir.resolve()}"
    assert data_dir_identity(data_dir) is None                      # a second coordinator in this process
    release_identity(data_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(data_dir / 'coordinator.lock')!r}, os.O_RDWR)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert data_dir_identity(data_dir) is None                  # another live process is that coordinator
    finally:
        holder.kill()
        holder.wait()
    assert data_dir_identity(data_dir) == first                     # it died: the id is free again
    release_identity(data_dir)


def test_a_restarted_coordinator_resumes_its_build_at_once(tmp_path):
    """In-process stop and start on one data dir: the second life takes the same id and the first life's claim at
    once, without waiting for the claim to lapse."""
    from edgeforge.v1 import coordinator_pb2
    data_dir = tmp_path / "data"
    server, _, ctx = create_server("127.0.0.1:0", data_dir, claim_ttl_s=600)
    try:
        owner = ctx.claims.coordinator_id
        build = coordinator_pb2.Build(name="builds/b1", state=coordinator_pb2.BUILD_STATE_RUNNING)
        ctx.state.create_build(build, coordinator_pb2.BuildProgress(), "", "h")
        assert ctx.claims.claim("b1") == 1
    finally:
        server.stop(0).wait()
    ctx.claims.db.close()
    server, _, ctx = create_server("127.0.0.1:0", data_dir, claim_ttl_s=600)
    try:
        assert ctx.claims.coordinator_id == owner
        deadline = time.monotonic() + 30                            # the claim would lapse only after 600 s
        while not ctx.state.load_build("b1")[2]:
            assert time.monotonic() < deadline, "the restarted coordinator did not take its build back"
            time.sleep(0.1)
        runs = ctx.state.stage_runs("b1")
        assert ctx.state.load_build("b1")[0].state == coordinator_pb2.BUILD_STATE_FAILED   # an empty spec
        assert all(run["coordinator"] == owner for run in runs)
    finally:
        server.stop(0).wait()
