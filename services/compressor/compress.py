"""Compress a float32 model: quantize its weights tensor by tensor into a compressed-model file.

Streaming: each tensor is read from the memory-mapped safetensors, quantized, written, and dropped,
so peak memory is about one tensor plus its codes, whatever the model's size.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from services.compressor.quant.rtn import ROW_CHUNK, quantize
from shared.models.bundle import ModelDir
from shared.quant import compressed
from shared.quant.grids import QuantizationConfig
from shared.quant.qtensor import QuantizedTensor
from shared.quant.rules import tensor_grid


@dataclasses.dataclass(frozen=True)
class TensorReport:
    name: str
    grid: str
    mse: float
    snr_db: float            # 10·log10(Σw² / Σ(w−ŵ)²)


@dataclasses.dataclass(frozen=True)
class CompressResult:
    tensors: list[TensorReport]
    payload_bytes: int
    bits_per_weight: float   # over quantized tensors, scales and zeros included


def plan(model: ModelDir, recipe: QuantizationConfig) -> list[compressed.TensorPlan]:
    shapes = model.config.tensor_shapes()
    plans = [compressed.TensorPlan(name, shape, tensor_grid(name, shape, model.config, recipe))
             for name, shape in shapes.items()]
    for p in plans:
        if p.grid is not None:
            p.grid.check_shape(*p.shape, tensor=p.name)
    return plans


def compress(model: ModelDir, model_sha256: str, recipe: QuantizationConfig, out_path: Path) -> CompressResult:
    recipe = recipe.validated()
    plans = plan(model, recipe)
    reports: list[TensorReport] = []

    def tensors() -> Iterator[tuple[str, np.ndarray | QuantizedTensor]]:
        for p in plans:
            weight = model.array(p.name)
            if p.grid is None:
                yield p.name, weight
                continue
            q = quantize(weight, p.grid)
            noise = signal = 0.0
            for start in range(0, weight.shape[0], ROW_CHUNK):      # bounded temporaries for huge tensors
                rows = weight[start:start + ROW_CHUNK]
                error = (rows - q.dequantize(start, start + len(rows))).ravel()
                noise += float(np.vdot(error, error))
                signal += float(np.vdot(rows.ravel(), rows.ravel()))
            reports.append(TensorReport(p.name, p.grid.name, noise / weight.size,
                                        10 * math.log10(signal / noise) if noise > 0 else math.inf))
            yield p.name, q

    compressed.write(out_path, plans, tensors(), base_model_sha256=model_sha256, recipe=recipe.to_dict())
    layout = compressed.layout(plans)
    quantized = [p for p in plans if p.grid is not None]
    quantized_bytes = sum(_nbytes(*layout[f"{p.name}{suffix}"]) for p in quantized
                          for suffix in (".codes", ".scales", ".zeros") if f"{p.name}{suffix}" in layout)
    quantized_weights = sum(int(np.prod(p.shape)) for p in quantized)
    payload = sum(_nbytes(shape, dtype) for shape, dtype in layout.values())
    return CompressResult(reports, payload, 8 * quantized_bytes / quantized_weights if quantized_weights else 32.0)


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape)) * {"F32": 4, "F16": 2, "U8": 1}[dtype]
