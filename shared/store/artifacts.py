"""The artifact store: immutable content-addressed blobs plus metadata, lineage and uploads.

Invariants
- A metadata row exists only for a blob that is durable in its blob store (row inserted after rename+fsync,
  or, on S3, after the object's PUT or multipart upload completed: see shared/store/s3.py).
- An upload's bytes live in `uploads/<id>.part` until the last byte arrives and the digest matches;
  only then does the artifact appear. A wrong digest discards the upload and stores nothing.
- `derivations` memoise work: a key (stage + input digests + config) maps to the artifact it made.
- A full disk is ResourceExhausted (reason STORAGE_FULL) naming the path and bytes, never a partial blob:
  a failed blob write leaves no temp file, a failed upload write keeps only the bytes fsynced before it,
  and a failed row insert leaves at most an orphan blob (harmless; `edgeforge store check` lists it).
- Opening the store removes temp files whose writer process is dead (what a crash leaves behind).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from shared.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, ResourceExhausted, \
    AlreadyExists
from shared.store.blobs import CHUNK_BYTES, BlobStore, check_sha256, disk_full_is_resource_exhausted, free_bytes
from shared.store.database import Database
from shared.store.records import ArtifactKind, ArtifactRecord, Lineage, UploadRecord

log = logging.getLogger(__name__)
MAX_UPLOAD_BYTES_DEFAULT = 64 << 30      # 64 GiB

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS artifacts (
        sha256 TEXT PRIMARY KEY, kind TEXT NOT NULL, size_bytes INTEGER NOT NULL,
        media_type TEXT NOT NULL, display_name TEXT NOT NULL, create_time REAL NOT NULL,
        lineage_json TEXT NOT NULL, labels_json TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS artifacts_by_time ON artifacts(create_time)",
    """CREATE TABLE IF NOT EXISTS uploads (
        upload_id TEXT PRIMARY KEY, request_id TEXT UNIQUE, request_hash TEXT NOT NULL,
        kind TEXT NOT NULL, size_bytes INTEGER NOT NULL, sha256 TEXT NOT NULL,
        media_type TEXT NOT NULL, display_name TEXT NOT NULL, labels_json TEXT NOT NULL,
        committed_bytes INTEGER NOT NULL, succeeded INTEGER NOT NULL, create_time REAL NOT NULL,
        lineage_json TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS derivations (
        key TEXT PRIMARY KEY, sha256 TEXT NOT NULL REFERENCES artifacts(sha256),
        create_time REAL NOT NULL)""",
]


class ArtifactStore:
    def __init__(self, db: Database, root: Path, blobs: BlobStore | None = None, *,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES_DEFAULT):
        """`blobs`: where blob bytes live (a local BlobStore or an S3BlobStore, see `open_blobs`); None is
        the local directory root/blobs."""
        self.db = db
        self.blobs = BlobStore(root / "blobs") if blobs is None else blobs
        self.uploads_dir = root / "uploads"
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = max_upload_bytes
        db.migrate(SCHEMA)
        for entry in self.blobs.sweep_temp():
            log.info("removed %s, left behind by a writer that is gone", entry)

    # ------------------------------------------------------------------ artifacts
    def get(self, sha256: str) -> ArtifactRecord:
        rows = self.db.query("SELECT * FROM artifacts WHERE sha256 = ?", (check_sha256(sha256),))
        if not rows:
            raise NotFound(f"artifact artifacts/{sha256} does not exist")
        return _artifact_from_row(rows[0])

    def exists(self, sha256: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM artifacts WHERE sha256 = ?", (sha256,)))

    def list(self, kind: ArtifactKind | None = None, limit: int = 100, offset: int = 0) -> list[ArtifactRecord]:
        if kind is None:
            rows = self.db.query("SELECT * FROM artifacts ORDER BY create_time DESC, sha256 LIMIT ? OFFSET ?",
                                 (limit, offset))
        else:
            rows = self.db.query("SELECT * FROM artifacts WHERE kind = ? ORDER BY create_time DESC, sha256 "
                                 "LIMIT ? OFFSET ?", (kind.value, limit, offset))
        return [_artifact_from_row(r) for r in rows]

    def put_file(self, path: Path, kind: ArtifactKind, *, display_name: str = "", media_type: str = "",
                 lineage: Lineage = Lineage(), labels: dict[str, str] | None = None,
                 move: bool = False) -> ArtifactRecord:
        """Stores a finished local file. Idempotent: the same bytes return the existing record."""
        sha, size = self.blobs.ingest(path, move=move)
        return self._insert(ArtifactRecord(sha, kind, size, media_type or "application/octet-stream",
                                           display_name or path.name, time.time(), lineage, labels or {}))

    def path(self, sha256: str) -> Path:
        """A verified local path to the blob (digest checked, memoised per process)."""
        self.get(sha256)
        return self.blobs.verified_path(sha256)

    def read(self, sha256: str, offset: int = 0, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
        """Yields (offset, bytes) from `offset` to the end, after verifying the whole blob."""
        record = self.get(sha256)
        if offset < 0 or offset > record.size_bytes:
            raise OutOfRange(f"offset {offset} is outside artifact of {record.size_bytes} bytes",
                             reason="INVALID_FIELD", field="offset")
        path = self.blobs.verified_path(sha256)
        with open(path, "rb") as f:
            f.seek(offset)
            position = offset
            while chunk := f.read(chunk_bytes):
                yield position, chunk
                position += len(chunk)

    # ------------------------------------------------------------------ derivations
    def find_derived(self, key: str) -> ArtifactRecord | None:
        rows = self.db.query("SELECT sha256 FROM derivations WHERE key = ?", (key,))
        if not rows or not self.blobs.exists(rows[0]["sha256"]):
            return None
        return self.get(rows[0]["sha256"])

    def record_derived(self, key: str, sha256: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO derivations (key, sha256, create_time) VALUES (?, ?, ?) ON CONFLICT (key) "
                         "DO UPDATE SET sha256 = excluded.sha256, create_time = excluded.create_time",
                         (key, sha256, time.time()))

    # ------------------------------------------------------------------ uploads
    def create_upload(self, kind: ArtifactKind, size_bytes: int, sha256: str, *, media_type: str = "",
                      display_name: str = "", labels: dict[str, str] | None = None,
                      request_id: str = "", lineage: Lineage = Lineage(), dedupe: bool = True) -> UploadRecord:
        """A new upload (or the one `request_id` made before). With `dedupe`, bytes already stored complete
        it at once; without (a caller who may not read that blob), the caller must send every byte, so
        knowing a digest never grants its content."""
        check_sha256(sha256)
        check_upload_metadata(media_type=media_type, display_name=display_name, request_id=request_id,
                              labels=labels or {})
        if size_bytes < 0:
            raise InvalidArgument(f"size_bytes must be >= 0, got {size_bytes}", field="size_bytes")
        if size_bytes > self.max_upload_bytes:
            raise ResourceExhausted(f"size_bytes {size_bytes} exceeds this server's upload limit of "
                                    f"{self.max_upload_bytes} bytes", field="size_bytes")
        free = free_bytes(self.uploads_dir)
        if size_bytes > free:
            raise ResourceExhausted(f"size_bytes {size_bytes} exceeds the {free} bytes free on the "
                                    f"store's disk", field="size_bytes")
        labels = labels or {}
        body = json.dumps([kind.value, size_bytes, sha256, media_type, display_name, labels, _lineage_json(lineage)],
                          sort_keys=True)
        request_hash = hashlib.sha256(body.encode()).hexdigest()
        with self.db.transaction() as conn:
            if request_id:
                row = conn.execute("SELECT * FROM uploads WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None:
                    if row["request_hash"] != request_hash:
                        raise AlreadyExists(f"request_id {request_id!r} was already used for a different "
                                            f"upload", field="request_id")
                    return _upload_from_row(row)
            upload_id = uuid.uuid4().hex
            already = dedupe and conn.execute("SELECT 1 FROM artifacts WHERE sha256 = ?", (sha256,)).fetchone()
            conn.execute(
                "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (upload_id, request_id or None, request_hash, kind.value, size_bytes, sha256,
                 media_type or "application/octet-stream", display_name, json.dumps(labels),
                 size_bytes if already else 0, 1 if already else 0, time.time(), _lineage_json(lineage)))
        if not already:
            part = self.uploads_dir / f"{upload_id}.part"
            with disk_full_is_resource_exhausted(part, 0):
                part.touch()
        return self.get_upload(upload_id)

    def get_upload(self, upload_id: str) -> UploadRecord:
        rows = self.db.query("SELECT * FROM uploads WHERE upload_id = ?", (upload_id,))
        if not rows:
            raise NotFound(f"upload uploads/{upload_id} does not exist")
        return _upload_from_row(rows[0])

    def write_upload(self, upload_id: str, offset: int, chunks: Iterable[bytes]) -> UploadRecord:
        """Appends bytes at `offset` (must equal committed_bytes). Completes the upload on the last byte.

        Bytes received before a failure stay committed (fsynced), so the client can resume.
        """
        upload = self.get_upload(upload_id)
        if upload.succeeded:
            raise FailedPrecondition(f"upload {upload.name} already succeeded", reason="INVALID_FIELD",
                                     field="upload")
        if offset != upload.committed_bytes:
            raise OutOfRange(f"write at offset {offset}, but upload {upload.name} has "
                             f"{upload.committed_bytes} bytes committed; resume from there",
                             field="offset", metadata={"committed_bytes": str(upload.committed_bytes)})
        part = self.uploads_dir / f"{upload_id}.part"
        if not part.exists():
            self._restart_upload(upload_id)
            if offset:
                raise OutOfRange(f"upload {upload.name} lost its bytes (its part file is gone); resume from 0",
                                 field="offset", metadata={"committed_bytes": "0"})
        committed = offset
        # Unbuffered, so a failed write leaves nothing in a buffer to be flushed later: what reached the
        # file past the last fsync is cut off again, and only fsynced bytes are ever counted as committed.
        with disk_full_is_resource_exhausted(part, upload.size_bytes), open(part, "r+b", buffering=0) as f:
            f.truncate(committed)             # drop any bytes written but never committed
            f.seek(committed)
            durable, failure = committed, None
            try:
                for chunk in chunks:
                    if committed + len(chunk) > upload.size_bytes:
                        raise InvalidArgument(
                            f"upload {upload.name} declared {upload.size_bytes} bytes but "
                            f"{committed + len(chunk)} arrived", reason="TOO_LARGE", field="data")
                    _write_all(f, chunk)
                    committed += len(chunk)
            except BaseException as error:
                failure = error
                raise
            finally:
                try:
                    os.fsync(f.fileno())
                    durable = committed
                finally:
                    f.truncate(durable)
                    try:
                        self._set_committed(upload_id, durable)
                    except ResourceExhausted:
                        if failure is None:
                            raise
                        # The disk is full for the database too: the row keeps its older count, and the next
                        # write cuts the file back to it. The first error says why; it goes on.
                        log.warning("upload %s: could not record %d committed bytes", upload.name, durable)
        if committed == upload.size_bytes:
            return self._finish_upload(upload_id)
        return self.get_upload(upload_id)

    def _set_committed(self, upload_id: str, committed: int) -> None:
        with self.db.transaction() as conn:
            conn.execute("UPDATE uploads SET committed_bytes = ? WHERE upload_id = ?", (committed, upload_id))

    def _restart_upload(self, upload_id: str) -> None:
        """Back to zero bytes: an empty part file and committed_bytes 0."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE uploads SET committed_bytes = 0 WHERE upload_id = ?", (upload_id,))
        part = self.uploads_dir / f"{upload_id}.part"
        with contextlib.suppress(OSError):          # a full disk: the next write creates it
            part.touch()

    def _finish_upload(self, upload_id: str) -> UploadRecord:
        upload = self.get_upload(upload_id)
        part = self.uploads_dir / f"{upload_id}.part"
        if part.exists():
            try:
                sha, size = self.blobs.commit(part, expected_sha256=upload.sha256)
            except (InvalidArgument, ResourceExhausted):
                self._restart_upload(upload_id)     # wrong bytes, or no room to keep them: start over from zero
                raise
        elif self.blobs.exists(upload.sha256):      # the blob was committed, then the row could not be written
            sha, size = upload.sha256, self.blobs.size(upload.sha256)
        else:
            self._restart_upload(upload_id)
            raise OutOfRange(f"upload {upload.name} lost its bytes (its part file is gone); resume from 0",
                             field="offset", metadata={"committed_bytes": "0"})
        row = self.db.query("SELECT lineage_json FROM uploads WHERE upload_id = ?", (upload_id,))[0]
        self._insert(ArtifactRecord(sha, upload.kind, size, upload.media_type, upload.display_name,
                                    time.time(), _lineage_from_json(row["lineage_json"]), upload.labels))
        with self.db.transaction() as conn:
            conn.execute("UPDATE uploads SET succeeded = 1, committed_bytes = ? WHERE upload_id = ?",
                         (size, upload_id))
        return self.get_upload(upload_id)

    # ------------------------------------------------------------------ internals
    def _insert(self, record: ArtifactRecord) -> ArtifactRecord:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                (record.sha256, record.kind.value, record.size_bytes, record.media_type, record.display_name,
                 record.create_time, _lineage_json(record.lineage), json.dumps(record.labels, sort_keys=True)))
        return self.get(record.sha256)


