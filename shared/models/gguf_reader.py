"""A small, fast GGUF reader: every metadata value with its exact GGUF type, the tensor infos, and
one tensor's bytes at a time by positioned reads (nothing stays mapped).

gguf-py's GGUFReader builds numpy views of every array element: tens of seconds for a 262k-token
vocabulary. This parses the same layout (GGUF v2/v3, little-endian, `gguf/docs/gguf.md`) in one pass
and keeps values as Python objects, so a vocabulary can be copied verbatim into another file with
`GGUFWriter.add_key_value(key, value.value, value.type, value.sub_type)`.

The file is untrusted (shared/untrusted.py): every count and length is checked against the bytes
that remain before anything is allocated, and every tensor against ggml's own rules (gguf.cpp,
gguf_init_from_file_impl): at most GGML_MAX_DIMS = 4 dimensions, each ≥ 1, an element count that fits
int64, a known ggml type whose block size divides the row, an aligned offset, data inside the file
and no two tensors overlapping; the alignment a power of two. Limits: MAX_KV and MAX_TENSORS (a 262k
vocabulary is one array value; real files have < 100 keys and < 2,000 tensors), MAX_METADATA_BYTES
(the header and tensor infos; a 262k vocabulary with merges is ~20 MB), MAX_ARRAY_DEPTH nesting.
"""
from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from shared import untrusted
from shared.errors import InvalidArgument, ResourceExhausted

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
MAX_KV = 1_000_000
MAX_TENSORS = 1_000_000
MAX_METADATA_BYTES = 1 << 30
MAX_ARRAY_DEPTH = 4
MAX_ALIGNMENT = 1 << 16
# GGUFValueType -> struct format of a scalar (gguf-py's GGUFValueType numbering)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
UINT32 = 4
_MIN_BYTES = {**{kind: struct.calcsize("<" + fmt) for kind, fmt in _SCALAR.items()}, STRING: 8, ARRAY: 12}


@dataclasses.dataclass(frozen=True)
class GgufValue:
    type: int                       # GGUFValueType
    value: Any                      # scalar, str, or list of them for arrays
    sub_type: int | None = None     # element type of an array


@dataclasses.dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    shape: tuple[int, ...]          # numpy order (rows first): GGUF's ne reversed
    type: int                       # GGMLQuantizationType
    offset: int                     # absolute file offset of the data
    nbytes: int


