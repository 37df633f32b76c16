"""The agent's artifact cache: content-addressed files, digest-checked, LRU-evicted under a size cap."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

from clients.python import transfer


class ArtifactCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def fetch(self, sha256: str, size_bytes: int, read: Callable[[int], Iterator]) -> Path:
        """The verified file for `sha256`, downloading (resumably) if it is not cached."""
        path = self.path(sha256)
        if path.is_file() and path.stat().st_size == size_bytes and transfer.sha256_file(path) == sha256:
            os.utime(path)                                     # mark as recently used
            return path
        path.unlink(missing_ok=True)
        self.evict(keep_free=size_bytes)
        return transfer.download(read, path, sha256, size_bytes)

    def evict(self, keep_free: int = 0) -> None:
        """Deletes least recently used files until the cache plus `keep_free` fits the cap."""
        files = sorted((p for p in self.root.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total + keep_free > self.max_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink()