def _write_all(f, chunk: bytes) -> None:
    """An unbuffered file may take part of a chunk per write."""
    view = memoryview(chunk)
    while view:
        view = view[f.write(view):]


# Limits on an upload's descriptive fields: they are stored in a row and echoed in every listing, so
# a client may not make them arbitrarily large (the same bound as an agent's labels).
MAX_NAME_CHARS = 1024
MAX_LABELS = 256
MAX_LABEL_CHARS = 256


def check_upload_metadata(*, media_type: str, display_name: str, request_id: str, labels: dict[str, str]) -> None:
    """INVALID_ARGUMENT naming the field when an upload's descriptive fields exceed their limits."""
    for field, value, limit in (("media_type", media_type, 255), ("display_name", display_name, MAX_NAME_CHARS),
                                ("request_id", request_id, 128)):
        if len(value) > limit:
            raise InvalidArgument(f"{field} is {len(value)} characters; the limit is {limit}", field=field)
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"labels has {len(labels)} entries; the limit is {MAX_LABELS}", field="labels")
    for key, value in labels.items():
        if not key or len(key) > MAX_LABEL_CHARS or len(value) > MAX_LABEL_CHARS:
            raise InvalidArgument(f"label {key[:40]!r}: keys must be 1-{MAX_LABEL_CHARS} characters and values at "
                                  f"most {MAX_LABEL_CHARS}", field=f"labels[{key[:40]}]")


