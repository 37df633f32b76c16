"""Which stats artifact the calibrator already made for a (model, dataset, config): a small JSON index in
the worker's cache directory, so a repeated Calibrate returns the stored artifact without running the
model. The store is the truth: an entry whose artifact no longer exists is ignored (and replaced).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

from shared.errors import NotFound


def cache_key(model_sha256: str, dataset_sha256: str, samples: int, sequence_length: int, hessians: str,
              version: int) -> str:
    parts = {"model": model_sha256, "dataset": dataset_sha256, "samples": samples,
             "sequence_length": sequence_length, "hessians": hessians, "version": version}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class CalibrationIndex:
    """key -> artifact name, persisted in `path` (rewritten atomically on every change)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def lookup(self, key: str, exists: Callable[[str], object]) -> str | None:
        """The artifact name stored under `key` if `exists(name)` does not raise NotFound."""
        with self._lock:
            name = self._read().get(key)
        if name is None:
            return None
        try:
            exists(name)
        except NotFound:
            return None
        return name

    def remember(self, key: str, name: str) -> None:
        with self._lock:
            entries = self._read()
            entries[key] = name
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as handle:
                json.dump(entries, handle, sort_keys=True)
            os.replace(handle.name, self.path)

    def _read(self) -> dict[str, str]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}                  # no index yet, or a damaged one: recalibrating is always correct
        return entries if isinstance(entries, dict) else {}
