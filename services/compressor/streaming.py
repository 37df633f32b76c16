"""The streaming path of the compressor: tensor by tensor, for methods that need no forward pass
(RTN, importance-weighted RTN, GPTQ on the calibrator's Hessians).

Each tensor is read from the safetensors, quantized, handed to the writer and dropped; the
per-tensor report (MSE, SNR, output error, the weights' histogram) is computed while the weight is
in hand. A tensor
bigger than one chunk (`chunk_bytes` of float32) goes through in row chunks instead, as a
`ChunkedTensor` the writer drains: read rows → quantize them → measure them → write them. Every grid
here but the per-tensor ones quantizes rows independently (blocks run along a row; imatrix
importance is per column; GPTQ spreads error along a row only), so the chunked result equals the
whole-tensor one, and peak memory is one chunk however large the model is.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Union

import numpy as np
import torch

from services.compressor.histogram import HistogramSketch, WeightHistogram, weight_histogram
from services.compressor.quant.gptq import gptq
from services.compressor.quant.rtn import ROW_CHUNK, quantize
from shared.models.bundle import ModelDir
from shared.quant.compressed import ChunkedTensor, TensorPlan
from shared.quant.grids import Granularity, Grid, Method, QuantizationConfig
from shared.quant.qtensor import GgufTensor, QuantizedTensor

StreamedValue = Union[np.ndarray, QuantizedTensor, GgufTensor, ChunkedTensor]
CHUNK_BYTES = 32 << 20          # float32 bytes of one row chunk: RTN temporaries are a few times this
GPTQ_CHUNK_BYTES = 256 << 20    # GPTQ factors H once per chunk, so it takes fewer, larger chunks
WORKERS = min(2, os.cpu_count() or 1)     # RTN chunks quantized at once; each adds one chunk's temporaries


@dataclasses.dataclass(frozen=True)
class TensorReport:
    name: str
    grid: str
    mse: float
    snr_db: float            # 10·log10(Σw² / Σ(w−ŵ)²)
    bits_per_weight: float = 0.0
    output_error: float = 0.0
    histogram: WeightHistogram | None = None     # the float weights before quantization


def stream_tensors(model: ModelDir, plans: list[TensorPlan], recipe: QuantizationConfig, stats, device: str,
                   progress: Callable[[str], None] | None, report: Callable[[TensorReport], None], *,
                   chunk_bytes: int = CHUNK_BYTES, gptq_chunk_bytes: int = GPTQ_CHUNK_BYTES,
                   workers: int = WORKERS) -> Iterator[tuple[str, StreamedValue]]:
    """Yields (name, float32 array, quantized tensor or ChunkedTensor) in plan order; calls `report`
    per quantized tensor (for a chunked one, once its last chunk has been drained)."""
    covered = set(stats.weights()) if stats is not None else set()
    for index, p in enumerate(plans):
        if p.grid is None:
            if 4 * math.prod(p.shape) <= chunk_bytes:
                yield p.name, model.array(p.name)
            else:
                rows = (chunk for _, chunk in model.row_chunks(p.name, chunk_bytes))
                yield p.name, ChunkedTensor(None, p.shape, rows)
            continue
        if progress:
            progress(f"tensor {index + 1}/{len(plans)} {p.name}")
        hessian = stats.hessian(p.name) if p.name in covered and stats.has_hessian(p.name) else None
        if recipe.method is Method.GPTQ and hessian is not None:
            rounded, limit, threads = _gptq(p, recipe, hessian, device), gptq_chunk_bytes, 1   # torch threads itself
        else:
            use = p.name in covered and recipe.method in (Method.IMATRIX, Method.GPTQ)
            rounded, limit, threads = _rtn(p.grid, stats.importance(p.name) if use else None), chunk_bytes, workers
        if 4 * math.prod(p.shape) <= limit or p.grid.granularity is Granularity.PER_TENSOR:
            weight = model.array(p.name)                 # small, or one scale fitted over the whole tensor
            value = rounded(weight)
            report(measure(p.name, weight, value, hessian))
            yield p.name, value
        else:
            chunks = _chunks(model, p, rounded, limit, hessian, report, threads)
            yield p.name, ChunkedTensor(p.grid, p.shape, chunks)


def _rtn(grid: Grid, importance: np.ndarray | None) -> Callable[[np.ndarray], QuantizedTensor | GgufTensor]:
    return lambda weight: quantize(weight, grid, importance)


def _gptq(p: TensorPlan, recipe: QuantizationConfig, hessian: np.ndarray,
          device: str) -> Callable[[np.ndarray], QuantizedTensor | GgufTensor]:
    H = torch.from_numpy(hessian).to(device)
    return lambda weight: gptq(torch.from_numpy(weight).to(device), H, p.grid, recipe.gptq, p.name).tensor


def _chunks(model: ModelDir, p: TensorPlan, rounded, chunk_bytes: int, hessian: np.ndarray | None,
            report: Callable[[TensorReport], None], workers: int) -> Iterator[QuantizedTensor | GgufTensor]:
    """Reads, quantizes and measures chunks of rows on `workers` threads (numpy releases the GIL in
    its kernels), yields them in row order, and reports after the last. At most `workers` + 1
    chunks are in flight."""
    def work(start: int, stop: int) -> tuple[QuantizedTensor | GgufTensor, ErrorSums, HistogramSketch]:
        weight = model.rows(p.name, start, stop)
        value = rounded(weight)
        sums = ErrorSums()
        sums.add(weight, value, hessian)
        return value, sums, HistogramSketch().add(weight)

    total, sketch = ErrorSums(), HistogramSketch()
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for start, stop in model.row_ranges(p.name, chunk_bytes):
            pending.append(pool.submit(work, start, stop))
            if len(pending) > workers:
                value, sums, part = pending.popleft().result()
                total.merge(sums)
                sketch.merge(part)
                yield value
        while pending:
            value, sums, part = pending.popleft().result()
            total.merge(sums)
            sketch.merge(part)
            yield value
    report(dataclasses.replace(total.report(p.name, p.grid, p.shape), histogram=sketch.histogram(p.name)))


@dataclasses.dataclass
class ErrorSums:
    """Σ(w−ŵ)², Σw² and, with a Hessian, tr(ΔW H ΔWᵀ) and tr(W H Wᵀ): every one a sum over rows, so
    chunks of rows add up to the whole tensor's."""
    noise: float = 0.0
    signal: float = 0.0
    output_noise: float = 0.0
    output_signal: float = 0.0

    def add(self, weight: np.ndarray, value: QuantizedTensor | GgufTensor, hessian: np.ndarray | None) -> None:
        H = torch.from_numpy(hessian).float() if hessian is not None else None
        for start in range(0, weight.shape[0], ROW_CHUNK):      # bounded temporaries for huge tensors
            rows = weight[start:start + ROW_CHUNK]
            dequantized = value.dequantize(start, start + len(rows))
            error = (rows - dequantized).ravel()
            self.noise += float(np.vdot(error, error))
            self.signal += float(np.vdot(rows.ravel(), rows.ravel()))
            if H is not None:
                delta, W = torch.from_numpy(rows - dequantized), torch.from_numpy(rows)
                self.output_noise += float(((delta @ H) * delta).sum())
                self.output_signal += float(((W @ H) * W).sum())

    def merge(self, other: "ErrorSums") -> None:
        self.noise += other.noise
        self.signal += other.signal
        self.output_noise += other.output_noise
        self.output_signal += other.output_signal

    def report(self, name: str, grid: Grid, shape: tuple[int, ...]) -> TensorReport:
        rows, columns = shape
        output_error = self.output_noise / self.output_signal if self.output_signal > 0 else 0.0
        return TensorReport(name, grid.name, self.noise / (rows * columns),
                            10 * math.log10(self.signal / self.noise) if self.noise > 0 else math.inf,
                            grid.bits_per_weight(columns), output_error)


def measure(name: str, weight: np.ndarray, value: QuantizedTensor | GgufTensor,
            hessian: np.ndarray | None) -> TensorReport:
    """The report of one whole tensor, with its weights' histogram."""
    error = ErrorSums()
    error.add(weight, value, hessian)
    return dataclasses.replace(error.report(name, value.grid, weight.shape), histogram=weight_histogram(name, weight))
