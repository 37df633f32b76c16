"""The agent's artifact cache: LRU eviction under the cap, refusal of what cannot fit, a digest check
on every use, and resumption from the partial file. The byte source is a generator of the real
ReadArtifactResponse messages FetchArtifact streams (the gRPC path itself: tests/integration/test_fleet.py)."""
from __future__ import annotations

import hashlib
import os
import time

import grpc
import pytest

from clients.agent.cache import ArtifactCache, CacheError, Unpacked, is_tar
from edgeforge.v1 import coordinator_pb2


def blob(size: int, seed: int) -> tuple[bytes, str]:
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    data = data[:size]
    return data, hashlib.sha256(data).hexdigest()


def reader(data: bytes, sha: str, chunk: int = 1000, fail_after: int | None = None):
    calls = []

    def read(offset: int):
        calls.append(offset)
        for start in range(offset, len(data), chunk):
            if fail_after is not None and len(calls) == 1 and start - offset >= fail_after:
                raise _Dropped()
            yield coordinator_pb2.ReadArtifactResponse(offset=start, data=data[start:start + chunk],
                                                       size_bytes=len(data) if start == offset else 0,
                                                       sha256=sha if start == offset else "")
    return read, calls


class _Dropped(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection dropped"


def test_least_recently_used_files_go_first_under_the_cap(tmp_path):
    cache = ArtifactCache(tmp_path, max_bytes=10_000, backoff_s=0)
    files = [blob(4000, i) for i in range(3)]
    for data, sha in files[:2]:
        cache.fetch(sha, len(data), reader(data, sha)[0])
    old = time.time() - 100
    os.utime(cache.path(files[0][1]), (old, old))
    cache.fetch(files[0][1], 4000, reader(*files[0])[0])          # a hit: now the most recently used
    cache.fetch(files[2][1], 4000, reader(*files[2])[0])           # needs room: evicts files[1]
    assert cache.path(files[0][1]).is_file() and cache.path(files[2][1]).is_file()
    assert not cache.path(files[1][1]).exists()
    assert cache.downloads == 3


def test_an_artifact_larger_than_the_cap_is_refused_before_any_byte(tmp_path):
    cache = ArtifactCache(tmp_path, max_bytes=1000)
    data, sha = blob(5000, 1)
    read, calls = reader(data, sha)
    with pytest.raises(CacheError, match="over the cache cap"):
        cache.fetch(sha, len(data), read)
    assert calls == []


def test_a_dropped_stream_resumes_from_the_partial_file(tmp_path):
    cache = ArtifactCache(tmp_path, max_bytes=1 << 20, backoff_s=0)
    data, sha = blob(50_000, 2)
    read, calls = reader(data, sha, fail_after=20_000)
    path = cache.fetch(sha, len(data), read)
    assert path.read_bytes() == data
    assert calls == [0, 20_000] and cache.resumes == 1


def test_wrong_bytes_are_discarded_and_a_corrupt_cached_file_is_fetched_again(tmp_path):
    cache = ArtifactCache(tmp_path, max_bytes=1 << 20, backoff_s=0)
    data, sha = blob(3000, 3)
    other, _ = blob(3000, 4)
    with pytest.raises(CacheError, match="not the leased"):
        cache.fetch(sha, len(data), reader(other, sha)[0])
    assert list(tmp_path.iterdir()) == []                        # nothing half-written stays
    path = cache.fetch(sha, len(data), reader(data, sha)[0])
    path.write_bytes(b"x" + data[1:])
    read, calls = reader(data, sha)
    assert cache.fetch(sha, len(data), read).read_bytes() == data
    assert calls == [0] and cache.corrupt == 1


def test_tar_exports_unpack_per_job_and_plain_files_pass_through(tmp_path):
    import tarfile
    model = tmp_path / "export"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"graph")
    (model / "model.onnx.data").write_bytes(b"weights")
    archive = tmp_path / "export.tar"
    with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("model.onnx", "model.onnx.data"):
            tar.add(model / name, arcname=name)
    assert is_tar(archive) and not is_tar(model / "model.onnx")
    with Unpacked(archive, tmp_path / "scratch") as target:
        assert sorted(p.name for p in target.iterdir()) == ["model.onnx", "model.onnx.data"]
        unpacked = target
    assert not unpacked.exists()
    with Unpacked(model / "model.onnx", tmp_path / "scratch") as target:
        assert target == model / "model.onnx"


def test_a_tar_member_escaping_the_directory_is_refused(tmp_path):
    import io
    import tarfile
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tar:
        payload = b"owned"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(CacheError, match="unsafe tar"):
        with Unpacked(archive, tmp_path / "scratch"):
            pass
    assert not (tmp_path / "escaped.txt").exists() and list((tmp_path / "scratch").iterdir()) == []
