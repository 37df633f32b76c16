"""Content-addressed blobs on a local filesystem.

Layout under `root`: `sha256/ab/<64 hex>` for blobs, `tmp/` for writes in progress. A blob
becomes visible only by `rename` after its bytes are fsynced, so a reader never sees half a file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

from shared.errors import DataLoss, InvalidArgument

CHUNK_BYTES = 1 << 20
_HEX = frozenset("0123456789abcdef")


def check_sha256(value: str, field: str = "sha256") -> str:
    if len(value) != 64 or not set(value) <= _HEX:
        raise InvalidArgument(f"{field} must be 64 lowercase hex characters, got {value[:80]!r}",
                              field=field)
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path):
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        self._verified: dict[str, tuple[int, int, int]] = {}   # sha -> (inode, size, mtime_ns)
        self._lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def temp_file(self, suffix: str = "") -> tuple[BinaryIO, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=suffix)
        return os.fdopen(fd, "wb"), Path(name)

    def commit(self, temp_path: Path, expected_sha256: str | None = None) -> tuple[str, int]:
        """Hashes a finished temp file, fsyncs it and renames it into place. Returns (sha, size).

        If `expected_sha256` is given and differs, the temp file is deleted and DIGEST_MISMATCH raised.
        """
        try:
            sha = sha256_file(temp_path)
            if expected_sha256 is not None and sha != expected_sha256:
                raise InvalidArgument(
                    f"content sha256 is {sha}, but {expected_sha256} was declared",
                    reason="DIGEST_MISMATCH", field="sha256")
            size = temp_path.stat().st_size
            with open(temp_path, "rb+") as f:
                os.fsync(f.fileno())
            final = self.path(sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                temp_path.unlink()
            else:
                os.chmod(temp_path, 0o444)
                os.replace(temp_path, final)
                fsync_dir(final.parent)
            return sha, size
        except BaseException:
            temp_path.unlink(missing_ok=True)
            raise

    def ingest(self, source: Path, *, move: bool = False) -> tuple[str, int]:
        """Copies (or moves, when on the same filesystem) a finished file into the store."""
        handle, temp = self.temp_file()
        handle.close()
        if move:
            try:
                os.replace(source, temp)
            except OSError:
                shutil.copyfile(source, temp)
                source.unlink()
        else:
            shutil.copyfile(source, temp)
        return self.commit(temp)

    def verified_path(self, sha256: str) -> Path:
        """The blob's path after checking that its bytes still hash to its name.

        The check is remembered per (inode, size, mtime) so a hot blob is hashed once per process.
        """
        path = self.path(sha256)
        stat = path.stat()
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if self._verified.get(sha256) == key:
                return path
        actual = sha256_file(path)
        if actual != sha256:
            raise DataLoss(f"stored blob {sha256} now hashes to {actual}; it is corrupt")
        with self._lock:
            self._verified[sha256] = key
        return path
