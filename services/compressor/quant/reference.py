"""Slow, obvious twins of the quantizers in rtn.py, one group at a time in plain Python floats
(float32 emulated with numpy scalars where llama.cpp's C does float32 arithmetic). Tests check
that the fast kernels agree with these exactly.
"""
from __future__ import annotations

import math

import numpy as np

from shared.quant.grids import Granularity, Grid, ScaleRule


def quantize_group(values: list[float], grid: Grid) -> tuple[list[int], float, int]:
    """One group -> (unsigned codes, float16 scale as float, zero point)."""
    f32 = np.float32
    if grid.rule is ScaleRule.GGML and grid.gguf_type == "q8_0":
        amax = max(abs(f32(v)) for v in values)
        d = f32(amax / f32(127))
        inv = f32(f32(1) / d) if d != 0 else f32(0)
        codes = []
        for v in values:
            p = float(f32(f32(v) * inv))
            codes.append(int(math.copysign(math.floor(abs(p) + 0.5), p)) + 128)
        return codes, float(np.float16(d)), 128
    if grid.rule is ScaleRule.GGML and grid.gguf_type == "q4_0":
        amax, signed_max = f32(0), f32(0)
        for v in values:
            if amax < abs(f32(v)):
                amax, signed_max = abs(f32(v)), f32(v)
        d = f32(signed_max / f32(-8))
        inv = f32(f32(1) / d) if d != 0 else f32(0)
        codes = [min(15, int(f32(f32(f32(v) * inv) + f32(8.5)))) for v in values]
        return codes, float(np.float16(d)), 8
    if grid.symmetric:
        qmax = 2 ** (grid.bits - 1) - 1
        scale = float(np.float16(f32(max(abs(v) for v in values)) / f32(qmax)))
        codes = [qmax + 1 + (min(max(round(float(f32(v) / f32(scale))), -qmax - 1), qmax) if scale > 0 else 0)
                 for v in values]
        return codes, scale, qmax + 1
    top = 2 ** grid.bits - 1
    low, high = min(min(values), 0.0), max(max(values), 0.0)
    scale = float(np.float16(f32(f32(high) - f32(low)) / f32(top)))
    if scale == 0:
        return [0] * len(values), 0.0, 0
    zero = min(max(round(float(f32(-low) / f32(scale))), 0), top)
    return [min(max(round(float(f32(v) / f32(scale))) + zero, 0), top) for v in values], scale, zero


def quantize(W: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole tensor -> (codes (rows, columns), scales (rows, groups), zeros (rows, groups))."""
    rows, columns = W.shape
    if grid.granularity is Granularity.PER_TENSOR:
        codes, scale, zero = quantize_group([float(v) for v in W.reshape(-1)], grid)
        return np.array(codes).reshape(rows, columns), np.array([[scale]]), np.array([[zero]])
    group = grid.group_columns(columns)
    codes = np.zeros((rows, columns), dtype=np.int64)
    scales = np.zeros((rows, columns // group))
    zeros = np.zeros((rows, columns // group), dtype=np.int64)
    for r in range(rows):
        for g in range(columns // group):
            span = slice(g * group, (g + 1) * group)
            c, s, z = quantize_group([float(v) for v in W[r, span]], grid)
            codes[r, span], scales[r, g], zeros[r, g] = c, s, z
    return codes, scales, zeros


def gptq_reference(W: np.ndarray, H: np.ndarray, grid: Grid, damp_percent: float = 0.01,
                   act_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ as the paper states it, one column at a time in float64 with an explicit inverse:
    round column j, push its error onto the remaining columns through H⁻¹, then remove j from H⁻¹
    by one step of Gaussian elimination. No Cholesky, no lazy batches. -> (codes, dequantized)."""
    from shared.quant.codecs import codec_for
    W = np.array(W, dtype=np.float64)
    H = np.array(H, dtype=np.float64)
    rows, columns = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    codec = codec_for(grid, columns)
    block = codec.block
    fits = [None] * (columns // block)
    if act_order or block == columns:
        for b in range(columns // block):
            fits[b] = codec.fit(W[:, b * block:(b + 1) * block].astype(np.float32))
    order = list(np.argsort(-np.diag(H), kind="stable")) if act_order else list(range(columns))
    H = H + damp_percent * np.mean(np.diag(H)) * np.eye(columns)
    Hinv = np.linalg.inv(H)
    codes = np.zeros((rows, columns), dtype=np.uint8)
    Q = np.zeros_like(W)
    done: list[int] = []
    for position, j in enumerate(order):
        b, within = divmod(int(j), block)
        if fits[b] is None:
            fits[b] = codec.fit(W[:, b * block:(b + 1) * block].astype(np.float32))
        k = within // codec.sub
        q = codec.nearest(W[:, j].astype(np.float32), fits[b], k)
        dq = q.astype(np.float32) * fits[b].scale[:, k] - fits[b].offset[:, k]
        codes[:, j], Q[:, j] = q, dq
        rest = [int(c) for c in order[position + 1:]]
        err = (W[:, j] - dq) / Hinv[j, j]
        W[:, rest] -= np.outer(err, Hinv[j, rest])
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
        done.append(int(j))
    return codes, Q.astype(np.float32)
