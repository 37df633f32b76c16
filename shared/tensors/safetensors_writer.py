"""A streaming safetensors writer: the header is computed from declared shapes, then tensors are
written one at a time, so peak memory is one tensor, not the model (the `safetensors` package's
`save_file` needs every tensor in memory at once). A tensor may also arrive as an iterable of row
chunks (consecutive slices along its first dimension), so peak memory is one chunk.

Format (https://github.com/huggingface/safetensors): u64 little-endian header length N, N bytes of
JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Union

import numpy as np

from shared.errors import Internal

DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I8": np.int8, "I32": np.int32,
          "I64": np.int64}
TensorData = Union[np.ndarray, Iterable[np.ndarray]]     # a whole tensor, or its row chunks in order


def write_safetensors(path: Path, layout: dict[str, tuple[tuple[int, ...], str]],
                      tensors: Iterable[tuple[str, TensorData]], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (in `layout` order) to `path`. layout: name -> (shape, safetensors dtype).
    Each tensor is an array of its declared shape or an iterable of row chunks that together are."""
    header: dict = {}
    offset = 0
    for name, (shape, dtype) in layout.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)          # data starts 8-byte aligned
    order = iter(layout)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, data in tensors:
            expected = next(order, None)
            if name != expected:
                raise Internal(f"safetensors writer expected tensor {expected}, got {name}")
            shape, dtype = layout[name]
            if isinstance(data, np.ndarray):
                array = np.ascontiguousarray(data, dtype=DTYPES[dtype])
                if tuple(array.shape) != tuple(shape):
                    raise Internal(f"tensor {name} has shape {array.shape}, declared {shape}")
                f.write(array.data)
            else:
                _write_chunks(f, name, tuple(shape), DTYPES[dtype], data)
        leftover = next(order, None)
        if leftover is not None:
            raise Internal(f"safetensors writer got no data for tensor {leftover}")
        f.flush()
        os.fsync(f.fileno())


def _write_chunks(f, name: str, shape: tuple[int, ...], dtype, chunks: Iterable[np.ndarray]) -> None:
    """Row chunks of one tensor: each has the declared trailing shape; together, all the rows."""
    if not shape:
        raise Internal(f"tensor {name} is a scalar; it cannot arrive in row chunks")
    rows = 0
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype=dtype)
        if chunk.ndim != len(shape) or tuple(chunk.shape[1:]) != shape[1:] or rows + chunk.shape[0] > shape[0]:
            raise Internal(f"tensor {name}: a chunk of shape {chunk.shape} at row {rows} does not fit declared {shape}")
        f.write(chunk.data)
        rows += chunk.shape[0]
    if rows != shape[0]:
        raise Internal(f"tensor {name}: chunks held {rows} rows, declared {shape}")
