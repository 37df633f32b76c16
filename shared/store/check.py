"""`edgeforge store check`: is the artifact store (a local directory or an S3 bucket) what its database says?

Checks, against a data directory (the coordinator's --data-dir):
- every artifact row has its blob, of the recorded size, whose bytes still hash to its name
  (MISSING_BLOB, SIZE_MISMATCH, CORRUPT_BLOB: data was lost; never repaired, only reported);
- every blob has a row (ORPHAN_BLOB: left by a write whose row never came, e.g. a full disk);
- files under blobs/ that are not blobs where they belong (UNKNOWN_FILE);
- on S3, multipart uploads begun and never completed nor aborted (UNFINISHED_UPLOAD: a writer died
  mid-upload; no reader sees them, but their parts hold space);
- temp entries whose writer is gone (STALE_TEMP), upload part files with no open upload (STRAY_PART);
- uploads open for longer than `stuck_after_s` (STUCK_UPLOAD), and open uploads whose committed bytes are
  no longer on disk (LOST_UPLOAD_BYTES);
- rows that contradict each other: an open upload with more bytes committed than its size, a finished upload
  with no artifact row (DATABASE_INCONSISTENT);
- SQLite's own quick_check (DATABASE_CORRUPT). On PostgreSQL (`database` a postgresql:// URL) the server
  guards its own pages; the check reads the rows over a normal connection and needs the tables to exist.

`repair=True` removes only what holds no data anyone refers to: orphan blobs, unfinished S3 uploads, stale
temp entries and stray part files (the last two only when older than `grace_s`: a live coordinator may be between
writing a blob and inserting its row). Rows are never deleted. Safe to run beside a live coordinator.
"""
from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import time
from pathlib import Path

from shared.errors import NotFound
from shared.store.blobs import STALE_TEMP_AGE_S, BlobStore, open_blobs

STUCK_UPLOAD_AFTER_S = 24 * 3600
REPAIR_GRACE_S = 3600.0
REPAIRABLE = frozenset({"ORPHAN_BLOB", "UNFINISHED_UPLOAD", "STALE_TEMP", "STRAY_PART"})
ARTIFACT_ROWS = "SELECT sha256, size_bytes FROM artifacts"
UPLOAD_ROWS = "SELECT upload_id, size_bytes, sha256, committed_bytes, succeeded, create_time FROM uploads"


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str            # one of the UPPER_SNAKE kinds in the module docstring
    path: str            # the file (or database row) concerned
    detail: str          # what is wrong, for humans

    @property
    def repairable(self) -> bool:
        return self.kind in REPAIRABLE


@dataclasses.dataclass
class Report:
    data_dir: str
    artifacts: int = 0                 # artifact rows checked
    blobs: int = 0                     # blob files found
    bytes_verified: int = 0            # bytes hashed
    uploads_open: int = 0              # uploads still accepting bytes
    temp_in_progress: int = 0          # temp entries of live writers (not problems)
    problems: list[Problem] = dataclasses.field(default_factory=list)
    repaired: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def remaining(self) -> list[Problem]:
        return [p for p in self.problems if p not in self.repaired]

    @property
    def clean(self) -> bool:
        return not self.remaining

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for problem in self.remaining:
            out[problem.kind] = out.get(problem.kind, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"data_dir": self.data_dir, "clean": self.clean, "artifacts": self.artifacts, "blobs": self.blobs,
                "bytes_verified": self.bytes_verified, "uploads_open": self.uploads_open,
                "temp_in_progress": self.temp_in_progress, "problem_counts": self.counts(),
                "problems": [dataclasses.asdict(p) | {"repairable": p.repairable} for p in self.remaining],
                "repaired": [dataclasses.asdict(p) for p in self.repaired]}

    def render(self) -> str:
        lines = [f"store {self.data_dir}: {self.artifacts} artifacts, {self.blobs} blobs, "
                 f"{self.bytes_verified} bytes verified, {self.uploads_open} open uploads"]
        lines += [f"repaired {p.kind} {p.path}: {p.detail}" for p in self.repaired]
        lines += [f"{p.kind} {p.path}: {p.detail}" + (" (--repair removes it)" if p.repairable else "")
                  for p in self.remaining]
        lines.append("clean" if self.clean else
                     "problems: " + ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts().items())))
        return "\n".join(lines)


