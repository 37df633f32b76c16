"""Model bundles: an HF-style model directory carried as one artifact (an uncompressed tar).

A bundle holds `config.json`, one or more `*.safetensors`, and tokenizer files. The tar is
deterministic (sorted names, zero mtimes/owners) so the same directory always has the same digest.
Unpacking refuses anything but plain files with simple names: no paths, links or devices.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import safe_open

from shared.errors import InvalidArgument
from shared.models.llama_config import LlamaConfig, load_config

MEDIA_TYPE = "application/x-edgeforge-model+tar"
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ALLOWED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")
MAX_HEADER_BYTES = 100 << 20                  # safetensors JSON headers above this are refused


def pack(directory: Path, out: Path) -> None:
    """Writes `directory`'s top-level files into an uncompressed, deterministic tar at `out`."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(_ALLOWED_SUFFIXES)
                   and _MEMBER_NAME.match(p.name))           # exactly what unpack() accepts back
    if not any(p.name == "config.json" for p in files):
        raise InvalidArgument(f"{directory} has no config.json; not an HF model directory",
                              reason="UNKNOWN_MODEL_FORMAT", field="model.path")
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            with open(path, "rb") as f:
                tar.addfile(info, f)


def is_bundle(path: Path) -> bool:
    return tarfile.is_tarfile(path)


def unpack(archive: Path, destination: Path) -> Path:
    """Extracts a bundle into `destination` atomically (temp dir + rename). Returns `destination`."""
    if destination.is_dir():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=".unpack-"))
    try:
        with tarfile.open(archive, "r:") as tar:
            for member in tar:
                if not member.isfile() or not _MEMBER_NAME.match(member.name) or \
                        not member.name.endswith(_ALLOWED_SUFFIXES):
                    raise InvalidArgument(f"model bundle member {member.name[:100]!r} is not a plain file with "
                                          "a simple name; refused", reason="MALFORMED_MODEL", field="model")
                source = tar.extractfile(member)
                with open(staging / member.name, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
        if not (staging / "config.json").is_file():
            raise InvalidArgument("model bundle has no config.json", reason="UNKNOWN_MODEL_FORMAT", field="model")
        os.replace(staging, destination)
    except tarfile.TarError as error:
        raise InvalidArgument(f"model bundle is not a readable tar: {error}", reason="MALFORMED_MODEL",
                              field="model")
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return destination


def read_safetensors_header(path: Path) -> dict:
    """Parses a safetensors header after checking its length against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InvalidArgument(f"{path.name} is {size} bytes, too short for a safetensors header",
                                  reason="MALFORMED_MODEL", field="model")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise InvalidArgument(f"{path.name} declares a {length}-byte header in a {size}-byte file",
                                  reason="MALFORMED_MODEL", field="model")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InvalidArgument(f"{path.name} header is not JSON: {error}", reason="MALFORMED_MODEL",
                                  field="model")
    data_bytes = size - 8 - length
    if not isinstance(header, dict):
        raise InvalidArgument(f"{path.name} header is a JSON {type(header).__name__}, not an object",
                              reason="MALFORMED_MODEL", field="model")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and
                all(isinstance(v, int) and not isinstance(v, bool) for v in offsets)):
            raise InvalidArgument(f"{path.name}: tensor {name[:100]!r} lacks two integer data_offsets",
                                  reason="MALFORMED_MODEL", field="model")
        begin, end = offsets
        if not (0 <= begin <= end <= data_bytes):
            raise InvalidArgument(f"{path.name}: tensor {name[:100]!r} data_offsets {[begin, end]} fall outside "
                                  f"the {data_bytes} data bytes", reason="MALFORMED_MODEL", field="model")
    return header


class ModelDir:
    """An unpacked llama model directory. Tensors are read one at a time from memory-mapped files."""

    def __init__(self, path: Path):
        self.path = path
        self.config: LlamaConfig = load_config(path / "config.json")
        self._index: dict[str, Path] = {}
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise InvalidArgument(f"{path.name} has no *.safetensors weights", reason="UNKNOWN_MODEL_FORMAT",
                                  field="model")
        self._dtypes: dict[str, str] = {}
        for shard in shards:
            for name, entry in read_safetensors_header(shard).items():
                if name != "__metadata__":
                    self._index[name] = shard
                    self._dtypes[name] = entry.get("dtype", "")
        unsupported = sorted({d for d in self._dtypes.values() if d not in ("F32", "F16", "BF16")})
        if unsupported:
            raise InvalidArgument(f"model tensors use dtype {unsupported[0]}; only F32, F16 and BF16 are supported",
                                  reason="UNSUPPORTED_OP", field="model")
        expected = self.config.tensor_shapes()
        missing = sorted(set(expected) - set(self._index))
        if missing:
            raise InvalidArgument(f"model lacks {len(missing)} tensors config.json requires, e.g. {missing[0]}",
                                  reason="MALFORMED_MODEL", field="model")

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    def tokenizer_config(self) -> dict:
        path = self.path / "tokenizer_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def tensor_names(self) -> list[str]:
        """Names in the config's canonical order (what a streaming consumer iterates)."""
        return list(self.config.tensor_shapes())

    def array(self, name: str) -> np.ndarray:
        """One tensor as a float32 numpy array (HF name), read from its memory-mapped shard.

        numpy handles F32/F16 directly; BF16 goes through torch (imported only then)."""
        shard = self._index.get(name)
        if shard is None:
            raise InvalidArgument(f"model has no tensor {name}", reason="MALFORMED_MODEL", field="model")
        if self._dtypes[name] == "BF16":
            import torch
            with safe_open(str(shard), framework="pt") as f:
                array = f.get_tensor(name).to(torch.float32).numpy()
        else:
            with safe_open(str(shard), framework="np") as f:
                array = f.get_tensor(name)
        expected = self.config.tensor_shapes().get(name)
        if expected is not None and tuple(array.shape) != expected:
            raise InvalidArgument(f"tensor {name} has shape {tuple(array.shape)}, config.json implies {expected}",
                                  reason="MALFORMED_MODEL", field="model")
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise InvalidArgument(f"tensor {name} contains NaN or Inf", reason="MALFORMED_MODEL", field="model")
        return array

    def tensor(self, name: str):
        """One tensor as a float32 torch.Tensor (for the torch reference)."""
        import torch
        return torch.from_numpy(self.array(name))


def write_model_dir(directory: Path, config: LlamaConfig, tensors: Iterator[tuple[str, np.ndarray]],
                    tokenizer_json: str, tokenizer_config: dict) -> None:
    """Writes a float32 HF directory: config.json, model.safetensors (streamed), tokenizer files."""
    from shared.tensors.safetensors_writer import write_safetensors
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=2, sort_keys=True))
    shapes = {name: (shape, "F32") for name, shape in config.tensor_shapes().items()}
    write_safetensors(directory / "model.safetensors", shapes, tensors, metadata={"format": "pt"})
    (directory / "tokenizer.json").write_text(tokenizer_json)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True))
