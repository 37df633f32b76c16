"""Our quantized weights in the layout of onnxruntime's MatMulNBits (com.microsoft domain).

MatMulNBits (onnxruntime docs/ContribOperators.md, "com.microsoft.MatMulNBits") computes Y = A·Wᵀ
for W (N, K) stored blockwise along K in blocks of `block_size` values with `bits`-bit codes:

    B            uint8 (N, n_blocks, block_size·bits/8)   codes, element i of a byte group at bits·i
    scales       T (N·n_blocks)                           one per block, T = the type of A
    zero_points  uint8 (N, ceil(n_blocks·bits/8))         packed like B, each row padded to a byte;
                                                          absent: 2^(bits−1)
    W[n, k] = (code − zero_point) · scale                 of k's block

This is our grid's formula (shared/quant/qtensor.py: ŵ = (code − zero) · scale), so our codes, scales
and zero points are written as they are and onnxruntime's dequantized weight equals ours bit for
bit (tests/services/exporter/test_onnx_nbits.py reads it back through onnxruntime). Where our grid
and MatMulNBits differ only in layout the values are re-laid, never re-quantized:

- container: onnxruntime 1.32's CPU kernel takes bits ∈ {2, 4, 8}; 3-bit codes ride in 4-bit
  containers and 5–7-bit codes in 8-bit ones, with explicit zero points (our offset 2^(bits−1)
  differs from the container's default).
- blocks: a block size must be a power of two ≥ 16 (≤ 256 here: the sizes MLAS's blocked kernels
  are written for, and 2-bit's limit). A group (a per-channel row, a per-tensor row) that is a
  multiple of such a block is split into blocks that repeat its scale and zero point.
Anything else (GGUF block types with their two-level scales, groups not a multiple of 16) cannot be
expressed and is refused with the reason. The node's accuracy_level is left unset (float activations,
see onnx.py for what that costs with 8-bit codes).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from shared.quant.grids import Grid
from shared.quant.qtensor import QuantizedTensor

CONTAINER_BITS = (2, 4, 8)
MIN_BLOCK, MAX_BLOCK = 16, 256


@dataclasses.dataclass(frozen=True)
class NBitsWeight:
    """The initializers and attributes of one MatMulNBits node."""
    bits: int                        # container bits (2, 4 or 8)
    block_size: int
    N: int                           # output features (rows of W)
    K: int                           # input features (columns of W)
    B: np.ndarray                    # (N, n_blocks, block_size·bits/8) uint8
    scales: np.ndarray               # (N, n_blocks) float32 or float16
    zero_points: np.ndarray | None   # (N, ceil(n_blocks·bits/8)) uint8, None for the default 2^(bits−1)

    @property
    def n_blocks(self) -> int:
        return self.K // self.block_size


def container_bits(bits: int) -> int | None:
    return next((c for c in CONTAINER_BITS if bits <= c), None)


def block_size_for(grid: Grid, columns: int) -> int | None:
    """The largest power-of-two block (16..256) that tiles the grid's groups, or None."""
    group = grid.group_columns(columns)
    block = group & -group                                    # the largest power of two dividing it
    block = min(block, MAX_BLOCK)
    return block if block >= MIN_BLOCK else None


def why_not_expressible(grid: Grid | None, columns: int) -> str | None:
    """None when a weight on `grid` with `columns` input features maps onto MatMulNBits exactly,
    else what stands in the way (for an UNSUPPORTED_OP message)."""
    if grid is None:
        return "a float weight"
    if grid.gguf_type:
        return f"GGUF block type {grid.gguf_type} (its scales are themselves quantized)"
    if container_bits(grid.bits) is None:
        return f"{grid.bits}-bit codes (MatMulNBits takes at most 8 bits)"
    if block_size_for(grid, columns) is None:
        return (f"grid {grid.name} on {columns} input features (its groups are not a multiple of a "
                f"power-of-two block of at least {MIN_BLOCK})")
    return None


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) uint8 values < 2^bits -> (..., ceil(n·bits/8)) bytes, element i of each byte's
    group at bit bits·i (the last byte zero-padded)."""
    per_byte = 8 // bits
    n = values.shape[-1]
    padded = -(-n // per_byte) * per_byte
    if padded != n:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (padded - n,), np.uint8)], axis=-1)
    grouped = values.reshape(values.shape[:-1] + (padded // per_byte, per_byte)).astype(np.uint8)
    out = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for i in range(per_byte):
        out |= grouped[..., i] << np.uint8(bits * i)
    return out


def to_matmul_nbits(q: QuantizedTensor, scale_dtype=np.float32) -> NBitsWeight:
    """Our weight (N, K) as MatMulNBits initializers; raises ValueError where it cannot be expressed
    (callers check `why_not_expressible` first and raise UNSUPPORTED_OP)."""
    N, K = q.shape
    reason = why_not_expressible(q.grid, K)
    if reason is not None:
        raise ValueError(f"MatMulNBits cannot express {reason}")
    bits, block = container_bits(q.grid.bits), block_size_for(q.grid, K)
    n_blocks = K // block
    per_group = q.grid.group_columns(K) // block                         # blocks sharing a scale

    def per_block(values: np.ndarray) -> np.ndarray:                     # (N or 1, groups) -> (N, n_blocks)
        return np.broadcast_to(np.repeat(values, per_group, axis=1), (N, n_blocks))

    B = pack_bits(q.codes.reshape(N, n_blocks, block), bits)             # (N, n_blocks, block·bits/8)
    scales = np.ascontiguousarray(per_block(q.scales).astype(scale_dtype))
    zero_points = None
    if not (q.grid.symmetric and q.grid.bits == bits):                   # default zero point 2^(bits−1) ≠ ours
        zero_points = pack_bits(np.ascontiguousarray(per_block(q.zero_points())), bits)
    return NBitsWeight(bits, block, N, K, B, scales, zero_points)


def dequantize_reference(w: NBitsWeight) -> np.ndarray:
    """The slow twin: MatMulNBits' W (N, K) float32 from its initializers, element by element as
    the operator's spec reads."""
    per_byte, mask = 8 // w.bits, (1 << w.bits) - 1
    out = np.empty((w.N, w.K), dtype=np.float32)
    for n in range(w.N):
        for k in range(w.K):
            block, i = divmod(k, w.block_size)
            code = (int(w.B[n, block, i // per_byte]) >> (w.bits * (i % per_byte))) & mask
            if w.zero_points is None:
                zero = 1 << (w.bits - 1)
            else:
                zero = (int(w.zero_points[n, block // per_byte]) >> (w.bits * (block % per_byte))) & mask
            out[n, k] = np.float32(code - zero) * np.float32(w.scales[n, block])
    return out

