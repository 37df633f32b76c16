"""Sparse storage: CSR and bitmask round trips, and honest byte counts for each layout."""
from __future__ import annotations

import numpy as np
import pytest

from services.compressor.prune.sparse import (column_index_dtype, decode_bitmask, decode_csr, encode_bitmask,
                                              encode_csr, sparse_size)
from shared.errors import InvalidArgument


def sparse_array(shape, density: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = rng.normal(size=shape).astype(np.float32)
    array[rng.random(shape) >= density] = 0
    return array


@pytest.mark.parametrize("shape", [(64, 300), (5, 7), (4, 3, 3, 3), (17,), (0, 4)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_both_layouts_round_trip_exactly(shape, density):
    array = sparse_array(shape, density)
    csr, bitmask = encode_csr(array), encode_bitmask(array)
    assert np.array_equal(decode_csr(csr), array) and decode_csr(csr).dtype == array.dtype
    assert np.array_equal(decode_bitmask(bitmask), array)
    size = sparse_size(array)
    assert size.costs["csr"] == csr.nbytes and size.costs["bitmask"] == bitmask.nbytes
    assert size.nonzeros == np.count_nonzero(array) and size.elements == array.size


def test_half_sparse_is_cheapest_as_a_bitmask_and_a_tenth_dense_as_csr():
    half = sparse_size(sparse_array((256, 1024), 0.5))
    assert half.format == "bitmask"
    assert half.stored_bytes == 256 * 1024 // 8 + half.nonzeros * 4                   # ≈ 2.125 bytes an element
    sparse = sparse_size(sparse_array((256, 1024), 0.03))
    assert sparse.format == "csr"
    assert sparse.stored_bytes == 257 * 4 + sparse.nonzeros * (2 + 4)                 # uint16 column indices


def test_dense_weights_and_dense_zeros_save_nothing():
    dense = sparse_size(np.ones((32, 32), dtype=np.float32))
    assert dense.format == "dense" and dense.saved_bytes == 0 and dense.stored_bytes == 32 * 32 * 4
    barely = sparse_size(sparse_array((32, 32), 0.99))               # 1% zeros: a bitmask would cost more
    assert barely.format == "dense" and barely.costs["bitmask"] > barely.dense_bytes


def test_column_indices_use_the_smallest_type():
    assert column_index_dtype(256) == np.uint8 and column_index_dtype(257) == np.uint16
    assert encode_csr(np.eye(300, dtype=np.float32)).columns.dtype == np.uint16
    assert sparse_size(np.eye(8, dtype=np.float16), value_bytes=2).costs["csr"] == 9 * 4 + 8 * (1 + 2)


def test_inconsistent_encodings_are_rejected():
    csr = encode_csr(sparse_array((4, 4), 0.5))
    broken = type(csr)(csr.shape, csr.row_pointers, csr.columns[:-1], csr.values)
    with pytest.raises(InvalidArgument):
        decode_csr(broken)
    bitmask = encode_bitmask(sparse_array((4, 4), 0.5))
    with pytest.raises(InvalidArgument):
        decode_bitmask(type(bitmask)(bitmask.shape, bitmask.bits, bitmask.values[:-1]))
