"""S3BlobStore against a real S3 server (`weed mini`, tests/backends/s3.py; fixtures from conftest.py): round
trips, multipart, what becomes visible when, corruption, the local cache, misconfiguration as typed errors,
and `edgeforge store check` on a bucket."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

import pytest

from shared.errors import DataLoss, FailedPrecondition, InvalidArgument, Unavailable
from shared.store.artifacts import ArtifactStore
from shared.store.blobs import BlobStore, open_blobs
from shared.store.check import check_store
from shared.store.database import Database
from shared.store.records import ArtifactKind
from shared.store.s3 import MULTIPART_BYTES, S3BlobStore
from tests.backends.postgres import free_port

DATA = bytes(range(256)) * 40                     # 10240 bytes
DATA_SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def blobs(s3_url, tmp_path) -> S3BlobStore:
    return open_blobs(s3_url, tmp_path / "cache")


def _bucket(url: str) -> str:
    return url.removeprefix("s3://").split("?")[0].split("/")[0]


def _prefix(url: str) -> str:
    """The test's namespace in the bucket (s3_url gives each test a fresh prefix)."""
    return url.removeprefix("s3://").split("?")[0].partition("/")[2]


def _commit(store: BlobStore, data: bytes, expected: str | None = None) -> tuple[str, int]:
    handle, temp = store.temp_file(suffix=".bin")
    with handle:
        handle.write(data)
    return store.commit(temp, expected)


def _keys(s3_server, url: str) -> list[str]:
    listing = s3_server.client().list_objects_v2(Bucket=_bucket(url), Prefix=_prefix(url) + "/")
    return [entry["Key"] for entry in listing.get("Contents", [])]


def test_put_then_get_round_trip_through_the_bucket(blobs, s3_server, s3_url, tmp_path):
    assert isinstance(blobs, S3BlobStore)
    assert _commit(blobs, DATA) == (DATA_SHA, len(DATA))
    assert _keys(s3_server, s3_url) == [f"{_prefix(s3_url)}/sha256/{DATA_SHA[:2]}/{DATA_SHA}"]
    assert list(blobs.tmp.iterdir()) == []                            # the temp file became the cached copy
    other = open_blobs(s3_url, tmp_path / "other-cache")              # another coordinator: an empty cache
    assert other.exists(DATA_SHA) and other.size(DATA_SHA) == len(DATA)
    assert not other.exists("0" * 64)
    path = other.verified_path(DATA_SHA)
    assert path.is_relative_to(tmp_path / "other-cache") and path.read_bytes() == DATA
    assert other.path(DATA_SHA) == path and other.downloads == 1
    assert _commit(other, DATA) == (DATA_SHA, len(DATA)) and other.uploads == 0   # stored already: no upload


def test_a_prefix_keys_objects_under_it(s3_server, s3_url, tmp_path):
    bucket, namespace = _bucket(s3_url), _prefix(s3_url)
    store = open_blobs(s3_server.url(bucket, f"/{namespace}/team/edge/"), tmp_path / "cache")
    _commit(store, DATA)
    assert _keys(s3_server, s3_url) == [f"{namespace}/team/edge/sha256/{DATA_SHA[:2]}/{DATA_SHA}"]
    assert not open_blobs(s3_server.url(bucket, f"{namespace}/team/other"), tmp_path / "c2").exists(DATA_SHA)


def test_a_blob_above_the_multipart_threshold_goes_up_in_parts(blobs, s3_server, s3_url, tmp_path):
    data = os.urandom(MULTIPART_BYTES + 12345)                        # two parts
    sha, size = _commit(blobs, data)
    head = s3_server.client().head_object(Bucket=_bucket(s3_url), Key=blobs.key(sha))
    assert head["ContentLength"] == size == len(data)
    assert head["ETag"].strip('"').endswith("-2")                     # a multipart object's ETag counts its parts
    fresh = open_blobs(s3_url, tmp_path / "fresh")
    assert fresh.verified_path(sha).read_bytes() == data


def test_a_wrong_declared_digest_leaves_nothing_visible(blobs, s3_server, s3_url):
    declared = hashlib.sha256(DATA[::-1]).hexdigest()
    with pytest.raises(InvalidArgument) as info:
        _commit(blobs, DATA, declared)
    assert info.value.reason == "DIGEST_MISMATCH"
    assert _keys(s3_server, s3_url) == []                             # nothing reached the bucket
    assert list(blobs.tmp.iterdir()) == [] and not blobs.exists(DATA_SHA) and not blobs.exists(declared)
    assert not any((blobs.root / "sha256").iterdir())                 # nor the cache


