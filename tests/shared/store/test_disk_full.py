"""A full disk while the store writes: RESOURCE_EXHAUSTED (reason STORAGE_FULL) naming the path and the
bytes, and a store that stays consistent (no row without its blob, no partial blob, no temp file left).

Two ways: ENOSPC injected at the storage interface (copy, fsync, rename, upload write), and, where this
runs as root and may mount, a real tmpfs of a few MiB filled up with a ballast file.
"""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from shared.errors import ResourceExhausted
from shared.store import artifacts as artifacts_module, blobs as blobs_module
from shared.store.artifacts import ArtifactStore
from shared.store.check import check_store
from shared.store.database import Database
from shared.store.records import ArtifactKind

DATA = os.urandom(3 << 20)                                  # 3 MiB, incompressible
DATA_SHA = hashlib.sha256(DATA).hexdigest()


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _store(directory: Path) -> ArtifactStore:
    return ArtifactStore(Database(directory / "edgeforge.db"), directory)


def _assert_consistent(store: ArtifactStore, directory: Path) -> None:
    """No partial blob visible, no temp file left, every row with its blob (open uploads are fine)."""
    assert list(store.blobs.tmp.iterdir()) == []
    report = check_store(directory)
    assert report.clean, report.render()


def _assert_storage_full(error: ResourceExhausted, path_part: str) -> None:
    assert error.code == "RESOURCE_EXHAUSTED" and error.reason == "STORAGE_FULL"
    assert "disk is full" in error.message and path_part in error.message
    assert path_part in error.metadata["path"]


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(DATA)
    return path


@pytest.mark.parametrize("where", ["copy_file", "fsync_file", "rename"])
def test_injected_enospc_in_a_blob_write(tmp_path, source, monkeypatch, where):
    directory = tmp_path / "data"
    store = _store(directory)
    if where == "rename":
        real = os.replace
        monkeypatch.setattr(blobs_module.os, "replace",
                            lambda a, b: _no_space() if "sha256" in str(b) else real(a, b))
    else:
        monkeypatch.setattr(blobs_module, where, _no_space)
    with pytest.raises(ResourceExhausted) as error:
        store.put_file(source, ArtifactKind.MODEL)
    _assert_storage_full(error.value, str(store.blobs.tmp))
    assert f"({len(DATA)} bytes)" in error.value.message and error.value.metadata["size_bytes"] == str(len(DATA))
    assert not store.exists(DATA_SHA) and not store.blobs.exists(DATA_SHA)
    _assert_consistent(store, directory)
    monkeypatch.undo()                                       # space again: the same write succeeds
    assert store.put_file(source, ArtifactKind.MODEL).sha256 == DATA_SHA
    _assert_consistent(store, directory)


def test_injected_enospc_in_an_upload_keeps_what_was_fsynced(tmp_path, monkeypatch):
    directory = tmp_path / "data"
    store = _store(directory)
    upload = store.create_upload(ArtifactKind.DATASET, len(DATA), DATA_SHA)
    real, calls = artifacts_module._write_all, []

    def fails_on_the_third(f, chunk):
        calls.append(len(chunk))
        if len(calls) == 3:
            f.write(chunk[:1000])                            # part of it reached the file
            _no_space()
        real(f, chunk)
    monkeypatch.setattr(artifacts_module, "_write_all", fails_on_the_third)
    chunks = [DATA[i:i + (1 << 20)] for i in range(0, len(DATA), 1 << 20)]
    with pytest.raises(ResourceExhausted) as error:
        store.write_upload(upload.upload_id, 0, chunks)
    _assert_storage_full(error.value, f"{upload.upload_id}.part")
    after = store.get_upload(upload.upload_id)
    assert after.committed_bytes == 2 << 20 and not after.succeeded       # the two whole chunks, not the part
    assert (store.uploads_dir / f"{upload.upload_id}.part").stat().st_size == 2 << 20
    assert not store.exists(DATA_SHA)
    _assert_consistent(store, directory)
    monkeypatch.undo()
    assert store.write_upload(upload.upload_id, after.committed_bytes, [DATA[2 << 20:]]).succeeded
    assert store.blobs.verified_path(DATA_SHA).read_bytes() == DATA
    _assert_consistent(store, directory)


def test_an_upload_whose_final_commit_finds_no_space_starts_over(tmp_path, monkeypatch):
    directory = tmp_path / "data"
    store = _store(directory)
    upload = store.create_upload(ArtifactKind.DATASET, len(DATA), DATA_SHA)
    monkeypatch.setattr(blobs_module, "fsync_file", _no_space)
    with pytest.raises(ResourceExhausted):
        store.write_upload(upload.upload_id, 0, [DATA])
    assert store.get_upload(upload.upload_id).committed_bytes == 0       # said plainly: resume from 0
    _assert_consistent(store, directory)
    monkeypatch.undo()
    assert store.write_upload(upload.upload_id, 0, [DATA]).succeeded


