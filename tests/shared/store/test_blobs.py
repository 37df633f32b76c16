"""BlobStore: content addressing, atomic commit, digest checks and corruption detection."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from shared.errors import DataLoss, InvalidArgument
from shared.store.blobs import BlobStore, check_sha256, sha256_file

PAYLOAD = b"edgeforge blob payload\n" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def _write_temp(store: BlobStore, data: bytes) -> Path:
    handle, temp = store.temp_file()
    with handle:
        handle.write(data)
    return temp


def test_check_sha256_accepts_lowercase_hex():
    assert check_sha256(PAYLOAD_SHA) == PAYLOAD_SHA


@pytest.mark.parametrize("bad", ["", "ab", PAYLOAD_SHA.upper(), PAYLOAD_SHA[:-1] + "g",
                                 PAYLOAD_SHA + "0", "../" + PAYLOAD_SHA[3:]])
def test_check_sha256_refuses_anything_else(bad):
    with pytest.raises(InvalidArgument) as info:
        check_sha256(bad, field="digest")
    assert info.value.field == "digest"
    assert info.value.reason == "INVALID_FIELD"


def test_sha256_file_matches_hashlib_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr("shared.store.blobs.CHUNK_BYTES", 7)   # force many small reads
    path = tmp_path / "f"
    path.write_bytes(PAYLOAD)
    assert sha256_file(path) == PAYLOAD_SHA


def test_constructor_creates_layout(tmp_path):
    store = BlobStore(tmp_path / "new" / "root")
    assert (tmp_path / "new" / "root" / "tmp").is_dir()
    assert (tmp_path / "new" / "root" / "sha256").is_dir()
    assert store.tmp == tmp_path / "new" / "root" / "tmp"


def test_path_is_sharded_by_first_two_hex_digits(store):
    assert store.path(PAYLOAD_SHA) == store.root / "sha256" / PAYLOAD_SHA[:2] / PAYLOAD_SHA


def test_path_refuses_malformed_digest(store):
    with pytest.raises(InvalidArgument):
        store.path("../../etc/passwd")


def test_commit_moves_temp_into_place_read_only(store):
    temp = _write_temp(store, PAYLOAD)
    sha, size = store.commit(temp)
    assert (sha, size) == (PAYLOAD_SHA, len(PAYLOAD))
    final = store.path(sha)
    assert final.read_bytes() == PAYLOAD
    assert not temp.exists()
    assert final.stat().st_mode & 0o777 == 0o444
    assert store.exists(sha)
    assert list(store.tmp.iterdir()) == []


def test_commit_with_matching_expected_digest(store):
    temp = _write_temp(store, PAYLOAD)
    assert store.commit(temp, expected_sha256=PAYLOAD_SHA) == (PAYLOAD_SHA, len(PAYLOAD))


def test_commit_with_wrong_digest_deletes_temp_and_stores_nothing(store):
    temp = _write_temp(store, PAYLOAD)
    wrong = "0" * 64
    with pytest.raises(InvalidArgument) as info:
        store.commit(temp, expected_sha256=wrong)
    assert info.value.reason == "DIGEST_MISMATCH"
    assert PAYLOAD_SHA in info.value.message and wrong in info.value.message
    assert not temp.exists()
    assert not store.exists(PAYLOAD_SHA)
    assert not store.exists(wrong)


def test_commit_of_existing_content_keeps_one_copy(store):
    first = store.commit(_write_temp(store, PAYLOAD))
    temp = _write_temp(store, PAYLOAD)
    second = store.commit(temp)
    assert first == second
    assert not temp.exists()
    shard = store.path(PAYLOAD_SHA).parent
    assert [p.name for p in shard.iterdir()] == [PAYLOAD_SHA]
    assert list(store.tmp.iterdir()) == []


def test_ingest_copies_and_leaves_source(store, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(PAYLOAD)
    assert store.ingest(source) == (PAYLOAD_SHA, len(PAYLOAD))
    assert source.read_bytes() == PAYLOAD
    assert store.path(PAYLOAD_SHA).read_bytes() == PAYLOAD


def test_ingest_move_consumes_source(store, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(PAYLOAD)
    assert store.ingest(source, move=True) == (PAYLOAD_SHA, len(PAYLOAD))
    assert not source.exists()
    assert store.path(PAYLOAD_SHA).read_bytes() == PAYLOAD


def test_ingest_empty_file(store, tmp_path):
    source = tmp_path / "empty"
    source.write_bytes(b"")
    sha, size = store.ingest(source)
    assert (sha, size) == (hashlib.sha256(b"").hexdigest(), 0)
    assert store.path(sha).read_bytes() == b""


def test_exists_is_false_for_unknown_digest(store):
    assert not store.exists("f" * 64)


def test_verified_path_returns_path_of_intact_blob(store):
    sha, _ = store.commit(_write_temp(store, PAYLOAD))
    assert store.verified_path(sha) == store.path(sha)
    assert store.verified_path(sha) == store.path(sha)     # memoised second call agrees


def test_verified_path_detects_corruption_after_first_check(store):
    sha, _ = store.commit(_write_temp(store, PAYLOAD))
    store.verified_path(sha)                            # verified and remembered
    path = store.path(sha)
    os.chmod(path, 0o644)
    corrupt = bytearray(PAYLOAD)
    corrupt[0] ^= 0xFF                                  # same size, different bytes
    path.write_bytes(bytes(corrupt))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(DataLoss) as info:
        store.verified_path(sha)
    assert info.value.reason == "STORED_DIGEST_MISMATCH"
    assert hashlib.sha256(bytes(corrupt)).hexdigest() in info.value.message


def test_verified_path_of_missing_blob_raises(store):
    with pytest.raises(FileNotFoundError):
        store.verified_path("a" * 64)
