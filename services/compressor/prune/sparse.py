"""Sparse storage of pruned tensors, and what each layout really costs.

Zeroing weights saves nothing by itself: a dense tensor of zeros takes as many bytes as before.
Two layouts store only the nonzeros, each with its own overhead:
- CSR: int32 row pointers (rows + 1), one column index per nonzero in the smallest unsigned type
  that holds the widest column index (uint8 up to 256 columns, uint16 up to 65,536), the values.
  Tensors of more than two dimensions are viewed as (shape[0], rest).
- bitmask: one bit per element (1 = stored), then the nonzero values in row-major order.
With float32 values at density d, CSR with uint16 indices costs ~6d bytes an element and the
bitmask 1/8 + 4d, so at 50% sparsity the bitmask wins (2.125 against 3, dense 4) and CSR only
below d = 1/16 (1/8 with uint8 indices). `sparse_size` prices all three and picks the smallest,
so a report can say exactly what sparsity bought — and that zeros stored dense bought nothing.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from shared.errors import InvalidArgument

FORMATS = ("dense", "bitmask", "csr")            # ties go to the earlier, simpler layout
POINTER = np.int32


@dataclasses.dataclass(frozen=True)
class SparseSize:
    format: str                      # the smallest layout: dense | bitmask | csr
    stored_bytes: int                # bytes in that layout
    dense_bytes: int                 # elements · value_bytes
    nonzeros: int
    elements: int
    costs: dict[str, int]            # bytes of every layout, chosen or not

    @property
    def saved_bytes(self) -> int:
        return self.dense_bytes - self.stored_bytes


@dataclasses.dataclass(frozen=True)
class CsrTensor:
    shape: tuple[int, ...]
    row_pointers: np.ndarray         # (rows + 1,) int32
    columns: np.ndarray              # (nonzeros,) smallest unsigned int holding the column indices
    values: np.ndarray               # (nonzeros,) the array's dtype

    @property
    def nbytes(self) -> int:
        return self.row_pointers.nbytes + self.columns.nbytes + self.values.nbytes


@dataclasses.dataclass(frozen=True)
class BitmaskTensor:
    shape: tuple[int, ...]
    bits: np.ndarray                 # (ceil(elements / 8),) uint8, big-endian bit order (np.packbits)
    values: np.ndarray               # (nonzeros,) the array's dtype, row-major order

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes + self.values.nbytes


def column_index_dtype(columns: int) -> np.dtype:
    """The smallest unsigned integer type that holds indices 0 … columns − 1."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if columns <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise InvalidArgument(f"{columns} columns do not fit a 64-bit index", field="tensor")


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) CSR views a tensor as: 1-D is one row; N-D is (shape[0], rest)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], int(np.prod(shape[1:], dtype=np.int64))


def sparse_size(array: np.ndarray, value_bytes: int = 4) -> SparseSize:
    """Bytes of `array` stored dense, as a bitmask and as CSR, with values of `value_bytes` each."""
    elements = int(array.size)
    nonzeros = int(np.count_nonzero(array))
    rows, columns = _matrix_shape(array.shape)
    costs = {
        "dense": elements * value_bytes,
        "bitmask": (elements + 7) // 8 + nonzeros * value_bytes,
        "csr": (rows + 1) * np.dtype(POINTER).itemsize
        + nonzeros * (column_index_dtype(columns).itemsize + value_bytes),
    }
    best = min(FORMATS, key=lambda name: (costs[name], FORMATS.index(name)))
    return SparseSize(best, costs[best], costs["dense"], nonzeros, elements, costs)


def encode_csr(array: np.ndarray) -> CsrTensor:
    rows, columns = _matrix_shape(array.shape)
    matrix = array.reshape(rows, columns)
    nonzero = matrix != 0
    if np.count_nonzero(nonzero) > np.iinfo(POINTER).max:
        raise InvalidArgument(f"{np.count_nonzero(nonzero)} nonzeros overflow CSR's int32 row pointers",
                              field="tensor")
    pointers = np.zeros(rows + 1, dtype=POINTER)
    np.cumsum(nonzero.sum(axis=1), out=pointers[1:])
    _, column = np.nonzero(nonzero)                   # row-major: sorted by row, then column
    return CsrTensor(tuple(array.shape), pointers, column.astype(column_index_dtype(columns)), matrix[nonzero])


def decode_csr(tensor: CsrTensor) -> np.ndarray:
    rows, columns = _matrix_shape(tensor.shape)
    counts = np.diff(tensor.row_pointers.astype(np.int64))
    if len(counts) != rows or counts.min(initial=0) < 0 or int(tensor.row_pointers[-1]) != len(tensor.values) \
            or len(tensor.columns) != len(tensor.values) or tensor.columns.max(initial=0) >= max(columns, 1):
        raise InvalidArgument(f"CSR tensor of shape {tensor.shape} is inconsistent", field="tensor")
    out = np.zeros((rows, columns), dtype=tensor.values.dtype)
    out[np.repeat(np.arange(rows), counts), tensor.columns.astype(np.int64)] = tensor.values
    return out.reshape(tensor.shape)


def encode_bitmask(array: np.ndarray) -> BitmaskTensor:
    flat = array.reshape(-1)
    nonzero = flat != 0
    return BitmaskTensor(tuple(array.shape), np.packbits(nonzero), flat[nonzero])


def decode_bitmask(tensor: BitmaskTensor) -> np.ndarray:
    elements = int(np.prod(tensor.shape, dtype=np.int64))
    if len(tensor.bits) != (elements + 7) // 8:
        raise InvalidArgument(f"bitmask of {len(tensor.bits)} bytes cannot describe {elements} elements",
                              field="tensor")
    nonzero = np.unpackbits(tensor.bits, count=elements).astype(bool)
    if int(nonzero.sum()) != len(tensor.values):
        raise InvalidArgument(f"bitmask marks {int(nonzero.sum())} elements but holds {len(tensor.values)} values",
                              field="tensor")
    out = np.zeros(elements, dtype=tensor.values.dtype)
    out[nonzero] = tensor.values
    return out.reshape(tensor.shape)
