"""Round-to-nearest weight quantization onto a Grid (vectorised; `reference.py` is the slow twin).

W: (rows, columns) float32, rows = output channels, columns = input features. Groups run along the
columns. Rows are processed in chunks so temporaries stay bounded for very large tensors.
"""
from __future__ import annotations

import numpy as np

from shared.quant.grids import Granularity, Grid, ScaleRule
from shared.quant.qtensor import QuantizedTensor

ROW_CHUNK = 2048


def roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero. Where |x| + 0.5 would round up in float32 (|x| just below
    k + 0.5), np.trunc of the float32 sum could be off by one, so the sum is formed in float64."""
    x64 = x.astype(np.float64)
    return np.copysign(np.floor(np.abs(x64) + 0.5), x64)


def quantize(W: np.ndarray, grid: Grid) -> QuantizedTensor:
    if W.ndim != 2:
        raise ValueError(f"quantize expects a 2-D weight, got shape {W.shape}")
    W = np.ascontiguousarray(W, dtype=np.float32)
    rows, columns = W.shape
    grid.check_shape(rows, columns)
    if grid.granularity is Granularity.PER_TENSOR:
        codes, scales, zeros = _quantize_groups(W.reshape(1, 1, -1), grid)
        return QuantizedTensor(grid, codes.reshape(rows, columns), scales, zeros)
    group = grid.group_columns(columns)
    parts = [_quantize_groups(W[r:r + ROW_CHUNK].reshape(-1, columns // group, group), grid)
             for r in range(0, rows, ROW_CHUNK)]
    codes = np.concatenate([p[0] for p in parts]).reshape(rows, columns)
    scales = np.concatenate([p[1] for p in parts])
    zeros = None if grid.symmetric else np.concatenate([p[2] for p in parts])
    return QuantizedTensor(grid, codes, scales, zeros)


def _quantize_groups(x: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """x: (rows, groups, group) float32 -> codes like x (uint8), scales/zeros (rows, groups)."""
    if grid.rule is ScaleRule.GGML:
        return _ggml(x, grid.gguf_type)
    if grid.symmetric:
        qmax = (1 << (grid.bits - 1)) - 1
        scale = (np.abs(x).max(axis=-1) / np.float32(qmax)).astype(np.float16)          # (rows, groups)
        s = scale.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s > 0, np.rint(x / s), 0.0)
        q = np.clip(q, -qmax - 1, qmax) + (qmax + 1)
        return q.astype(np.uint8), scale, None
    top = (1 << grid.bits) - 1
    low = np.minimum(x.min(axis=-1), 0.0)                                               # zero stays exact
    high = np.maximum(x.max(axis=-1), 0.0)
    scale = ((high - low) / np.float32(top)).astype(np.float16)
    s = scale.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.where(s > 0, np.clip(np.rint(-low / s), 0, top), 0.0)
        q = np.where(s[..., None] > 0, np.rint(x / s[..., None]) + zero[..., None], zero[..., None])
    q = np.clip(q, 0, top)
    return q.astype(np.uint8), scale, zero.astype(np.uint8)


def _ggml(x: np.ndarray, gguf_type: str) -> tuple[np.ndarray, np.ndarray, None]:
    """llama.cpp's quantize_row_{q8_0,q4_0}_ref, in float32 arithmetic, vectorised over blocks."""
    if gguf_type == "q8_0":
        d = (np.abs(x).max(axis=-1) / np.float32(127)).astype(np.float32)                # (rows, blocks)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        q = roundf((x * inv[..., None]).astype(np.float32))                               # f32 product
        return (q + 128).astype(np.uint8), d.astype(np.float16), None
    if gguf_type == "q4_0":
        index = np.abs(x).argmax(axis=-1)[..., None]                                      # first max |v|
        signed_max = np.take_along_axis(x, index, axis=-1)[..., 0]
        d = (signed_max / np.float32(-8)).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        shifted = (x * inv[..., None]).astype(np.float32) + np.float32(8.5)               # f32 add, as in C
        q = np.minimum(np.trunc(shifted), 15)
        return q.astype(np.uint8), d.astype(np.float16), None
    raise ValueError(f"no ggml rule for {gguf_type}")