# ---------------------------------------------------------------------- a real, small tmpfs
@pytest.fixture
def tmpfs(tmp_path) -> Path:
    """An 8 MiB tmpfs (root only; skipped with the reason elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the injected-ENOSPC tests above cover the same paths")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves about `leave_bytes` free."""
    ballast = directory / "ballast"
    free = blobs_module.free_bytes(directory)
    with open(ballast, "ab") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))
    return ballast


def test_a_real_full_disk(tmpfs):
    directory = tmpfs / "data"
    store = _store(directory)
    ballast = _fill(tmpfs, 1 << 20)
    source = tmpfs / "model.gguf"                             # written before the disk filled up
    ballast.unlink()
    source.write_bytes(DATA)
    _fill(tmpfs, 1 << 20)

    with pytest.raises(ResourceExhausted) as error:          # the blob write: a real ENOSPC from the copy
        store.put_file(source, ArtifactKind.MODEL)
    _assert_storage_full(error.value, str(store.blobs.tmp))
    _assert_consistent(store, directory)

    upload = store.create_upload(ArtifactKind.DATASET, 0, hashlib.sha256(b"").hexdigest())
    assert upload.committed_bytes == 0
    big = store.create_upload(ArtifactKind.DATASET, 512 << 10, hashlib.sha256(DATA[:512 << 10]).hexdigest())
    (tmpfs / "ballast").unlink()
    _fill(tmpfs, 128 << 10)
    with pytest.raises(ResourceExhausted) as error:          # the upload write: keeps what fit and was fsynced
        store.write_upload(big.upload_id, 0, [DATA[i:i + (64 << 10)] for i in range(0, 512 << 10, 64 << 10)])
    _assert_storage_full(error.value, f"{big.upload_id}.part")
    committed = store.get_upload(big.upload_id).committed_bytes    # 0 when the database had no room either
    assert 0 <= committed < 512 << 10 and committed % (64 << 10) == 0
    _assert_consistent(store, directory)

    _fill(tmpfs, 0)                                           # not one byte left: the database refuses too
    with pytest.raises(ResourceExhausted) as error:
        store.create_upload(ArtifactKind.DATASET, 0, "ab" * 32, labels={f"note{i}": "x" * 256 for i in range(256)})
    _assert_storage_full(error.value, "edgeforge.db")
    assert store.db.query("SELECT COUNT(*) AS n FROM uploads")[0]["n"] == 2          # rolled back

    (tmpfs / "ballast").unlink()                              # space again: everything resumes
    assert store.write_upload(big.upload_id, committed, [DATA[committed:512 << 10]]).succeeded
    assert store.put_file(source, ArtifactKind.MODEL).sha256 == DATA_SHA
    _assert_consistent(store, directory)
    store.db.close()


# ---------------------------------------------------------------------- a build that meets a full disk
def test_a_build_whose_export_finds_the_disk_full_fails_cleanly(tmp_path, tiny_model_dir, assets, monkeypatch):
    """ENOSPC while the exported GGUF is committed: the build fails with RESOURCE_EXHAUSTED (not one failed
    candidate among others), and the store holds everything but that file, consistently."""
    from clients.python import spec as spec_file
    from clients.python.client import Client, build_name
    from edgeforge.v1 import coordinator_pb2
    from services.coordinator.server import create_server

    real = blobs_module.fsync_file
    monkeypatch.setattr(blobs_module, "fsync_file", lambda path: _no_space() if path.suffix == ".gguf" else real(path))
    directory = tmp_path / "data"
    server, port, ctx = create_server("127.0.0.1:0", directory, device_wait_s=2.0)
    client = Client(f"127.0.0.1:{port}", token=ctx.admin_token)
    try:
        build_spec = spec_file.parse({
            "name": "full", "model": {"path": str(tiny_model_dir)},
            "calibration": {"text_file": str(assets / "data" / "calib.txt"), "samples": 2, "sequence_length": 32},
            "evaluation": {"text_file": str(assets / "data" / "eval.txt"), "max_tokens": 128, "window_tokens": 64},
            "targets": [{"selector": {"device": "test-host"}}],
            "candidates": [{"format": "gguf", "quantization": {"type": "q4_0"}},
                           {"format": "gguf", "quantization": {"type": "q8_0"}}]}, tiny_model_dir.parent)
        operation = client.wait(client.create_build(build_spec).name, poll_s=2.0)
        assert operation.error.code == 8, operation.error                 # RESOURCE_EXHAUSTED
        assert "disk is full" in operation.error.message and ".gguf" in operation.error.message
        build = client.get_build(build_name(operation.name))
        assert build.state == coordinator_pb2.BUILD_STATE_FAILED
        assert not any(c.artifact for c in build.candidates)
        assert ctx.store.list(kind=ArtifactKind.EXPORTED_MODEL) == []
        _assert_consistent(ctx.store, directory)
    finally:
        client.close()
        server.stop(0).wait()
