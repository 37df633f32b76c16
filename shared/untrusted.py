"""Checks for model files edgeforge did not write: run them before any library allocates or executes
anything the file describes.

Teams upload safetensors, GGUF, ONNX, torch checkpoints and tars. A file's header can claim a 2⁶³-byte
header, a tensor of 2⁶⁴ elements, a member named `../../etc/cron.d/x` or a pickle that runs code when
loaded. Everything here compares what a file claims with what it is (its size on disk) and with the
limits below, using Python ints (no int64 overflow), and fails with `InvalidArgument` naming the file,
the field and the value, or `ResourceExhausted` when a well-formed file is simply too big to accept.

Limits and why:
- MAX_SAFETENSORS_HEADER_BYTES 100 MB: the safetensors crate's own MAX_HEADER_SIZE; a 1 M-tensor model
  needs ~100 bytes a tensor.
- MAX_TENSORS 1,000,000 and MAX_DIMS 8: far beyond any checkpoint (a 405B LLM has < 2,000 tensors of
  rank ≤ 3); they bound the work of checking a header before its JSON is even trusted.
- MAX_NAME_BYTES 1,024: tensor, key and member names; HF names are < 100 bytes.
- MAX_ONNX_BYTES 2 GiB: protobuf cannot parse a larger message; bigger models need external data.
- MAX_ARCHIVE_MEMBERS 10,000: a bundle holds a handful of files.
Torch files are read only through `torch_load_weights` / `load_exported_program`: `weights_only=True`
is forced for every nested `torch.load`, and archives needing plain pickle are refused unopened.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import tarfile
import threading
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np

from shared.errors import InvalidArgument, ResourceExhausted

MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
MAX_TENSORS = 1_000_000
MAX_DIMS = 8
MAX_NAME_BYTES = 1024
MAX_ELEMENTS = 2**63 - 1             # what an int64 element count (torch, numpy, ggml) can hold
MAX_ONNX_BYTES = 2**31 - 1
MAX_ARCHIVE_MEMBERS = 10_000
# safetensors dtype -> bytes per element (the spec's table; BF16 and F8 are read as their raw bits)
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                        "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "com.microsoft")   # built into runtimes


def _invalid(message: str, reason: str = "MALFORMED_MODEL", field: str = "model") -> InvalidArgument:
    return InvalidArgument(message, reason=reason, field=field)


# ---------------------------------------------------------------- names and shapes

def check_name(name: object, what: str, kind: str = "tensor name", field: str = "model",
               reason: str = "MALFORMED_MODEL") -> str:
    """`name` as a str that is safe to use as a file name component or key: 1..MAX_NAME_BYTES bytes
    of UTF-8, no control characters, not absolute, no `..` component (tar, zip and some exporters
    turn names into paths, so a name that could escape a directory is refused everywhere)."""
    if not isinstance(name, str) or not name:
        raise _invalid(f"{what}: {kind} {name!r:.100} is not a non-empty string", reason, field)
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise _invalid(f"{what}: {kind} {name[:60]!r}… is longer than {MAX_NAME_BYTES} bytes", reason, field)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise _invalid(f"{what}: {kind} {name[:100]!r} contains a control character", reason, field)
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 2 and name[1] == ":" and name[2] in "/\\") or ".." in parts:
        raise _invalid(f"{what}: {kind} {name[:100]!r} could escape its directory; refused", reason, field)
    return name


def element_count(shape: object, what: str, *, min_dim: int = 0, max_dims: int = MAX_DIMS) -> int:
    """The number of elements of `shape` (a list/tuple of ints), after checking rank ≤ max_dims, each
    dimension ≥ min_dim, and the product ≤ MAX_ELEMENTS (exact Python ints: nothing wraps around)."""
    if not isinstance(shape, (list, tuple)) or len(shape) > max_dims:
        raise _invalid(f"{what}: shape {str(shape)[:100]} is not a list of at most {max_dims} dimensions")
    count = 1
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < min_dim:
            raise _invalid(f"{what}: shape {str(shape)[:100]} has dimension {str(dim)[:40]}; each must be an "
                           f"integer ≥ {min_dim}")
        count *= dim
    if count > MAX_ELEMENTS:
        raise _invalid(f"{what}: shape {list(shape)} holds {count} elements, more than 2⁶³ − 1")
    return count


def check_finite(values: np.ndarray, name: str, what: str = "model") -> None:
    """Refuses NaN or ±Inf anywhere in a floating-point array (quantizers would spread them silently)."""
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        bad = int(values.size - np.isfinite(values).sum())
        raise _invalid(f"{what}: tensor {name} contains {bad} NaN or Inf values; refused")


# ---------------------------------------------------------------- safetensors

@dataclasses.dataclass(frozen=True)
class SafetensorsEntry:
    dtype: str                      # a key of SAFETENSORS_ITEMSIZE
    shape: tuple[int, ...]
    begin: int                      # offsets in the data region (after the header)
    end: int


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: every tensor lies inside the data region, the data region is covered exactly."""
    header_bytes: int               # N, the JSON length
    tensors: dict[str, SafetensorsEntry]   # in header order
    metadata: dict[str, str]
    raw: dict                       # the parsed JSON, as written

    @property
    def data_start(self) -> int:
        return 8 + self.header_bytes


