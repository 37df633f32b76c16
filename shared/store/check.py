"""`edgeforge store check`: is the artifact store on disk what its database says?

Checks, against a data directory (the coordinator's --data-dir):
- every artifact row has its blob, of the recorded size, whose bytes still hash to its name
  (MISSING_BLOB, SIZE_MISMATCH, CORRUPT_BLOB: data was lost; never repaired, only reported);
- every blob has a row (ORPHAN_BLOB: left by a write whose row never came, e.g. a full disk);
- files under blobs/ that are not blobs where they belong (UNKNOWN_FILE);
- temp entries whose writer is gone (STALE_TEMP), upload part files with no open upload (STRAY_PART);
- uploads open for longer than `stuck_after_s` (STUCK_UPLOAD), and open uploads whose committed bytes are
  no longer on disk (LOST_UPLOAD_BYTES);
- SQLite's own quick_check (DATABASE_CORRUPT).

`repair=True` removes only what holds no data anyone refers to: orphan blobs, stale temp entries and
stray part files (the last two only when older than `grace_s`: a live coordinator may be between
writing a blob and inserting its row). Rows are never deleted. Safe to run beside a live coordinator.
"""
from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import time
from pathlib import Path

from shared.errors import NotFound
from shared.store.blobs import STALE_TEMP_AGE_S, BlobStore, sha256_file

STUCK_UPLOAD_AFTER_S = 24 * 3600
REPAIR_GRACE_S = 3600.0
REPAIRABLE = frozenset({"ORPHAN_BLOB", "STALE_TEMP", "STRAY_PART"})


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


def check_store(data_dir: Path, *, repair: bool = False, stale_after_s: float = STALE_TEMP_AGE_S,
                stuck_after_s: float = STUCK_UPLOAD_AFTER_S, grace_s: float = REPAIR_GRACE_S) -> Report:
    """Checks the store under `data_dir` (see the module docstring); with `repair`, removes what is safe."""
    database = data_dir / "edgeforge.db"
    if not database.is_file():
        raise NotFound(f"no edgeforge store in {data_dir}: {database} does not exist (give the coordinator's "
                       "--data-dir)", field="data_dir")
    report = Report(str(data_dir))
    now = time.time()
    conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
    conn.row_factory = sqlite3.Row
    try:
        tables = {r["name"] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            report.problems.append(Problem("DATABASE_CORRUPT", str(database), f"quick_check: {verdict}"))
        rows = conn.execute("SELECT sha256, size_bytes FROM artifacts").fetchall() if "artifacts" in tables else []
        uploads = conn.execute("SELECT upload_id, committed_bytes, succeeded, create_time FROM uploads"
                               ).fetchall() if "uploads" in tables else []
    finally:
        conn.close()
    blobs = BlobStore(data_dir / "blobs")
    _check_rows(blobs, rows, report)
    known = {row["sha256"] for row in rows}
    _check_blob_files(blobs, known, now, report)
    _check_temp(blobs, stale_after_s, now, report)
    _check_uploads(data_dir / "uploads", uploads, stuck_after_s, now, report)
    if repair:
        for problem in report.problems:
            young = problem.kind != "STALE_TEMP" and not _old(Path(problem.path), now, grace_s)
            if problem.repairable and not young:
                _remove(Path(problem.path))
                report.repaired.append(problem)
    return report


def _check_rows(blobs: BlobStore, rows, report: Report) -> None:
    for row in rows:
        report.artifacts += 1
        path = blobs.path(row["sha256"])
        if not path.is_file():
            report.problems.append(Problem("MISSING_BLOB", str(path), f"artifacts/{row['sha256']} has a row but "
                                           "no blob: its bytes are lost"))
            continue
        size = path.stat().st_size
        if size != row["size_bytes"]:
            report.problems.append(Problem("SIZE_MISMATCH", str(path), f"the row says {row['size_bytes']} bytes, "
                                           f"the blob has {size}"))
            continue
        actual = sha256_file(path)
        report.bytes_verified += size
        if actual != row["sha256"]:
            report.problems.append(Problem("CORRUPT_BLOB", str(path), f"the bytes now hash to {actual}"))


def _check_blob_files(blobs: BlobStore, known: set[str], now: float, report: Report) -> None:
    for shard in sorted((blobs.root / "sha256").iterdir()):
        entries = sorted(shard.iterdir()) if shard.is_dir() else [shard]
        for entry in entries:
            name = entry.name
            if not (entry.is_file() and len(name) == 64 and entry.parent == blobs.root / "sha256" / name[:2]
                    and all(c in "0123456789abcdef" for c in name)):
                report.problems.append(Problem("UNKNOWN_FILE", str(entry), "not a blob where blobs belong "
                                               "(sha256/<first two hex>/<64 hex>)"))
                continue
            report.blobs += 1
            if name not in known:
                age = now - entry.stat().st_ctime
                report.problems.append(Problem("ORPHAN_BLOB", str(entry), f"{entry.stat().st_size} bytes that no "
                                               f"artifact row names ({age:.0f} s old)"))


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


def _old(path: Path, now: float, grace_s: float) -> bool:
    try:
        return now - path.lstat().st_ctime >= grace_s
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
