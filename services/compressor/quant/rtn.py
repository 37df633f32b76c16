"""Round-to-nearest onto any grid, vectorised over blocks (`reference.py` is the slow twin).

W: (rows, columns) float32, rows = output channels, columns = input features; blocks run along the
columns. With `importance` (per-column activation energy, llama.cpp's imatrix) each block's scale
is searched to minimise the importance-weighted squared error instead of taken from min/max.
Rows are processed in chunks so temporaries stay bounded for very large tensors.
"""
from __future__ import annotations

import numpy as np

from shared.quant.codecs import codec_for
from shared.quant.grids import Granularity, Grid
from shared.quant.qtensor import GgufTensor, QuantizedTensor, assemble

ROW_CHUNK = 2048


def quantize(W: np.ndarray, grid: Grid, importance: np.ndarray | None = None) -> QuantizedTensor | GgufTensor:
    if W.ndim != 2:
        raise ValueError(f"quantize expects a 2-D weight, got shape {W.shape}")
    rows, columns = W.shape
    grid.check_shape(rows, columns)
    if importance is not None and importance.shape != (columns,):
        raise ValueError(f"importance has shape {importance.shape}, expected ({columns},)")
    codec = codec_for(grid, columns)
    if grid.granularity is Granularity.PER_TENSOR and not grid.gguf_type:
        W = np.ascontiguousarray(W, dtype=np.float32)
        fit = codec.fit(W, importance)
        return assemble(grid, codec, [fit], codec.nearest(W, fit))
    parts = [quantize_rows(W[r:r + ROW_CHUNK], grid, importance) for r in range(0, rows, ROW_CHUNK)]
    return concatenate_rows(parts)


def quantize_rows(W: np.ndarray, grid: Grid, importance: np.ndarray | None = None) -> QuantizedTensor | GgufTensor:
    """One chunk of rows, every block at once: (rows·blocks, block) through the codec."""
    W = np.ascontiguousarray(W, dtype=np.float32)
    rows, columns = W.shape
    codec = codec_for(grid, columns)
    block = codec.block
    nblocks = columns // block
    flat = W.reshape(rows * nblocks, block)
    weights = None
    if importance is not None:
        weights = np.broadcast_to(importance.reshape(1, nblocks, block).astype(np.float32),
                                  (rows, nblocks, block)).reshape(rows * nblocks, block)
    fit, codes = codec.rtn(flat, weights)
    if grid.gguf_type:
        data = codec.encode(fit, codes).reshape(rows, -1)
        return GgufTensor(grid, (rows, columns), np.ascontiguousarray(data))
    scales = fit.stored["scale"].reshape(rows, nblocks)
    zeros = None if grid.symmetric else fit.stored["zero"].reshape(rows, nblocks)
    return QuantizedTensor(grid, codes.reshape(rows, columns), scales, zeros)


def concatenate_rows(parts: list) -> QuantizedTensor | GgufTensor:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, GgufTensor):
        return GgufTensor(first.grid, (sum(p.shape[0] for p in parts), first.shape[1]),
                          np.concatenate([p.data for p in parts]))
    zeros = None if first.zeros is None else np.concatenate([p.zeros for p in parts])
    return QuantizedTensor(first.grid, np.concatenate([p.codes for p in parts]),
                           np.concatenate([p.scales for p in parts]), zeros)
