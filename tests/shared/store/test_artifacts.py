"""ArtifactStore on each metadata backend (a real SQLite file, a real PostgreSQL database) times each blob
backend (a local directory, a real S3 server): artifacts, reads, derivations and resumable uploads
(`store`, from conftest.py, runs every such test four times).

Also covers the Database wrapper and the plain records it stores.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shared.errors import (AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound, OutOfRange,
                           ResourceExhausted)
from shared.store.artifacts import ArtifactStore
from shared.store.database import Database, open_database
from shared.store.records import ArtifactKind, Lineage, artifact_name, parse_artifact_name

DATA = bytes(range(256)) * 40                     # 10240 bytes
DATA_SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def db(database):
    return database


def _file(tmp_path: Path, data: bytes = DATA, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- database and records
def test_sqlite_database_is_wal_and_creates_parent(tmp_path):
    db = Database(tmp_path / "state" / "edgeforge.db")
    try:
        assert (tmp_path / "state" / "edgeforge.db").is_file()
        assert db.dialect == "sqlite" and db.skip_locked == ""
        assert db.query("PRAGMA journal_mode")[0][0] == "wal"
        assert db.query("PRAGMA foreign_keys")[0][0] == 1
    finally:
        db.close()


def test_database_transaction_rolls_back_on_error(db):
    db.migrate(["CREATE TABLE IF NOT EXISTS t (x INTEGER)"])
    with pytest.raises(RuntimeError):
        with db.transaction() as conn:
            conn.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("boom")
    assert db.query("SELECT COUNT(*) AS n FROM t")[0]["n"] == 0
    with db.transaction() as conn:
        conn.execute("INSERT INTO t VALUES (2)")
    assert [r["x"] for r in db.query("SELECT x FROM t")] == [2]


def test_artifacts_survive_reopening_the_database(store, tmp_path, database_url):
    record = store.put_file(_file(tmp_path), ArtifactKind.MODEL)
    reopened = open_database(database_url)
    try:
        again = ArtifactStore(reopened, tmp_path / "store", store.blobs)     # migrate is idempotent
        assert again.get(record.sha256) == record
    finally:
        reopened.close()


def test_artifact_names_round_trip():
    assert artifact_name(DATA_SHA) == f"artifacts/{DATA_SHA}"
    assert parse_artifact_name(f"artifacts/{DATA_SHA}") == DATA_SHA


@pytest.mark.parametrize("name", [DATA_SHA, f"uploads/{DATA_SHA}", "artifacts/", "artifacts/XYZ",
                                  f"artifacts/{DATA_SHA.upper()}"])
def test_parse_artifact_name_refuses_malformed(name):
    with pytest.raises(InvalidArgument) as info:
        parse_artifact_name(name, field="artifact")
    assert info.value.field == "artifact"


# ---------------------------------------------------------------- artifacts
def test_put_file_stores_metadata_and_blob(store, tmp_path):
    lineage = Lineage(inputs=("artifacts/" + "a" * 64,), recipe={"bits": 4, "group": 128},
                      tool_versions={"torch": "2.x"}, producer="compressor")
    record = store.put_file(_file(tmp_path), ArtifactKind.COMPRESSED_MODEL, media_type="application/x-gguf",
                            lineage=lineage, labels={"team": "edge"})
    assert record.sha256 == DATA_SHA and record.size_bytes == len(DATA)
    assert record.name == f"artifacts/{DATA_SHA}"
    assert record.kind is ArtifactKind.COMPRESSED_MODEL
    assert record.display_name == "model.gguf"                 # defaults to the file name
    assert record.media_type == "application/x-gguf"
    assert record.lineage == lineage
    assert record.labels == {"team": "edge"}
    assert store.get(DATA_SHA) == record
    assert store.path(DATA_SHA).read_bytes() == DATA


def test_put_file_defaults_media_type(store, tmp_path):
    record = store.put_file(_file(tmp_path), ArtifactKind.DATASET, display_name="wiki")
    assert record.media_type == "application/octet-stream"
    assert record.display_name == "wiki"


def test_put_file_is_idempotent_for_same_bytes(store, tmp_path):
    first = store.put_file(_file(tmp_path), ArtifactKind.MODEL, display_name="first")
    second = store.put_file(_file(tmp_path, name="copy.bin"), ArtifactKind.MODEL, display_name="second")
    assert second == first
    assert len(store.list()) == 1


def test_put_file_move_consumes_source(store, tmp_path):
    source = _file(tmp_path)
    store.put_file(source, ArtifactKind.MODEL, move=True)
    assert not source.exists()
    assert store.exists(DATA_SHA)


def test_get_unknown_and_malformed(store):
    with pytest.raises(NotFound):
        store.get("0" * 64)
    with pytest.raises(InvalidArgument):
        store.get("not-a-digest")
    assert not store.exists("0" * 64)


def test_list_filters_by_kind_and_pages_newest_first(store, tmp_path):
    made = [store.put_file(_file(tmp_path, bytes([i]) * 10, f"f{i}"), kind)
            for i, kind in enumerate([ArtifactKind.MODEL, ArtifactKind.DATASET, ArtifactKind.MODEL])]
    assert [r.sha256 for r in store.list()] == [r.sha256 for r in reversed(made)]
    assert [r.sha256 for r in store.list(ArtifactKind.MODEL)] == [made[2].sha256, made[0].sha256]
    assert [r.sha256 for r in store.list(ArtifactKind.DATASET)] == [made[1].sha256]
    assert store.list(ArtifactKind.REPORT) == []
    assert [r.sha256 for r in store.list(limit=1, offset=1)] == [made[1].sha256]


def test_read_yields_offsets_and_bytes(store, tmp_path):
    store.put_file(_file(tmp_path), ArtifactKind.MODEL)
    chunks = list(store.read(DATA_SHA, offset=100, chunk_bytes=4096))
    assert [offset for offset, _ in chunks] == [100, 4196, 8292]
    assert b"".join(data for _, data in chunks) == DATA[100:]
    assert list(store.read(DATA_SHA, offset=len(DATA))) == []


@pytest.mark.parametrize("offset", [-1, len(DATA) + 1])
def test_read_refuses_offsets_outside_the_artifact(store, tmp_path, offset):
    store.put_file(_file(tmp_path), ArtifactKind.MODEL)
    with pytest.raises(OutOfRange) as info:
        next(store.read(DATA_SHA, offset=offset))
    assert info.value.field == "offset"


def test_read_detects_a_corrupted_blob(store, tmp_path, damage_blob):
    store.put_file(_file(tmp_path), ArtifactKind.MODEL)
    damage_blob(store, DATA_SHA, DATA[::-1])
    with pytest.raises(DataLoss):
        next(store.read(DATA_SHA))
    with pytest.raises(DataLoss):
        store.path(DATA_SHA)


# ---------------------------------------------------------------- derivations
def test_derivations_memoise_by_key(store, tmp_path):
    record = store.put_file(_file(tmp_path), ArtifactKind.COMPRESSED_MODEL)
    assert store.find_derived("compress:abc") is None
    store.record_derived("compress:abc", record.sha256)
    assert store.find_derived("compress:abc") == record
    assert store.find_derived("compress:other") is None


def test_derivation_whose_blob_vanished_is_a_miss(store, tmp_path, damage_blob):
    record = store.put_file(_file(tmp_path), ArtifactKind.COMPRESSED_MODEL)
    store.record_derived("k", record.sha256)
    damage_blob(store, record.sha256, None)
    assert store.find_derived("k") is None


def test_derivation_must_name_a_known_artifact(store):
    with pytest.raises(store.db.IntegrityError):
        store.record_derived("k", "e" * 64)
    assert store.find_derived("k") is None


# ---------------------------------------------------------------- uploads
def test_upload_in_pieces_then_resume(store):
    upload = store.create_upload(ArtifactKind.MODEL, len(DATA), DATA_SHA, display_name="up.bin",
                                 labels={"a": "b"}, lineage=Lineage(producer="cli"))
    assert (upload.committed_bytes, upload.succeeded) == (0, False)
    assert upload.name == f"uploads/{upload.upload_id}"
    upload = store.write_upload(upload.upload_id, 0, [DATA[:1000], DATA[1000:3000]])
    assert (upload.committed_bytes, upload.succeeded) == (3000, False)
    assert not store.exists(DATA_SHA)
    upload = store.write_upload(upload.upload_id, 3000, [DATA[3000:]])
    assert (upload.committed_bytes, upload.succeeded) == (len(DATA), True)
    record = store.get(DATA_SHA)
    assert (record.display_name, record.labels, record.lineage.producer) == ("up.bin", {"a": "b"}, "cli")
    assert store.path(DATA_SHA).read_bytes() == DATA
    assert not (store.uploads_dir / f"{upload.upload_id}.part").exists()


def test_write_at_wrong_offset_reports_committed_bytes(store):
    upload = store.create_upload(ArtifactKind.MODEL, len(DATA), DATA_SHA)
    store.write_upload(upload.upload_id, 0, [DATA[:500]])
    with pytest.raises(OutOfRange) as info:
        store.write_upload(upload.upload_id, 400, [DATA[400:]])
    assert info.value.metadata["committed_bytes"] == "500"
    assert store.get_upload(upload.upload_id).committed_bytes == 500


def test_bytes_before_a_broken_stream_stay_committed(store):
    upload = store.create_upload(ArtifactKind.MODEL, len(DATA), DATA_SHA)

    def stream():
        yield DATA[:700]
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.write_upload(upload.upload_id, 0, stream())
    assert store.get_upload(upload.upload_id).committed_bytes == 700
    assert store.write_upload(upload.upload_id, 700, [DATA[700:]]).succeeded
    assert store.path(DATA_SHA).read_bytes() == DATA


def test_more_bytes_than_declared_is_refused(store):
    upload = store.create_upload(ArtifactKind.MODEL, 100, hashlib.sha256(DATA[:100]).hexdigest())
    with pytest.raises(InvalidArgument) as info:
        store.write_upload(upload.upload_id, 0, [DATA[:60], DATA[60:160]])
    assert info.value.reason == "TOO_LARGE"
    assert store.get_upload(upload.upload_id).committed_bytes == 60
    assert (store.uploads_dir / f"{upload.upload_id}.part").read_bytes() == DATA[:60]


def test_wrong_digest_discards_the_upload_and_stores_nothing(store):
    declared = hashlib.sha256(DATA[::-1]).hexdigest()       # same length, other bytes
    upload = store.create_upload(ArtifactKind.MODEL, len(DATA), declared)
    with pytest.raises(InvalidArgument) as info:
        store.write_upload(upload.upload_id, 0, [DATA])
    assert info.value.reason == "DIGEST_MISMATCH"
    again = store.get_upload(upload.upload_id)
    assert (again.committed_bytes, again.succeeded) == (0, False)
    assert not store.exists(DATA_SHA) and not store.exists(declared)
    assert store.list() == []
    assert store.write_upload(upload.upload_id, 0, [DATA[::-1]]).succeeded   # starting over works


def test_write_after_success_is_a_failed_precondition(store):
    upload = store.create_upload(ArtifactKind.MODEL, len(DATA), DATA_SHA)
    store.write_upload(upload.upload_id, 0, [DATA])
    with pytest.raises(FailedPrecondition):
        store.write_upload(upload.upload_id, len(DATA), [b"x"])


def test_upload_of_existing_content_succeeds_at_once(store, tmp_path):
    store.put_file(_file(tmp_path), ArtifactKind.MODEL)
    upload = store.create_upload(ArtifactKind.MODEL, len(DATA), DATA_SHA)
    assert (upload.committed_bytes, upload.succeeded) == (len(DATA), True)


def test_request_id_makes_create_upload_idempotent(store):
    first = store.create_upload(ArtifactKind.MODEL, len(DATA), DATA_SHA, request_id="r1")
    assert store.create_upload(ArtifactKind.MODEL, len(DATA), DATA_SHA, request_id="r1") == first
    with pytest.raises(AlreadyExists) as info:
        store.create_upload(ArtifactKind.MODEL, len(DATA), DATA_SHA, request_id="r1", display_name="other")
    assert info.value.field == "request_id"
    assert store.create_upload(ArtifactKind.MODEL, len(DATA), DATA_SHA).upload_id != first.upload_id


def test_create_upload_validates_its_request(store):
    with pytest.raises(InvalidArgument):
        store.create_upload(ArtifactKind.MODEL, 10, "nope")
    with pytest.raises(InvalidArgument) as info:
        store.create_upload(ArtifactKind.MODEL, -1, DATA_SHA)
    assert info.value.field == "size_bytes"
    with pytest.raises(ResourceExhausted) as info:
        store.create_upload(ArtifactKind.MODEL, (1 << 20) + 1, DATA_SHA)
    assert str(1 << 20) in info.value.message


def test_get_upload_unknown(store):
    with pytest.raises(NotFound):
        store.get_upload("missing")
    with pytest.raises(NotFound):
        store.write_upload("missing", 0, [b"x"])
