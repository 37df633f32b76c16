"""Model bundles: an HF-style model directory carried as one artifact (an uncompressed tar).

A bundle holds `config.json`, one or more `*.safetensors`, and tokenizer files. The tar is
deterministic (sorted names, zero mtimes/owners) so the same directory always has the same digest.
Unpacking refuses anything but plain files with simple names: no paths, links or devices.

Tensors are read with plain positioned reads (`read_rows`), never through a long-lived memory map:
the pages of a mapped file count in the process's RSS while they stay mapped, so mapping a 30 GB
checkpoint would make RSS climb with the model. A read() copies only the requested rows; the page
cache holds the rest outside the process. `ModelDir.row_chunks` walks a tensor in bounded chunks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from shared import untrusted
from shared.errors import InvalidArgument
from shared.models.decoder_config import DecoderConfig, load_config

MEDIA_TYPE = "application/x-edgeforge-model+tar"
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ALLOWED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".gguf")   # .gguf: a carried vocabulary
MAX_HEADER_BYTES = untrusted.MAX_SAFETENSORS_HEADER_BYTES   # safetensors JSON headers above this are refused
CHUNK_BYTES = 64 << 20                        # float32 bytes of one row chunk (row_chunks' default)
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F8_E4M3": np.uint8,
          "F8_E5M2": np.uint8, "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
          "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}   # BF16, F8: their raw bits
_ITEMSIZE = {name: np.dtype(dtype).itemsize for name, dtype in _NUMPY.items()}


def pack(directory: Path, out: Path) -> None:
    """Writes `directory`'s top-level files into an uncompressed, deterministic tar at `out`."""
    if not (directory / "config.json").is_file():
        raise InvalidArgument(f"{directory} has no config.json; not an HF model directory",
                              reason="UNKNOWN_MODEL_FORMAT", field="model.path")
    pack_files(directory, out, _ALLOWED_SUFFIXES)


def pack_files(directory: Path, out: Path, suffixes: tuple[str, ...]) -> None:
    """The flat tar every model bundle is: top-level files ending in `suffixes`, sorted, mtime 0, so the
    same directory always has the same digest."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(suffixes)
                   and _MEMBER_NAME.match(p.name))           # exactly what unpack() accepts back
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


def unpack(archive: Path, destination: Path, suffixes: tuple[str, ...] = _ALLOWED_SUFFIXES,
           required: str | None = "config.json") -> Path:
    """Extracts a bundle into `destination` atomically (temp dir + rename): plain files with simple names
    ending in `suffixes` only, and `required` among them. Returns `destination`."""
    if destination.is_dir():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=".unpack-"))
    try:
        with tarfile.open(archive, "r:") as tar:
            check = untrusted.ArchiveCheck(archive.stat().st_size, "model bundle", directories=False)
            for member in tar:
                if not member.isfile() or not _MEMBER_NAME.match(member.name) or \
                        not member.name.endswith(suffixes):
                    raise InvalidArgument(f"model bundle member {member.name[:100]!r} is not a plain file with a "
                                          f"simple name ending in one of {list(suffixes)}; refused",
                                          reason="MALFORMED_MODEL", field="model")
                check.check(member)                      # sizes against the archive, duplicates
                source = tar.extractfile(member)
                with open(staging / member.name, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
        if required and not (staging / required).is_file():
            raise InvalidArgument(f"model bundle has no {required}", reason="UNKNOWN_MODEL_FORMAT", field="model")
        os.replace(staging, destination)
    except tarfile.TarError as error:
        raise InvalidArgument(f"model bundle is not a readable tar: {error}", reason="MALFORMED_MODEL",
                              field="model")
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return destination


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, as written, after shared.untrusted checked every length,
    dtype, shape and offset against the file size (nothing the header claims is allocated first)."""
    return untrusted.read_safetensors_header(path).raw


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""
    path: Path
    offset: int                    # absolute file offset of the first byte
    shape: tuple[int, ...]
    dtype: str                     # safetensors dtype: F32, F16, BF16, U8, …

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along the first dimension (one element for a 1-D tensor)."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * _ITEMSIZE[self.dtype]


