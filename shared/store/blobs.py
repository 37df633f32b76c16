"""Content-addressed blobs on a local filesystem (`BlobStore`), and `open_blobs`, which also opens the
S3-compatible store (shared/store/s3.py) behind the same interface.

Layout under `root`: `sha256/ab/<64 hex>` for blobs, `tmp/` for writes in progress. A blob
becomes visible only by `rename` after its bytes are fsynced, so a reader never sees half a file.

Temp entries are named `<pid>@<host>.<random><suffix>`, so after a crash the writer that left one
behind can be told dead (`stale_temp`) and the entry removed without racing a live writer. A full
disk (ENOSPC, EDQUOT) while writing is ResourceExhausted with reason STORAGE_FULL naming the path and
the bytes; the temp file is removed, so nothing partial is ever visible.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, Iterator

from shared.errors import DataLoss, InvalidArgument, ResourceExhausted

CHUNK_BYTES = 1 << 20
STALE_TEMP_AGE_S = 24 * 3600          # a temp entry whose writer cannot be identified is stale after this
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_HEX = frozenset("0123456789abcdef")
_HOST = socket.gethostname().replace(".", "_").replace("@", "_")[:64] or "localhost"


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


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file(source: Path, dest: Path) -> None:
    shutil.copyfile(source, dest)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


@contextlib.contextmanager
def disk_full_is_resource_exhausted(path: Path, size_bytes: int | None = None) -> Iterator[None]:
    """Turns ENOSPC/EDQUOT raised inside the block into ResourceExhausted (reason STORAGE_FULL)."""
    try:
        yield
    except OSError as error:
        if error.errno not in NO_SPACE_ERRNOS:
            raise
        raise storage_full(path, size_bytes, error.strerror or "no space left on device") from error


def storage_full(path: Path, size_bytes: int | None, why: str) -> ResourceExhausted:
    try:
        free = f"; {free_bytes(path.parent if not path.is_dir() else path)} bytes free"
    except OSError:
        free = ""
    size = f" ({size_bytes} bytes)" if size_bytes is not None else ""
    metadata = {"path": str(path)} | ({"size_bytes": str(size_bytes)} if size_bytes is not None else {})
    return ResourceExhausted(f"the store's disk is full: writing {path}{size} failed: {why}{free}",
                             reason="STORAGE_FULL", metadata=metadata)


def temp_owner_alive(name: str) -> bool | None:
    """Whether the process that made the temp entry `name` still runs: None when unknown (another host,
    or a name not made by `BlobStore.temp_file`/`temp_dir`)."""
    pid, sep, host = name.split(".", 1)[0].partition("@")
    if not sep or not pid.isdigit() or host != _HOST:
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:                  # alive, owned by another user
        return True
    return True


@dataclasses.dataclass(frozen=True)
class StoredBlob:
    """One entry found where blobs are stored: `sha256` is None when it is not a blob where blobs belong."""
    location: str        # s3://bucket/key, or a local path
    sha256: str | None
    size_bytes: int
    modified_time: float  # seconds since the epoch


class BlobStore:
    def __init__(self, root: Path):
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        self._verified: dict[str, tuple[int, int, int]] = {}   # sha -> (inode, size, mtime_ns)
        self._lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        return self._local_path(sha256)

    def _local_path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int | None:
        """The stored blob's size in bytes, or None when it is not stored."""
        try:
            return self._local_path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def temp_file(self, suffix: str = "") -> tuple[BinaryIO, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix=f"{os.getpid()}@{_HOST}.", suffix=suffix)
        return os.fdopen(fd, "wb"), Path(name)

    def temp_dir(self) -> Path:
        """A scratch directory under tmp/, tagged with this process like `temp_file`."""
        return Path(tempfile.mkdtemp(dir=self.tmp, prefix=f"{os.getpid()}@{_HOST}."))

    def stale_temp(self, max_age_s: float = STALE_TEMP_AGE_S, now: float | None = None) -> list[Path]:
        """Temp entries left by writers that are gone: their process is dead (same host), or, when the
        writer cannot be identified, older than `max_age_s`. A live writer's entries are never listed."""
        now = time.time() if now is None else now
        stale = []
        for entry in sorted(self.tmp.iterdir()):
            alive = temp_owner_alive(entry.name)
            try:
                old = now - entry.lstat().st_mtime > max_age_s
            except FileNotFoundError:        # its writer just finished
                continue
            if alive is False or (alive is None and old):
                stale.append(entry)
        return stale

    def sweep_temp(self, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
        """Removes `stale_temp` entries (what a crashed writer left); returns them."""
        removed = self.stale_temp(max_age_s)
        for entry in removed:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return removed

    def commit(self, temp_path: Path, expected_sha256: str | None = None) -> tuple[str, int]:
        """Hashes a finished temp file, fsyncs it and renames it into place. Returns (sha, size).

        If `expected_sha256` is given and differs, the temp file is deleted and DIGEST_MISMATCH raised.
        A full disk is ResourceExhausted (STORAGE_FULL); the temp file is deleted either way.
        """
        try:
            size = temp_path.stat().st_size
            sha = sha256_file(temp_path)
            if expected_sha256 is not None and sha != expected_sha256:
                raise InvalidArgument(
                    f"content sha256 is {sha}, but {expected_sha256} was declared",
                    reason="DIGEST_MISMATCH", field="sha256")
            self._publish(temp_path, sha, size)
            return sha, size
        except BaseException:
            temp_path.unlink(missing_ok=True)
            raise

    def _publish(self, temp_path: Path, sha256: str, size: int) -> None:
        """Makes the hashed temp file the blob `sha256` (here: the local file; S3BlobStore uploads first)."""
        self._install(temp_path, sha256, size)

    def _install(self, temp_path: Path, sha256: str, size: int) -> Path:
        """fsyncs the temp file and renames it to the blob's local path (a no-op when that exists)."""
        final = self._local_path(sha256)
        with disk_full_is_resource_exhausted(temp_path, size):
            fsync_file(temp_path)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                temp_path.unlink()
            else:
                os.chmod(temp_path, 0o444)
                os.replace(temp_path, final)
                fsync_dir(final.parent)
        return final

    def ingest(self, source: Path, *, move: bool = False) -> tuple[str, int]:
        """Copies (or moves, when on the same filesystem) a finished file into the store."""
        handle, temp = self.temp_file(suffix="".join(source.suffixes)[-32:])
        handle.close()
        try:
            with disk_full_is_resource_exhausted(temp, source.stat().st_size):
                if move:
                    try:
                        os.replace(source, temp)
                    except OSError:
                        copy_file(source, temp)
                        source.unlink()
                else:
                    copy_file(source, temp)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return self.commit(temp)

    def verified_path(self, sha256: str) -> Path:
        """The blob's path after checking that its bytes still hash to its name.

        The check is remembered per (inode, size, mtime) so a hot blob is hashed once per process.
        """
        path = self._local_path(sha256)
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

    # ------------------------------------------------------------------ what `edgeforge store check` reads
    def location(self, sha256: str) -> str:
        return str(self._local_path(sha256))

    def hash_stored(self, sha256: str) -> str:
        """The sha256 of the blob's bytes as stored (not memoised)."""
        return sha256_file(self._local_path(sha256))

    def list_blobs(self) -> Iterator[StoredBlob]:
        """Every entry under sha256/, in name order; ones that are not blobs where they belong have sha256 None."""
        for shard in sorted((self.root / "sha256").iterdir()):
            for entry in sorted(shard.iterdir()) if shard.is_dir() else [shard]:
                name = entry.name
                good = (entry.is_file() and not entry.is_symlink() and len(name) == 64 and shard.is_dir()
                        and shard.name == name[:2] and set(name) <= _HEX)
                stat = entry.lstat()
                yield StoredBlob(str(entry), name if good else None, stat.st_size, stat.st_ctime)

    def delete(self, location: str) -> None:
        """Removes the entry at `location` (a path `list_blobs` gave)."""
        path = Path(location)
        if self.root / "sha256" not in path.parents:
            raise InvalidArgument(f"{location} is not under {self.root / 'sha256'}", field="location")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def unfinished_uploads(self) -> Iterator[StoredBlob]:
        """Writes begun and never finished nor cleaned up; none here (a local write in progress is a temp
        entry, see `stale_temp`). S3BlobStore lists its abandoned multipart uploads."""
        return iter(())

    def _remember_verified(self, sha256: str, path: Path) -> None:
        """Records that `path` (just hashed by the caller) holds the bytes of `sha256`."""
        stat = path.stat()
        with self._lock:
            self._verified[sha256] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def open_blobs(target: str | Path, local_root: Path, *, create_bucket: bool = False) -> BlobStore:
    """The blob store `target` names: a directory (e.g. `<data-dir>/blobs`) is a local BlobStore;
    `s3://bucket[/prefix]?endpoint_url=http://host:port&region=us-east-1` is an S3BlobStore whose
    verified cache and temp files live under `local_root` (credentials: the standard AWS environment
    variables or boto3's chain). `create_bucket` makes a missing bucket instead of refusing it (tests)."""
    text = str(target)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme == "s3":
        from shared.store.s3 import S3BlobStore           # boto3 is imported only by those who use S3
        return S3BlobStore.from_url(text, local_root, create_bucket=create_bucket)
    if scheme == "file":
        return BlobStore(Path(text[len("file://"):]))
    if scheme:
        raise InvalidArgument(f"blobs {text!r}: unknown scheme {scheme}://; give a directory or "
                              "s3://bucket[/prefix]?endpoint_url=...", field="blobs")
    return BlobStore(Path(text))