def test_an_object_overwritten_behind_the_stores_back_is_data_loss(blobs, s3_server, s3_url, tmp_path):
    _commit(blobs, DATA)
    s3_server.client().put_object(Bucket=_bucket(s3_url), Key=blobs.key(DATA_SHA), Body=DATA[::-1])
    fresh = open_blobs(s3_url, tmp_path / "fresh")
    with pytest.raises(DataLoss) as info:
        fresh.verified_path(DATA_SHA)
    assert blobs.location(DATA_SHA) in info.value.message and s3_server.endpoint in info.value.message
    assert not fresh._local_path(DATA_SHA).exists() and list(fresh.tmp.iterdir()) == []   # never cached
    with pytest.raises(DataLoss):
        fresh.path(DATA_SHA)
    assert fresh.hash_stored(DATA_SHA) == hashlib.sha256(DATA[::-1]).hexdigest()


def test_a_corrupt_cached_copy_is_fetched_again(blobs, s3_url, tmp_path):
    _commit(blobs, DATA)
    reader = open_blobs(s3_url, tmp_path / "reader")
    cached = reader.verified_path(DATA_SHA)
    cached.chmod(0o644)
    cached.write_bytes(DATA[::-1])
    again = open_blobs(s3_url, tmp_path / "reader")                   # a new process: hashes its cache once
    assert again.verified_path(DATA_SHA).read_bytes() == DATA and again.downloads == 1


def test_a_cache_miss_downloads_once_then_reads_the_cache(blobs, s3_server, s3_url, tmp_path):
    _commit(blobs, DATA)
    reader = open_blobs(s3_url, tmp_path / "reader")
    first = reader.verified_path(DATA_SHA)
    assert reader.verified_path(DATA_SHA) == first and reader.downloads == 1
    s3_server.client().delete_object(Bucket=_bucket(s3_url), Key=blobs.key(DATA_SHA))
    assert reader.path(DATA_SHA).read_bytes() == DATA and reader.downloads == 1   # served from the cache
    assert reader.exists(DATA_SHA)                                    # the cache answers first


def test_concurrent_readers_share_one_download(blobs, s3_url, tmp_path):
    data = os.urandom(3 << 20)
    sha, _ = _commit(blobs, data)
    reader = open_blobs(s3_url, tmp_path / "reader")
    paths, errors = [], []

    def read():
        try:
            paths.append(reader.verified_path(sha))
        except Exception as error:                                   # reported below
            errors.append(error)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(set(paths)) == 1 and paths[0].read_bytes() == data
    assert reader.downloads == 1 and list(reader.tmp.iterdir()) == []


@pytest.mark.parametrize("variable, code", [("AWS_ACCESS_KEY_ID", "InvalidAccessKeyId"),
                                            ("AWS_SECRET_ACCESS_KEY", "SignatureDoesNotMatch")])
def test_bad_credentials_are_a_precise_failed_precondition(s3_server, s3_url, tmp_path, monkeypatch, variable, code):
    monkeypatch.setenv(variable, "wrong" + "0" * 20)
    with pytest.raises(FailedPrecondition) as info:
        open_blobs(s3_url, tmp_path / "cache")
    error = info.value
    assert error.metadata["s3_error"] == code and error.reason == "DEPENDENCY_FAILED"
    assert s3_server.endpoint in error.message and _bucket(s3_url) in error.message
    assert "AWS_ACCESS_KEY_ID" in error.message and "AWS_SECRET_ACCESS_KEY" in error.message