def stored_tensors(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of one safetensors file (header checked), by name, in header order."""
    header = untrusted.read_safetensors_header(path)
    return {name: StoredTensor(path, header.data_start + entry.begin, entry.shape, entry.dtype)
            for name, entry in header.tensors.items()}


def read_rows(tensor: StoredTensor, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of `tensor` in its stored dtype (BF16 as its uint16 bits), read with one
    positioned read into a fresh array: nothing stays mapped, so RSS grows by exactly these rows."""
    rows = tensor.shape[0] if tensor.shape else 1
    if not 0 <= start <= stop <= rows:
        raise InvalidArgument(f"rows [{start}, {stop}) fall outside a tensor of {rows} rows", field="rows")
    nbytes = (stop - start) * tensor.row_bytes
    out = np.empty(nbytes, dtype=np.uint8)
    view, done = memoryview(out), 0
    with open(tensor.path, "rb", buffering=0) as f:
        f.seek(tensor.offset + start * tensor.row_bytes)
        while done < nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise InvalidArgument(f"{tensor.path.name} ends inside a tensor ({done} of {nbytes} bytes read)",
                                      reason="MALFORMED_MODEL", field="model")
            done += got
    return out.view(_NUMPY[tensor.dtype]).reshape((stop - start, *tensor.shape[1:]) if tensor.shape else ())


class ModelDir:
    """An unpacked decoder model directory (llama, qwen2, gemma3). Tensors are read by positioned reads."""

    def __init__(self, path: Path):
        self.path = path
        self.config: DecoderConfig = load_config(path / "config.json")
        self._index: dict[str, StoredTensor] = {}
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise InvalidArgument(f"{path.name} has no *.safetensors weights", reason="UNKNOWN_MODEL_FORMAT",
                                  field="model")
        for shard in shards:
            self._index.update(stored_tensors(shard))
        unsupported = sorted({t.dtype for t in self._index.values() if t.dtype not in ("F32", "F16", "BF16")})
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
        """tokenizer.json (HF), else tokenizer.gguf: a vocabulary carried verbatim from a GGUF source
        (SentencePiece, or a pre-tokenizer with no tokenizer.json equivalent here; see tokenizer.py)."""
        carried = self.path / "tokenizer.gguf"
        if not (self.path / "tokenizer.json").is_file() and carried.is_file():
            return carried
        return self.path / "tokenizer.json"

    def tokenizer_config(self) -> dict:
        path = self.path / "tokenizer_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def tensor_names(self) -> list[str]:
        """Names in the config's canonical order (what a streaming consumer iterates)."""
        return list(self.config.tensor_shapes())

    def shape(self, name: str) -> tuple[int, ...]:
        return self._stored(name).shape

    def array(self, name: str) -> np.ndarray:
        """One whole tensor as a float32 numpy array (HF name). Big tensors: use row_chunks."""
        stored = self._stored(name)
        return self.rows(name, 0, stored.shape[0] if stored.shape else 1)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor as float32, shape (stop − start, *shape[1:]); for a 1-D
        tensor, elements [start, stop). Memory: those rows only (plus their stored-dtype copy)."""
        stored = self._stored(name)
        raw = read_rows(stored, start, stop)
        if stored.dtype == "BF16":                       # bfloat16 is the high half of a float32
            array = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            array = raw.astype(np.float32, copy=False)
        untrusted.check_finite(array, name)
        return array

    def row_chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows) over the whole tensor, each chunk at most `chunk_bytes` of
        float32 (at least one row)."""
        for start, stop in self.row_ranges(name, chunk_bytes):
            yield start, self.rows(name, start, stop)

    def row_ranges(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[int, int]]:
        """[start, stop) row ranges covering the tensor, each at most `chunk_bytes` of float32."""
        shape = self._stored(name).shape
        rows = shape[0] if shape else 1
        step = max(1, chunk_bytes // max(1, 4 * int(np.prod(shape[1:], dtype=np.int64))))
        return [(start, min(rows, start + step)) for start in range(0, rows, step)]

    def _stored(self, name: str) -> StoredTensor:
        stored = self._index.get(name)
        if stored is None:
            raise InvalidArgument(f"model has no tensor {name}", reason="MALFORMED_MODEL", field="model")
        expected = self.config.tensor_shapes().get(name)
        if expected is not None and stored.shape != expected:
            raise InvalidArgument(f"tensor {name} has shape {stored.shape}, config.json implies {expected}",
                                  reason="MALFORMED_MODEL", field="model")
        return stored

    def tensor(self, name: str):
        """One tensor as a float32 torch.Tensor (for the torch reference)."""
        import torch
        return torch.from_numpy(self.array(name))


def write_model_dir(directory: Path, config: DecoderConfig, tensors: Iterator[tuple[str, np.ndarray]],
                    tokenizer_json: str | None, tokenizer_config: dict) -> None:
    """Writes a float32 HF directory: config.json, model.safetensors (streamed), tokenizer files
    (tokenizer_json None: the caller writes the vocabulary itself, e.g. a tokenizer.gguf)."""
    from shared.tensors.safetensors_writer import write_safetensors
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=2, sort_keys=True))
    shapes = {name: (shape, "F32") for name, shape in config.tensor_shapes().items()}
    write_safetensors(directory / "model.safetensors", shapes, tensors, metadata={"format": "pt"})
    if tokenizer_json is not None:
        (directory / "tokenizer.json").write_text(tokenizer_json)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True))