def read_safetensors_header(path: Path, what: str | None = None) -> SafetensorsHeader:
    """Reads and checks the header of the safetensors file `path` (reads 8 + N bytes, nothing else)."""
    path = Path(path)
    what = what or path.name
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = _header_length(prefix, size, what)
        body = f.read(length)
    return parse_safetensors_header(prefix + body, size, what)


def parse_safetensors_header(data: bytes, file_size: int, what: str) -> SafetensorsHeader:
    """Checks a safetensors header. `data` starts at byte 0 of the file and holds at least 8 + N
    bytes (it may be the whole file); `file_size` is the size of the whole file.

    The spec (huggingface/safetensors README, "Format"): u64 little-endian N; N bytes of UTF-8 JSON
    starting with `{`, optionally padded with spaces; an object mapping each tensor name to
    {dtype, shape, data_offsets: [begin, end]} plus an optional "__metadata__" {str: str}; the data
    region must be covered exactly, without holes or overlaps."""
    length = _header_length(data[:8], file_size, what)
    body = data[8:8 + length]
    if len(body) < length:
        raise _invalid(f"{what}: the file ends inside its {length}-byte header")
    if not body.startswith(b"{"):
        raise _invalid(f"{what}: the header is not JSON (it must start with '{{', got {body[:8]!r})")
    try:
        header = json.loads(body.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as error:
        raise _invalid(f"{what}: the header is not JSON (not UTF-8: {error.reason} at byte {error.start})")
    except RecursionError:
        raise _invalid(f"{what}: the header JSON nests too deeply")
    except ValueError as error:               # JSONDecodeError, a duplicate key, an over-long integer
        raise _invalid(f"{what}: the header is not JSON: {str(error)[:200]}")
    if not isinstance(header, dict):
        raise _invalid(f"{what}: the header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _invalid(f"{what}: __metadata__ must map strings to strings")
    if len(header) - ("__metadata__" in header) > MAX_TENSORS:
        raise ResourceExhausted(f"{what}: the header lists more than {MAX_TENSORS} tensors", field="model")
    data_bytes = file_size - 8 - length
    tensors = {name: _entry(name, value, data_bytes, what) for name, value in header.items() if name != "__metadata__"}
    _check_coverage(tensors, data_bytes, what)
    return SafetensorsHeader(length, tensors, dict(metadata), header)


def _header_length(prefix: bytes, file_size: int, what: str) -> int:
    if len(prefix) < 8 or file_size < 8:
        raise _invalid(f"{what}: {file_size} bytes, too short for the 8-byte safetensors header length")
    (length,) = struct.unpack("<Q", prefix)
    if length > file_size - 8:
        raise _invalid(f"{what}: header length {length} exceeds the file size {file_size}")
    if length < 2:
        raise _invalid(f"{what}: header length {length}; the smallest header, '{{}}', is 2 bytes")
    if length > MAX_SAFETENSORS_HEADER_BYTES:
        raise ResourceExhausted(f"{what}: header length {length} exceeds the limit of {MAX_SAFETENSORS_HEADER_BYTES} "
                                "bytes", field="model")
    return length


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:100]!r}")
        out[key] = value
    return out


