"""The store suites run on every backend: `database` is a fresh SQLite file, then a fresh PostgreSQL
database (tests/backends/database.py); `blobs` a local directory, then a fresh namespace in a real S3
server (tests/backends/s3.py); `store` the ArtifactStore over both (four combinations)."""
from __future__ import annotations

import pytest

from shared.store.artifacts import ArtifactStore
from shared.store.blobs import BlobStore, open_blobs

BLOB_KINDS = ["local", "s3"]


@pytest.fixture(params=BLOB_KINDS)
def blobs_kind(request) -> str:
    return request.param


@pytest.fixture
def blobs(blobs_kind, tmp_path, request) -> BlobStore:
    """A fresh, empty blob store: a directory, or a namespace in the session's S3 server (whose local
    cache lives beside it)."""
    if blobs_kind == "local":
        return BlobStore(tmp_path / "store" / "blobs")
    return open_blobs(request.getfixturevalue("s3_url"), tmp_path / "store" / "blob-cache")


@pytest.fixture
def store(database, blobs, tmp_path) -> ArtifactStore:
    return ArtifactStore(database, tmp_path / "store", blobs, max_upload_bytes=1 << 20)


@pytest.fixture
def damage_blob(request):
    """`damage_blob(store, sha256, data)` replaces a stored blob's bytes behind the store's back (`data`
    None deletes it): the local file, or the S3 object (then the cached copy is dropped, as a coordinator
    with a cold cache would find it)."""
    def damage(store: ArtifactStore, sha256: str, data: bytes | None) -> None:
        local = store.blobs.root / "sha256" / sha256[:2] / sha256
        if hasattr(store.blobs, "bucket"):
            client, where = request.getfixturevalue("s3_server").client(), store.blobs
            if data is None:
                client.delete_object(Bucket=where.bucket, Key=where.key(sha256))
            else:
                client.put_object(Bucket=where.bucket, Key=where.key(sha256), Body=data)
            local.unlink(missing_ok=True)
        elif data is None:
            local.unlink()
        else:
            local.chmod(0o644)
            local.write_bytes(data)
    return damage
