"""Fuzz target: the build spec, end to end: YAML bytes -> clients/python/spec.py (parse, validate,
to a BuildSpec proto) -> services/coordinator/spec.py (server-side validate, candidate plan) against a
real artifact store. The client parser's documented rejection is SpecError (and yaml.YAMLError
for text that is not YAML); the coordinator's is InvalidArgument.

Run: python -m tests.fuzz.fuzz_spec [libFuzzer flags] CORPUS_DIR…
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import atheris

import grpc  # noqa: F401  heavy dependencies are imported uninstrumented first
import yaml
from edgeforge.v1 import common_pb2, coordinator_pb2  # noqa: F401

with atheris.instrument_imports(include=["clients.python.spec", "services.coordinator.spec", "shared.quant"]):
    from clients.python import spec as client_spec
    from services.coordinator import spec as coordinator_spec

from shared.store.artifacts import ArtifactStore
from shared.store.database import Database
from shared.store.records import ArtifactKind

# Files the seed specs name (relative to the spec's directory): they must exist for the client parser.
FILES = {"model.gguf": b"GGUF fuzz model", "calibration.txt": b"calibration text\n", "evaluation.txt": b"held out\n",
         "training.txt": b"training text\n"}
_ROOT = Path(tempfile.mkdtemp(prefix="fuzz-spec-"))
for _name, _content in FILES.items():
    (_ROOT / _name).write_bytes(_content)
_DB = Database(_ROOT / "db" / "edgeforge.sqlite")
_STORE = ArtifactStore(_DB, _ROOT / "store")
_ARTIFACTS = {field: _STORE.put_file(_ROOT / name, kind).name for field, name, kind in (
    ("model", "model.gguf", ArtifactKind.SOURCE_MODEL), ("calibration", "calibration.txt", ArtifactKind.DATASET),
    ("evaluation", "evaluation.txt", ArtifactKind.DATASET), ("training", "training.txt", ArtifactKind.DATASET))}


def check(data: bytes) -> None:
    raw = yaml.safe_load(data)
    parsed = client_spec.parse(raw, _ROOT)
    spec = parsed.spec
    spec.model.artifact = _ARTIFACTS["model"]              # what the client does after uploading the files
    if parsed.calibration_path is not None:
        spec.calibration.dataset = _ARTIFACTS["calibration"]
    spec.evaluation.dataset = _ARTIFACTS["evaluation"]
    if parsed.training_path is not None:
        spec.training.dataset = _ARTIFACTS["training"]
    validated, _ = coordinator_spec.validate(spec, _STORE)
    coordinator_spec.plan(validated)


EXPECTED = (client_spec.SpecError, yaml.YAMLError)

if __name__ == "__main__":
    from tests.fuzz.harness import main
    main(check, EXPECTED)