def check_store(data_dir: Path, *, database: str | Path | None = None, repair: bool = False,
                stale_after_s: float = STALE_TEMP_AGE_S, stuck_after_s: float = STUCK_UPLOAD_AFTER_S,
                grace_s: float = REPAIR_GRACE_S, blobs: str | Path | None = None) -> Report:
    """Checks the store under `data_dir` (see the module docstring); with `repair`, removes what is safe.
    `blobs` is the coordinator's --blobs (default `data_dir`/blobs): for an s3:// bucket the objects are listed,
    sized and hashed in the bucket, and the temp entries checked are those of the local cache,
    `data_dir`/blob-cache.
    `database` is the coordinator's --database: a SQLite path or URL, or a postgresql:// URL (default
    `data_dir`/edgeforge.db)."""
    report = Report(str(data_dir))
    now = time.time()
    if database is not None and str(database).split("://", 1)[0] in ("postgresql", "postgres"):
        rows, uploads = _read_postgres(str(database))
    else:
        rows, uploads = _read_sqlite(_sqlite_path(data_dir, database), data_dir, report)
    _check_consistency(rows, uploads, report)
    blob_store = open_blobs(blobs or data_dir / "blobs", data_dir / "blob-cache")
    _check_rows(blob_store, rows, report)
    known = {row["sha256"] for row in rows}
    found_times = _check_blob_files(blob_store, known, now, report) | _check_unfinished(blob_store, now, report)
    _check_temp(blob_store, stale_after_s, now, report)
    _check_uploads(data_dir / "uploads", uploads, stuck_after_s, now, report)
    if repair:
        for problem in report.problems:
            young = problem.kind != "STALE_TEMP" and not _old(problem.path, found_times, now, grace_s)
            if problem.repairable and not young:
                if problem.kind == "ORPHAN_BLOB":
                    blob_store.delete(problem.path)
                elif problem.kind == "UNFINISHED_UPLOAD":
                    blob_store.abort_upload(problem.path)
                else:
                    _remove(Path(problem.path))
                report.repaired.append(problem)
    return report


def _sqlite_path(data_dir: Path, database: str | Path | None) -> Path:
    if database is None:
        return data_dir / "edgeforge.db"
    text = str(database)
    return Path("/" + text.removeprefix("sqlite://").lstrip("/")) if text.startswith("sqlite://") else Path(text)