@dataclasses.dataclass(frozen=True)
class GgufFile:
    path: Path
    fields: dict[str, GgufValue]
    tensors: dict[str, GgufTensorInfo]

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.value

    def read(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name`, (rows, row bytes) uint8 (one positioned read)."""
        info = self.tensors[name]
        with open(self.path, "rb", buffering=0) as f:
            f.seek(info.offset)
            data = f.read(info.nbytes)
        return tensor_rows(info, data, self.path.name)


def tensor_rows(info: GgufTensorInfo, data: bytes, what: str) -> np.ndarray:
    """A tensor's stored bytes as (rows, row bytes) uint8."""
    if len(data) != info.nbytes:
        raise _malformed(f"{what} ends inside tensor {info.name} ({len(data)} of {info.nbytes} bytes)")
    rows = math.prod(info.shape[:-1])
    return np.frombuffer(data, dtype=np.uint8).reshape(rows, -1)


def _malformed(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="MALFORMED_MODEL", field="model")


class _NeedMore(Exception):
    """The metadata runs past the bytes read so far (but not past the file): read more and retry."""


class _Cursor:
    """Reads little-endian values from the head of a `size`-byte file: a read past `size` is a
    truncated file, a read past the bytes in hand asks for more."""

    def __init__(self, buf: bytes, size: int, what: str):
        self.buf, self.size, self.what, self.pos = buf, size, what, 0

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise _malformed(f"{self.what}: {what} needs {n} bytes at offset {self.pos}, past the end of the "
                             f"{self.size}-byte file")
        if self.pos + n > len(self.buf):
            raise _NeedMore()

    def take(self, fmt: str, what: str = "a value"):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return values[0] if len(values) == 1 else values

    def string(self, what: str = "a string") -> str | bytes:
        """UTF-8 text; the raw bytes when they are not UTF-8 (so they copy back verbatim)."""
        n = self.take("Q", f"the length of {what}")
        self.need(n, f"{what} of {n} bytes")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw

    def value(self, kind: int, key: str):
        if kind in _SCALAR:
            return self.take(_SCALAR[kind], f"the value of {key}")
        if kind == STRING:
            return self.string(f"the value of {key}")
        raise _malformed(f"{self.what}: key {key[:100]!r} has unknown value type {kind}")

    def array(self, key: str, depth: int = 1) -> tuple[int, list]:
        item, count = self.take("I", f"the element type of {key}"), self.take("Q", f"the length of {key}")
        if item not in _MIN_BYTES:
            raise _malformed(f"{self.what}: array {key[:100]!r} has unknown element type {item}")
        if item == ARRAY and depth >= MAX_ARRAY_DEPTH:
            raise _malformed(f"{self.what}: array {key[:100]!r} nests more than {MAX_ARRAY_DEPTH} deep")
        if count * _MIN_BYTES[item] > self.size - self.pos:     # checked before a list of `count` exists
            raise _malformed(f"{self.what}: array {key[:100]!r} claims {count} elements, more than the "
                             f"{self.size - self.pos} bytes left in the file hold")
        if item in _SCALAR:                             # one unpack for the whole array
            fmt = f"{count}{_SCALAR[item]}"
            self.need(struct.calcsize("<" + fmt), f"array {key[:100]!r}")
            values = list(struct.unpack_from("<" + fmt, self.buf, self.pos))
            self.pos += struct.calcsize("<" + fmt)
            return item, values
        if item == STRING:
            return item, [self.string(f"an element of {key[:100]!r}") for _ in range(count)]
        return item, [self.array(key, depth + 1)[1] for _ in range(count)]


def read_gguf(path: Path) -> GgufFile:
    """Parses the header, metadata and tensor infos of `path` (reads the file's head only)."""
    size = path.stat().st_size
    length = min(size, 1 << 20)
    while True:                      # the metadata may exceed the first read: grow until it parses
        with open(path, "rb") as f:
            head = f.read(length)
        try:
            return _parse(path, head, size)
        except _NeedMore:
            if length >= MAX_METADATA_BYTES:
                raise ResourceExhausted(f"{path.name}: the GGUF metadata exceeds {MAX_METADATA_BYTES} bytes",
                                        field="model")
            length = min(size, 8 * length, MAX_METADATA_BYTES)


def parse_gguf(data: bytes, name: str = "model.gguf") -> GgufFile:
    """Parses a whole GGUF file held in memory (the fuzz harness's entry point)."""
    try:
        return _parse(Path(name), data, len(data))
    except _NeedMore:                # cannot happen: the buffer is the whole file
        raise _malformed(f"{name}: truncated")


def _parse(path: Path, head: bytes, size: int) -> GgufFile:
    what = path.name
    cursor = _Cursor(head, size, what)
    magic = cursor.take("4s", "the magic")
    if magic != MAGIC:
        raise _malformed(f"{what}: magic {magic!r}, expected {MAGIC!r}; not a GGUF file")
    version = cursor.take("I", "the version")
    if version not in (2, 3):
        raise _malformed(f"{what}: GGUF version {version}; only versions 2 and 3 are read")
    n_tensors, n_kv = cursor.take("QQ", "the tensor and key counts")
    # each key takes at least 13 bytes (length, type, a 1-byte value), each tensor info 32 (name
    # length, n_dims, one dim, type, offset): counts the file cannot hold are refused before any loop
    for count, least, limit, kind in ((n_kv, 13, MAX_KV, "keys"), (n_tensors, 32, MAX_TENSORS, "tensors")):
        if count * least > size - cursor.pos:
            raise _malformed(f"{what}: the header claims {count} {kind}, more than the {size}-byte file holds")
        if count > limit:
            raise ResourceExhausted(f"{what}: {count} {kind}, over the limit of {limit}", field="model")
    fields: dict[str, GgufValue] = {}
    for _ in range(n_kv):
        key = cursor.string("a key")
        key = untrusted.check_name(key if isinstance(key, str) else None, what, "metadata key")
        if key in fields:
            raise _malformed(f"{what}: metadata key {key[:100]!r} appears twice")
        kind = cursor.take("I", f"the type of {key[:100]}")
        if kind == ARRAY:
            sub_type, values = cursor.array(key)
            fields[key] = GgufValue(ARRAY, values, sub_type)
        else:
            fields[key] = GgufValue(kind, cursor.value(kind, key))
    alignment = _alignment(fields, what)
    infos = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cursor.string("a tensor name")
        name = untrusted.check_name(name if isinstance(name, str) else None, what)
        if name in names:
            raise _malformed(f"{what}: tensor {name[:100]!r} appears twice")
        names.add(name)
        n_dims = cursor.take("I", f"the rank of {name[:100]}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise _malformed(f"{what}: tensor {name[:100]!r} has {n_dims} dimensions; ggml allows 1 to {GGML_MAX_DIMS}")
        dims = cursor.take(f"{n_dims}Q", f"the dimensions of {name[:100]}")
        dims = (dims,) if isinstance(dims, int) else dims
        kind, offset = cursor.take("IQ", f"the type and offset of {name[:100]}")
        infos.append((name, tuple(reversed(dims)), kind, offset))
    start = (cursor.pos + alignment - 1) // alignment * alignment
    tensors = {name: _tensor_info(name, shape, kind, offset, start, alignment, size, what)
               for name, shape, kind, offset in infos}
    _check_overlaps(tensors, what)
    return GgufFile(path, fields, tensors)


def _alignment(fields: dict[str, GgufValue], what: str) -> int:
    field = fields.get("general.alignment")
    if field is None:
        return DEFAULT_ALIGNMENT
    value = field.value
    if field.type != UINT32 or not 1 <= value <= MAX_ALIGNMENT or value & (value - 1):
        raise _malformed(f"{what}: general.alignment is {str(value)[:40]} (type {field.type}); expected a uint32 "
                         f"power of two up to {MAX_ALIGNMENT}")
    return value


def _tensor_info(name: str, shape: tuple[int, ...], kind: int, offset: int, start: int, alignment: int, size: int,
                 what: str) -> GgufTensorInfo:
    import gguf
    label = f"{what}: tensor {name[:100]!r}"
    count = untrusted.element_count(shape, label, min_dim=1, max_dims=GGML_MAX_DIMS)
    try:
        block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise _malformed(f"{label} has unknown ggml type {kind}")
    if shape[-1] % block:
        raise _malformed(f"{label} has rows of {shape[-1]} elements; its type {gguf.GGMLQuantizationType(kind).name} "
                         f"stores blocks of {block}")
    nbytes = count // block * type_bytes
    if offset % alignment:
        raise _malformed(f"{label} offset {offset} is not a multiple of the alignment {alignment}")
    if start + offset + nbytes > size:
        raise _malformed(f"{label} ({nbytes} bytes at data offset {offset}) lies past the end of the {size}-byte file")
    return GgufTensorInfo(name, shape, kind, start + offset, nbytes)


def _check_overlaps(tensors: dict[str, GgufTensorInfo], what: str) -> None:
    end, previous = 0, None
    for info in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        if info.offset < end:
            raise _malformed(f"{what}: tensor {info.name[:100]!r} overlaps tensor {previous[:100]!r}")
        end, previous = info.offset + info.nbytes, info.name