def _lineage_json(lineage: Lineage) -> str:
    return json.dumps({"inputs": list(lineage.inputs), "recipe": lineage.recipe,
                       "tool_versions": lineage.tool_versions, "producer": lineage.producer,
                       "fidelity": lineage.fidelity}, sort_keys=True)


def _lineage_from_json(text: str) -> Lineage:
    raw = json.loads(text)
    return Lineage(tuple(raw["inputs"]), raw["recipe"], raw["tool_versions"], raw["producer"],
                   raw.get("fidelity", {}))                  # rows written before fidelity existed have none


def _artifact_from_row(row) -> ArtifactRecord:
    return ArtifactRecord(
        sha256=row["sha256"], kind=ArtifactKind(row["kind"]), size_bytes=row["size_bytes"],
        media_type=row["media_type"], display_name=row["display_name"], create_time=row["create_time"],
        lineage=_lineage_from_json(row["lineage_json"]), labels=json.loads(row["labels_json"]))


def _upload_from_row(row) -> UploadRecord:
    return UploadRecord(
        upload_id=row["upload_id"], kind=ArtifactKind(row["kind"]), size_bytes=row["size_bytes"],
        sha256=row["sha256"], committed_bytes=row["committed_bytes"], succeeded=bool(row["succeeded"]),
        media_type=row["media_type"], display_name=row["display_name"], labels=json.loads(row["labels_json"]))
