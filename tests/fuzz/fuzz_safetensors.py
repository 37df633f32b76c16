"""Fuzz target: the safetensors header validator (shared/untrusted.py) and the readers behind it
(shared/models/bundle.py positioned reads, services/calibrator/stats_file.py).

Run: python -m tests.fuzz.fuzz_safetensors [libFuzzer flags] CORPUS_DIR…
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import atheris

import numpy as np  # noqa: E402  heavy dependencies are imported uninstrumented first
import safetensors  # noqa: F401

with atheris.instrument_imports(include=["shared.untrusted", "shared.models.bundle", "services.calibrator.stats_file"]):
    from services.calibrator.stats_file import CalibrationStats
    from shared import untrusted
    from shared.models import bundle

_SCRATCH = Path(tempfile.mkdtemp(prefix="fuzz-safetensors-"))
MAX_READ_BYTES = 1 << 20          # tensors above this are checked but not read (the header check is the target)


def check(data: bytes) -> None:
    header = untrusted.parse_safetensors_header(data, len(data), "fuzz.safetensors")
    path = _SCRATCH / f"{os.getpid()}.safetensors"
    path.write_bytes(data)
    stored = bundle.stored_tensors(path)
    assert set(stored) == set(header.tensors)
    for name, tensor in stored.items():
        entry = header.tensors[name]
        if entry.end - entry.begin > MAX_READ_BYTES:
            continue
        rows = tensor.shape[0] if tensor.shape else 1
        values = bundle.read_rows(tensor, 0, rows)
        expected = np.frombuffer(data[header.data_start + entry.begin:header.data_start + entry.end], np.uint8)
        assert values.tobytes() == expected.tobytes(), name
        untrusted.check_finite(values.astype(np.float32) if entry.dtype in ("F16", "F32", "F64") else values, name)
    stats = CalibrationStats.open(path)
    for weight in stats.weights():
        stats.abs_max(weight)


if __name__ == "__main__":
    from tests.fuzz.harness import main
    main(check)