def _read_sqlite(database: Path, data_dir: Path, report: Report) -> tuple[list, list]:
    """The artifact and upload rows, read-only, after SQLite's quick_check."""
    if not database.is_file():
        raise NotFound(f"no edgeforge store in {data_dir}: {database} does not exist (give the coordinator's "
                       "--data-dir)", field="data_dir")
    conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
    conn.row_factory = sqlite3.Row
    try:
        tables = {r["name"] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            report.problems.append(Problem("DATABASE_CORRUPT", str(database), f"quick_check: {verdict}"))
        rows = conn.execute(ARTIFACT_ROWS).fetchall() if "artifacts" in tables else []
        uploads = conn.execute(UPLOAD_ROWS).fetchall() if "uploads" in tables else []
    finally:
        conn.close()
    return rows, uploads


def _read_postgres(url: str) -> tuple[list, list]:
    """The artifact and upload rows of a PostgreSQL database; NOT_FOUND when it holds no store."""
    from shared.store.database import open_database
    db = open_database(url)
    try:
        missing = [table for table in ("artifacts", "uploads") if not db.columns(table)]
        if missing:
            raise NotFound(f"no edgeforge store in {db.target}: table {', '.join(missing)} does not exist (give "
                           "the coordinator's --database)", field="database")
        return db.query(ARTIFACT_ROWS), db.query(UPLOAD_ROWS)
    finally:
        db.close()


def _check_consistency(rows, uploads, report: Report) -> None:
    stored = {row["sha256"] for row in rows}
    for upload in uploads:
        where = f"uploads/{upload['upload_id']}"
        if upload["committed_bytes"] > upload["size_bytes"]:
            report.problems.append(Problem("DATABASE_INCONSISTENT", where, f"{upload['committed_bytes']} bytes "
                                           f"committed of an upload of {upload['size_bytes']}"))
        if upload["succeeded"] and upload["sha256"] not in stored:
            report.problems.append(Problem("DATABASE_INCONSISTENT", where, f"finished, but artifacts/"
                                           f"{upload['sha256']} has no row"))


def _check_rows(blobs: BlobStore, rows, report: Report) -> None:
    for row in rows:
        report.artifacts += 1
        sha = row["sha256"]
        where = blobs.location(sha)
        size = blobs.size(sha)
        try:
            if size is None:
                raise FileNotFoundError(where)
            if size != row["size_bytes"]:
                report.problems.append(Problem("SIZE_MISMATCH", where, f"the row says {row['size_bytes']} bytes, "
                                               f"the blob has {size}"))
                continue
            actual = blobs.hash_stored(sha)
        except (FileNotFoundError, NotFound):           # also: deleted between sizing and hashing
            report.problems.append(Problem("MISSING_BLOB", where, f"artifacts/{sha} has a row but no blob: its "
                                           "bytes are lost"))
            continue
        report.bytes_verified += size
        if actual != sha:
            report.problems.append(Problem("CORRUPT_BLOB", where, f"the bytes now hash to {actual}"))


def _check_blob_files(blobs: BlobStore, known: set[str], now: float, report: Report) -> dict[str, float]:
    """Lists orphan blobs and unknown entries; returns each orphan's location -> modification time."""
    found_times = {}
    for entry in blobs.list_blobs():
        if entry.sha256 is None:
            report.problems.append(Problem("UNKNOWN_FILE", entry.location, "not a blob where blobs belong "
                                           "(sha256/<first two hex>/<64 hex>)"))
            continue
        report.blobs += 1
        if entry.sha256 not in known:
            found_times[entry.location] = entry.modified_time
            report.problems.append(Problem("ORPHAN_BLOB", entry.location, f"{entry.size_bytes} bytes that no "
                                           f"artifact row names ({now - entry.modified_time:.0f} s old)"))
    return found_times


def _check_unfinished(blobs: BlobStore, now: float, report: Report) -> dict[str, float]:
    """Lists abandoned multipart uploads (S3 only); returns each one's location -> start time."""
    found_times = {}
    for upload in blobs.unfinished_uploads():
        found_times[upload.location] = upload.modified_time
        report.problems.append(Problem("UNFINISHED_UPLOAD", upload.location, f"a multipart upload begun "
                                       f"{now - upload.modified_time:.0f} s ago and never completed"))
    return found_times


def _check_temp(blobs: BlobStore, stale_after_s: float, now: float, report: Report) -> None:
    stale = blobs.stale_temp(stale_after_s, now)
    for entry in stale:
        report.problems.append(Problem("STALE_TEMP", str(entry), "a temp entry whose writer is gone"))
    report.temp_in_progress = sum(1 for _ in blobs.tmp.iterdir()) - len(stale)


def _check_uploads(uploads_dir: Path, uploads, stuck_after_s: float, now: float, report: Report) -> None:
    open_uploads = {row["upload_id"]: row for row in uploads if not row["succeeded"]}
    report.uploads_open = len(open_uploads)
    for upload_id, row in open_uploads.items():
        part = uploads_dir / f"{upload_id}.part"
        on_disk = part.stat().st_size if part.is_file() else None
        if row["committed_bytes"] and (on_disk is None or on_disk < row["committed_bytes"]):
            report.problems.append(Problem("LOST_UPLOAD_BYTES", str(part), f"uploads/{upload_id} committed "
                                           f"{row['committed_bytes']} bytes but {on_disk or 0} are on disk"))
        if now - row["create_time"] > stuck_after_s:
            report.problems.append(Problem("STUCK_UPLOAD", f"uploads/{upload_id}", f"open for "
                                           f"{(now - row['create_time']) / 3600:.1f} h with {row['committed_bytes']} "
                                           "bytes committed"))
    if uploads_dir.is_dir():
        for part in sorted(uploads_dir.glob("*.part")):
            if part.name.removesuffix(".part") not in open_uploads:
                report.problems.append(Problem("STRAY_PART", str(part), "a part file of no open upload"))


def _old(location: str, found_times: dict[str, float], now: float, grace_s: float) -> bool:
    """Whether the entry at `location` is at least `grace_s` old (a listed blob's time, else the file's ctime)."""
    if location in found_times:
        return now - found_times[location] >= grace_s
    try:
        return now - Path(location).lstat().st_ctime >= grace_s
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
