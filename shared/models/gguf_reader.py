"""A small, fast GGUF reader: every metadata value with its exact GGUF type, the tensor infos, and
one tensor's bytes at a time by positioned reads (nothing stays mapped).

gguf-py's GGUFReader builds numpy views of every array element: tens of seconds for a 262k-token
vocabulary. This parses the same layout (GGUF v2/v3, little-endian, `gguf/docs/gguf.md`) in one pass
and keeps values as Python objects, so a vocabulary can be copied verbatim into another file with
`GGUFWriter.add_key_value(key, value.value, value.type, value.sub_type)`.
"""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import InvalidArgument

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUFValueType -> struct format of a scalar (gguf-py's GGUFValueType numbering)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


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
        if len(data) != info.nbytes:
            raise InvalidArgument(f"{self.path.name} ends inside tensor {name}", reason="MALFORMED_MODEL",
                                  field="model")
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return np.frombuffer(data, dtype=np.uint8).reshape(rows, -1)


class _Cursor:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str | bytes:
        """UTF-8 text; the raw bytes when they are not UTF-8 (so they copy back verbatim)."""
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string past the end")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw

    def value(self, kind: int):
        if kind in _SCALAR:
            return self.take(_SCALAR[kind])
        if kind == STRING:
            return self.string()
        raise struct.error(f"unknown value type {kind}")

    def array(self) -> tuple[int, list]:
        item, count = self.take("I"), self.take("Q")
        if item in _SCALAR:                             # one unpack for the whole array
            fmt = f"<{count}{_SCALAR[item]}"
            values = list(struct.unpack_from(fmt, self.buf, self.pos))
            self.pos += struct.calcsize(fmt)
            return item, values
        if item == STRING:
            return item, [self.string() for _ in range(count)]
        if item == ARRAY:
            return item, [self.array()[1] for _ in range(count)]
        raise struct.error(f"unknown array element type {item}")


def read_gguf(path: Path) -> GgufFile:
    """Parses the header, metadata and tensor infos of `path` (reads the file's head only)."""
    import gguf
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(min(size, 64 << 20))
        while True:                      # the metadata may exceed the first read: grow until it parses
            try:
                return _parse(path, head, size, gguf)
            except struct.error:
                if len(head) >= size:
                    raise
                with open(path, "rb") as f:
                    head = f.read(min(size, 4 * len(head)))
    except (struct.error, ValueError, KeyError) as error:
        raise InvalidArgument(f"{path.name} is not a readable GGUF file: {error}", reason="MALFORMED_MODEL",
                              field="model")


def _parse(path: Path, head: bytes, size: int, gguf) -> GgufFile:
    cursor = _Cursor(head)
    magic, version, n_tensors, n_kv = cursor.take("4sIQQ")
    if magic != MAGIC or version not in (2, 3):
        raise ValueError(f"magic {magic!r} version {version}, expected GGUF v2/v3")
    fields: dict[str, GgufValue] = {}
    for _ in range(n_kv):
        key, kind = cursor.string(), cursor.take("I")
        if kind == ARRAY:
            sub_type, values = cursor.array()
            fields[key] = GgufValue(ARRAY, values, sub_type)
        else:
            fields[key] = GgufValue(kind, cursor.value(kind))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = cursor.string(), cursor.take("I")
        dims = cursor.take(f"{n_dims}Q") if n_dims else ()
        dims = (dims,) if isinstance(dims, int) else dims
        kind, offset = cursor.take("IQ")
        infos.append((name, tuple(reversed(dims)), kind, offset))
    alignment = int(fields["general.alignment"].value) if "general.alignment" in fields else DEFAULT_ALIGNMENT
    start = (cursor.pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, shape, kind, offset in infos:
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        count = int(np.prod(shape, dtype=np.int64))
        info = GgufTensorInfo(name, shape, kind, start + offset, count // block * nbytes)
        if info.offset + info.nbytes > size:
            raise ValueError(f"tensor {name} lies past the end of the file")
        tensors[name] = info
    return GgufFile(path, fields, tensors)