def test_no_credentials_at_all_names_the_variables(s3_url, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(FailedPrecondition) as info:
        open_blobs(s3_url, tmp_path / "cache")
    assert "no S3 credentials" in info.value.message and "AWS_ACCESS_KEY_ID" in info.value.message


def test_a_missing_bucket_is_refused_unless_asked_to_create_it(s3_server, s3_url, tmp_path):
    url = s3_server.url("edgeforge-absent-bucket")
    with pytest.raises(FailedPrecondition) as info:
        open_blobs(url, tmp_path / "cache")
    assert info.value.message == f"bucket edgeforge-absent-bucket does not exist at {s3_server.endpoint}; create it"
    try:
        store = open_blobs(url, tmp_path / "cache", create_bucket=True)
        assert _commit(store, DATA)[0] == DATA_SHA
    finally:
        s3_server.delete_bucket("edgeforge-absent-bucket")


def test_an_unreachable_endpoint_is_unavailable(s3_url, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"                     # nothing listens there
    with pytest.raises(Unavailable) as info:
        open_blobs(f"s3://bucket?endpoint_url={endpoint}&region=us-east-1", tmp_path / "cache")
    assert endpoint in info.value.message and info.value.metadata["endpoint"] == endpoint


@pytest.mark.parametrize("url, words", [
    ("s3://?endpoint_url=http://x", "no bucket"),
    ("s3://bucket?endpoint=http://x", "unknown option endpoint"),
    ("ftp://host/dir", "unknown scheme"),
    ("s3://Not_A_Bucket?endpoint_url=http://127.0.0.1:1", "is not an S3 bucket name"),
    ("s3://bucket?endpoint_url=not a url", "is not valid")])
def test_malformed_blob_urls_are_invalid_arguments(tmp_path, monkeypatch, url, words):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "some-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "some-secret")
    with pytest.raises(InvalidArgument) as info:
        open_blobs(url, tmp_path / "cache")
    assert words in info.value.message and info.value.field == "blobs"


def test_a_dead_writers_temp_file_is_swept_a_live_ones_kept(blobs):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = os.uname().nodename.replace(".", "_")
    stale = blobs.tmp / f"{dead.pid}@{host}.abc.bin"
    stale.write_bytes(b"half a download")
    handle, live = blobs.temp_file()
    handle.close()
    assert blobs.sweep_temp() == [stale]
    assert not stale.exists() and live.exists()


def test_artifact_store_on_s3_and_store_check_of_the_bucket(s3_server, s3_url, tmp_path):
    data_dir = tmp_path / "data"
    db = Database(data_dir / "edgeforge.db")
    store = ArtifactStore(db, data_dir, open_blobs(s3_url, data_dir / "blob-cache"))
    records = []
    for i in range(3):
        source = tmp_path / f"a{i}.bin"
        source.write_bytes(bytes([i]) * 1000)
        records.append(store.put_file(source, ArtifactKind.MODEL))
    assert not (data_dir / "blobs" / "sha256").exists() or not any((data_dir / "blobs" / "sha256").iterdir())
    db.close()
    assert check_store(data_dir, blobs=s3_url).clean

    client, bucket = s3_server.client(), _bucket(s3_url)
    blobs = store.blobs
    client.put_object(Bucket=bucket, Key=blobs.key(records[0].sha256), Body=b"\x07" * 1000)   # same size, other bytes
    client.delete_object(Bucket=bucket, Key=blobs.key(records[1].sha256))
    orphan = hashlib.sha256(b"nobody's").hexdigest()
    client.put_object(Bucket=bucket, Key=blobs.key(orphan), Body=b"nobody's")
    client.put_object(Bucket=bucket, Key=f"{_prefix(s3_url)}/sha256/README", Body=b"not a blob")
    dead_writer = client.create_multipart_upload(Bucket=bucket, Key=blobs.key("ef" * 32))     # never completed
    client.upload_part(Bucket=bucket, Key=blobs.key("ef" * 32), UploadId=dead_writer["UploadId"], PartNumber=1,
                       Body=b"half")
    unfinished = f"{blobs.location('ef' * 32)}?uploadId={dead_writer['UploadId']}"
    assert not blobs.exists("ef" * 32)                                # parts of an unfinished upload are no object
    report = check_store(data_dir, blobs=s3_url)
    assert {p.kind: p.path for p in report.problems} == {
        "CORRUPT_BLOB": blobs.location(records[0].sha256), "MISSING_BLOB": blobs.location(records[1].sha256),
        "ORPHAN_BLOB": blobs.location(orphan), "UNKNOWN_FILE": f"s3://{bucket}/{_prefix(s3_url)}/sha256/README",
        "UNFINISHED_UPLOAD": unfinished}
    assert check_store(data_dir, blobs=s3_url, repair=True).repaired == []          # young ones are left alone
    report = check_store(data_dir, blobs=s3_url, repair=True, grace_s=0)
    assert sorted(p.kind for p in report.repaired) == ["ORPHAN_BLOB", "UNFINISHED_UPLOAD"]
    assert blobs.size(orphan) is None and blobs.size(records[2].sha256) == 1000
    assert list(blobs.unfinished_uploads()) == []
    assert check_store(data_dir, blobs=s3_url).counts() == {"CORRUPT_BLOB": 1, "MISSING_BLOB": 1, "UNKNOWN_FILE": 1}
