"""The agent's artifact cache: files named by their sha256, verified before every use, resumable
downloads, least-recently-used eviction under a size cap.

- A download streams FetchArtifact from the bytes already held (`<sha256>.part`), so a dropped
  connection costs only what was in flight: the next attempt resumes at the partial file's length.
- A download is hashed as its bytes arrive (one pass) and checked before it is renamed into place;
  bytes that do not hash to the lease's digest are deleted and the fetch fails (the agent never runs
  them).
- A cached file is hashed again before each use (a flipped bit on disk is caught, the file deleted
  and fetched again): hashing runs at ~1 GB/s, cheap next to loading a model into a runtime.
- Before a download, least recently used files are deleted until the new one fits under the cap;
  a file being used is touched (its mtime is the LRU clock) so it is evicted last.
- Directory exports arrive as tar files; `unpacked` extracts one into a scratch directory with the
  standard library's "data" filter (no absolute paths, no `..`, no links out, no devices).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import grpc

log = logging.getLogger("edgeforge.agent")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
Reader = Callable[[int], Iterable]                 # offset -> stream of ReadArtifactResponse


class CacheError(Exception):
    """An artifact that cannot be made available: digest mismatch, too large for the cap, retries spent."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactCache:
    def __init__(self, root: Path, max_bytes: int, *, attempts: int = 8, backoff_s: float = 0.5):
        self.root, self.max_bytes = root, max_bytes
        self.attempts, self.backoff_s = attempts, backoff_s
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()                   # slots share the cache; one download per digest
        self._busy: dict[str, threading.Lock] = {}
        self.downloads = self.resumes = self.corrupt = 0     # counters, for logs and tests

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def fetch(self, sha256: str, size_bytes: int, read: Reader) -> Path:
        """The verified file for `sha256`, downloading (resumably) if it is missing or corrupt."""
        if size_bytes > self.max_bytes:
            raise CacheError(f"the artifact is {size_bytes} bytes, over the cache cap of {self.max_bytes} bytes "
                             "(raise --cache-max-bytes)")
        with self._lock:
            busy = self._busy.setdefault(sha256, threading.Lock())
        with busy:
            path = self.path(sha256)
            if path.is_file():
                if path.stat().st_size == size_bytes and sha256_file(path) == sha256:
                    os.utime(path)                                 # most recently used
                    return path
                self.corrupt += 1
                log.warning("cached %s does not hash to its name; fetching it again", sha256[:12])
                path.unlink()
            self.evict(keep_free=size_bytes, keep=sha256)
            return self._download(sha256, size_bytes, read)

    def _download(self, sha256: str, size_bytes: int, read: Reader) -> Path:
        """Streams into `<sha256>.part`, hashing as the bytes arrive (one pass over the data: a resumed
        download first hashes what the partial file already holds), then renames it into place."""
        part = self.root / f"{sha256}.part"
        if part.exists() and part.stat().st_size > size_bytes:
            part.unlink()
        digest, hashed = hashlib.sha256(), 0
        for attempt in range(self.attempts):
            offset = part.stat().st_size if part.exists() else 0
            if hashed != offset:                       # a resume: hash the bytes kept from before
                digest, hashed = hashlib.sha256(), 0
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(4 << 20), b""):
                        digest.update(block)
                        hashed += len(block)
            if attempt:
                self.resumes += 1
                log.info("resuming %s at byte %d (attempt %d)", sha256[:12], offset, attempt + 1)
            try:
                if offset < size_bytes:
                    with open(part, "ab") as f:
                        for message in read(offset):
                            if message.offset != offset:
                                raise CacheError(f"the coordinator sent offset {message.offset}, expected {offset}")
                            if message.sha256 and message.sha256 != sha256:
                                raise CacheError(f"the coordinator is sending {message.sha256}, not the leased "
                                                 f"{sha256}")
                            f.write(message.data)
                            digest.update(message.data)
                            offset += len(message.data)
                break
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or attempt == self.attempts - 1:
                    raise
                log.warning("download of %s broke at byte %d: %s", sha256[:12], offset, error.details())
                time.sleep(min(self.backoff_s * 2 ** attempt, 10.0))
            finally:
                hashed = offset
        else:
            raise CacheError(f"the download of {sha256} did not complete in {self.attempts} attempts")
        part.touch()
        actual = digest.hexdigest()
        if actual != sha256 or part.stat().st_size != size_bytes or hashed != size_bytes:
            part.unlink()
            raise CacheError(f"downloaded bytes hash to {actual}, not the leased {sha256}; discarded")
        path = self.path(sha256)
        os.replace(part, path)
        self.downloads += 1
        return path

    def evict(self, keep_free: int = 0, keep: str = "") -> list[Path]:
        """Deletes least recently used files until the cache plus `keep_free` fits the cap."""
        files = sorted((p for p in self.root.iterdir() if p.is_file() and p.name != keep
                        and not p.name.endswith(".part")), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())
        removed = []
        while files and total + keep_free > self.max_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink()
            removed.append(oldest)
        return removed


def is_tar(path: Path) -> bool:
    with open(path, "rb") as f:
        header = f.read(512)
    return len(header) == 512 and header[257:262] == b"ustar"


class Unpacked:
    """`with Unpacked(path, scratch) as target:` — the file itself, or a tar extracted for this job."""

    def __init__(self, path: Path, scratch: Path):
        self.path, self.scratch = path, scratch
        self._dir: Path | None = None

    def __enter__(self) -> Path:
        if not is_tar(self.path):
            return self.path
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=f"{self.path.name[:12]}-", dir=self.scratch))
        try:
            with tarfile.open(self.path) as archive:
                archive.extractall(self._dir, filter="data")
        except (tarfile.TarError, OSError) as error:        # FilterError: a member would escape
            shutil.rmtree(self._dir, ignore_errors=True)
            raise CacheError(f"the artifact is a malformed or unsafe tar, not run: {error}") from error
        entries = list(self._dir.iterdir())
        return entries[0] if len(entries) == 1 and entries[0].is_dir() else self._dir

    def __exit__(self, *exc) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