def _entry(name: str, value: object, data_bytes: int, what: str) -> SafetensorsEntry:
    check_name(name, what)
    label = f"{what}: tensor {name[:100]!r}"
    if not isinstance(value, dict) or sorted(value) != ["data_offsets", "dtype", "shape"]:
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise _invalid(f"{label} must be an object with exactly dtype, shape and data_offsets, got {str(keys)[:100]}")
    dtype, offsets = value["dtype"], value["data_offsets"]
    if dtype not in SAFETENSORS_ITEMSIZE:
        raise _invalid(f"{label} has unknown dtype {str(dtype)[:40]!r}; expected one of {sorted(SAFETENSORS_ITEMSIZE)}")
    count = element_count(value["shape"], label)
    if not (isinstance(offsets, list) and len(offsets) == 2 and
            all(isinstance(v, int) and not isinstance(v, bool) for v in offsets)):
        raise _invalid(f"{label} data_offsets {str(offsets)[:100]} are not two integers [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise _invalid(f"{label} data_offsets {[begin, end]} fall outside the {data_bytes} data bytes")
    if end - begin != count * SAFETENSORS_ITEMSIZE[dtype]:
        raise _invalid(f"{label} is {dtype}{list(value['shape'])} ({count * SAFETENSORS_ITEMSIZE[dtype]} bytes) but "
                       f"data_offsets {[begin, end]} hold {end - begin} bytes")
    return SafetensorsEntry(dtype, tuple(value["shape"]), begin, end)


def _check_coverage(tensors: dict[str, SafetensorsEntry], data_bytes: int, what: str) -> None:
    """Sorted by offset, each tensor starts where the previous one ended and the last ends at the end
    of the file: no overlap (two names for one buffer) and no hole (hidden bytes)."""
    position, previous = 0, None
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            problem = "overlaps" if entry.begin < position else "leaves a gap after"
            raise _invalid(f"{what}: tensor {name[:100]!r} at data_offsets {[entry.begin, entry.end]} {problem} "
                           f"{repr(previous[:100]) if previous else 'the start of the data'} (which ends at {position})")
        position, previous = entry.end, name
    if position != data_bytes:
        raise _invalid(f"{what}: the tensors cover {position} of the {data_bytes} data bytes; the rest is unaccounted "
                       "for")


# ---------------------------------------------------------------- ONNX

def load_onnx(path: Path, what: str | None = None, *, external_data: bool = False):
    """An onnx.ModelProto read without its external data, after a size check, with every tensor's
    external-data location checked (or, `external_data=False`, any external tensor refused), every
    node's domain a built-in or model-local one (no custom-op libraries), and onnx.checker passed."""
    import onnx
    from google.protobuf.message import DecodeError
    path = Path(path)
    what = what or path.name
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise ResourceExhausted(f"{what}: {size} bytes, over the {MAX_ONNX_BYTES}-byte protobuf limit; keep large "
                                "weights in external data", field="model")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise _invalid(f"{what} starts like an ONNX model but does not parse: {str(error)[:200]}",
                       reason="UNKNOWN_MODEL_FORMAT")
    check_onnx_model(model, what, external_data=external_data)
    return model


def check_onnx_model(model, what: str, *, external_data: bool = False) -> None:
    import onnx
    from onnx.external_data_helper import _get_all_tensors
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if not external_data:
            raise _invalid(f"{what}: tensor {tensor.name[:100]!r} keeps its data in an external file; upload one "
                           ".onnx with the weights inside", reason="UNKNOWN_MODEL_FORMAT")
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        check_name(location, what, "external data location")
    local = {function.domain for function in model.functions}
    domains = {node.domain for node in model.graph.node} | {n.domain for f in model.functions for n in f.node}
    unknown = sorted(domains - set(_ONNX_DOMAINS) - local)
    if unknown:
        raise InvalidArgument(f"{what}: nodes in custom operator domain {unknown[0]!r}; only the standard ONNX "
                              f"domains {list(_ONNX_DOMAINS)} are run (no custom-op libraries)",
                              reason="UNSUPPORTED_OP", field="model")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as error:
        raise _invalid(f"{what} fails onnx.checker: {str(error)[:300]}")


# ---------------------------------------------------------------- torch

_force_lock = threading.Lock()


@contextlib.contextmanager
def weights_only_everywhere() -> Iterator[None]:
    """Every torch.load in this block runs with weights_only=True, even one a library calls with
    weights_only=False (torch.export.load falls back to plain pickle): TORCH_FORCE_WEIGHTS_ONLY_LOAD
    overrides an explicit argument (torch/serialization.py). Making other threads' loads stricter
    for a moment is harmless: edgeforge never loads a full pickle."""
    with _force_lock:
        previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            if previous is None:
                del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def torch_load_weights(path: Path, what: str | None = None):
    """A torch.save'd checkpoint read with weights_only=True (tensors, dicts, lists, numbers only:
    a pickled class or function is refused, never called)."""
    import torch
    path = Path(path)
    what = what or path.name
    try:
        with weights_only_everywhere():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:      # torch raises UnpicklingError, RuntimeError, EOFError, zip errors, …
        raise _invalid(f"{what}: a torch checkpoint that torch.load(weights_only=True) refuses: "
                       f"{type(error).__name__}: {str(error)[:200]}", reason="UNKNOWN_MODEL_FORMAT") from error


def check_exported_program_archive(path: Path, what: str) -> None:
    """Refuses a .pt2 whose members escape the archive or whose constants need plain pickle
    (`custom_obj_*`, `opaque_obj_*` in data/constants/*_constants_config.json: torch.export.load
    unpickles them with pickle.loads / the TorchScript unpickler, outside torch.load's weights_only)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > MAX_ARCHIVE_MEMBERS:
                raise _invalid(f"{what}: more than {MAX_ARCHIVE_MEMBERS} archive members")
            for member in members:
                check_name(member.filename.rstrip("/"), what, "archive member")
                if member.filename.endswith("_constants_config.json"):
                    _check_constants_config(archive.read(member), what)
    except zipfile.BadZipFile as error:
        raise _invalid(f"{what} is not a readable .pt2 archive: {error}", reason="UNKNOWN_MODEL_FORMAT")


def _check_constants_config(raw: bytes, what: str) -> None:
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise _invalid(f"{what}: a constants config is not JSON: {str(error)[:100]}")
    entries = config.get("config", {}) if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _invalid(f"{what}: a constants config is not an object with a 'config' object")
    for fqn, meta in entries.items():
        path_name = meta.get("path_name", "") if isinstance(meta, dict) else ""
        if not isinstance(path_name, str) or path_name.startswith(("custom_obj_", "opaque_obj_")):
            raise _invalid(f"{what}: constant {str(fqn)[:100]!r} is a pickled Python object ({str(path_name)[:60]}); "
                           "only tensors are accepted", reason="UNSUPPORTED_OP")


def load_exported_program(path: Path, what: str | None = None):
    """torch.export.load of an untrusted .pt2: archive checked first, every nested torch.load forced to
    weights_only=True."""
    import torch
    path = Path(path)
    what = what or path.name
    check_exported_program_archive(path, what)
    try:
        with weights_only_everywhere():
            return torch.export.load(str(path))
    except Exception as error:      # torch.export.load raises many unrelated types on a foreign archive
        raise _invalid(f"{what} is not an ExportedProgram torch {torch.__version__} reads safely: "
                       f"{type(error).__name__}: {str(error)[:200]}", reason="UNKNOWN_MODEL_FORMAT") from error


# ---------------------------------------------------------------- tar archives

class ArchiveCheck:
    """Checks the members of an uncompressed tar one by one, before each is extracted: at most
    MAX_ARCHIVE_MEMBERS; a regular file (or, with `directories`, a directory), never a symlink,
    hard link, device or FIFO; a relative name without `..`, empty or `.` parts; no name twice and no
    file where another member needs a directory; sizes summing to at most the archive's own size
    (an uncompressed tar cannot hold more than itself)."""

    def __init__(self, archive_size: int, what: str, *, directories: bool, reason: str = "MALFORMED_MODEL",
                 field: str = "model"):
        self.archive_size, self.what, self.directories, self.reason, self.field = \
            archive_size, what, directories, reason, field
        self.count, self.total, self.files, self.folders = 0, 0, set(), set()

    def _refuse(self, message: str) -> InvalidArgument:
        return InvalidArgument(f"{self.what}: {message}", reason=self.reason, field=self.field)

    def check(self, member: tarfile.TarInfo) -> PurePosixPath:
        self.count += 1
        if self.count > MAX_ARCHIVE_MEMBERS:
            raise self._refuse(f"more than {MAX_ARCHIVE_MEMBERS} members; refused")
        name = member.name.rstrip("/") if member.isdir() else member.name
        check_name(name, self.what, "archive member", self.field, self.reason)
        if any(part in ("", ".") for part in name.split("/")):
            raise self._refuse(f"archive member {name[:100]!r} has an empty or '.' component; refused")
        if not (member.isfile() or self.directories and member.isdir()):
            kind = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a device",
                    tarfile.BLKTYPE: "a device", tarfile.FIFOTYPE: "a FIFO", tarfile.DIRTYPE: "a directory"}
            raise self._refuse(f"archive member {name[:100]!r} is {kind.get(member.type, 'not a regular file')}; only "
                               "regular files" + (" and directories" if self.directories else "") + " are accepted; refused")
        path = PurePosixPath(name)
        parents = {"/".join(path.parts[:i]) for i in range(1, len(path.parts))}
        if name in self.files or (member.isfile() and name in self.folders) or parents & self.files:
            raise self._refuse(f"archive member {name[:100]!r} appears twice or clashes with a file of that name; "
                               "refused")
        (self.folders if member.isdir() else self.files).add(name)
        self.folders |= parents
        self.total += max(member.size, 0)
        if self.total > self.archive_size:
            raise self._refuse(f"members claim {self.total} bytes, more than the {self.archive_size}-byte archive")
        return path


def checked_members(tar: tarfile.TarFile, archive_size: int, what: str, *, directories: bool,
                    reason: str = "MALFORMED_MODEL", field: str = "model") -> Iterator[tuple[tarfile.TarInfo, PurePosixPath]]:
    """(member, its path) for each member of `tar`, each passed through ArchiveCheck first."""
    check = ArchiveCheck(archive_size, what, directories=directories, reason=reason, field=field)
    for member in tar:
        yield member, check.check(member)
