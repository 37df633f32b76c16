"""Compress a float32 model into a compressed-model file, by any method onto any grid.

Two paths:
- streaming, tensor by tensor (RTN, importance-weighted RTN, GPTQ with the calibrator's Hessians):
  each tensor is read from the memory-mapped safetensors, quantized, written and dropped;
- layer by layer (`layerwise.py`: GPTQ with sequential calibration, AWQ, AWQ → GPTQ): one decoder
  block's weights plus the calibration hidden states.
Either way the writer streams, so peak memory does not grow with the model.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from services.compressor.layerwise import LayerwiseQuantizer, check_architecture
from services.compressor.mixed import Allocation, allocate
from services.compressor.streaming import TensorReport, measure, stream_tensors
from shared.errors import FailedPrecondition, InvalidArgument
from shared.models.bundle import ModelDir
from shared.models.decoder_config import is_linear_weight
from shared.quant import compressed
from shared.quant.grids import Method, QuantizationConfig
from shared.quant.qtensor import GgufTensor, QuantizedTensor
from shared.quant.rules import tensor_grid

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CompressResult:
    tensors: list[TensorReport]
    payload_bytes: int
    bits_per_weight: float   # over quantized tensors, scales and zeros included
    seconds: float = 0.0
    device: str = "cpu"
    metadata: dict = dataclasses.field(default_factory=dict)   # allocation, AWQ choices …


@dataclasses.dataclass
class Calibration:
    """What calibrated methods consume: the calibrator's statistics and/or the token sequences."""
    stats: object | None = None                 # services.calibrator.stats.CalibrationStats
    sequences: torch.Tensor | None = None       # (samples, tokens) int64, for block-by-block methods


def default_device() -> str:
    """EDGEFORGE_DEVICE, else CUDA when present, else CPU."""
    wanted = os.environ.get("EDGEFORGE_DEVICE")
    if wanted:
        return wanted
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def plan(model: ModelDir, recipe: QuantizationConfig) -> list[compressed.TensorPlan]:
    shapes = model.config.tensor_shapes()
    plans = [compressed.TensorPlan(name, shape, tensor_grid(name, shape, model.config, recipe))
             for name, shape in shapes.items()]
    for p in plans:
        if p.grid is not None:
            p.grid.check_shape(*p.shape, tensor=p.name)
    return plans


def check_steps(steps: list[QuantizationConfig]) -> list[QuantizationConfig]:
    steps = [step.validated() for step in steps]
    for i, step in enumerate(steps[:-1]):
        if step.method is not Method.AWQ:
            raise InvalidArgument(f"recipe step {i} is {step.method.value}; only awq may precede the final "
                                  "quantization step", field=f"recipe[{i}].method")
        if step.grid() != steps[-1].grid() or step.gguf_type != steps[-1].gguf_type:
            raise InvalidArgument(f"recipe step {i} searches AWQ scales for {step.to_dict()} but the final step "
                                  f"quantizes to {steps[-1].to_dict()}; give both the same grid",
                                  field=f"recipe[{i}]")
    if steps[-1].grid() is None:
        raise InvalidArgument(f"recipe {steps[-1].to_dict()} quantizes nothing; export the float model instead",
                              field="quantization")
    return steps


def needs_sequences(steps: list[QuantizationConfig]) -> bool:
    final = steps[-1]
    return any(s.method is Method.AWQ for s in steps) or (final.method is Method.GPTQ and final.gptq.sequential)


def compress(model: ModelDir, model_sha256: str, recipe: QuantizationConfig, out_path: Path, *,
             pre_steps: tuple[QuantizationConfig, ...] = (), calibration: Calibration | None = None,
             device: str | None = None, progress: Callable[[str], None] | None = None) -> CompressResult:
    started = time.perf_counter()
    steps = check_steps([*pre_steps, recipe])
    recipe = steps[-1]
    calibration = calibration or Calibration()
    device = device or default_device()
    plans = plan(model, recipe)
    stats = calibration.stats
    needs_stats = recipe.method is Method.IMATRIX or recipe.mixed is not None or \
        (recipe.method is Method.GPTQ and not recipe.gptq.sequential)
    layerwise = needs_sequences(steps)
    if needs_stats or layerwise:
        check_architecture(model.config, steps)          # before any long work
    if needs_stats and stats is None:
        raise FailedPrecondition(f"method {recipe.method.value}{' with mixed_precision' if recipe.mixed else ''} "
                                 "needs calibration statistics (calibration_stats)", field="calibration_stats")
    if layerwise and calibration.sequences is None:
        raise FailedPrecondition(f"method {'+'.join(s.method.value for s in steps)} runs the model block by block "
                                 "and needs calibration text (calibration_dataset)", field="calibration_dataset")
    metadata: dict = {}
    if recipe.mixed is not None:
        names = [p.name for p in plans if p.grid is not None and is_linear_weight(p.name)]
        allocation: Allocation = allocate(model, names, recipe, stats)
        plans = [dataclasses.replace(p, grid=allocation.grids.get(p.name, p.grid)) for p in plans]
        metadata["mixed_precision"] = allocation.to_dict()
    grids = {p.name: p.grid for p in plans}
    reports: list[TensorReport] = []

    if layerwise:
        blocks = [p for p in plans if ".layers." in p.name]
        plans = blocks + [p for p in plans if ".layers." not in p.name]      # head last: it needs the final states
        quantizer = LayerwiseQuantizer(model, grids, steps, calibration.sequences, device, progress)
        source = quantizer.tensors([p.name for p in plans])
    else:
        quantizer = None
        source = stream_tensors(model, plans, recipe, stats, device, progress, reports.append)

    def reported() -> Iterator[tuple[str, object]]:
        for name, value in source:
            if quantizer is not None and isinstance(value, (QuantizedTensor, GgufTensor)):
                reports.append(_report(model, name, value, quantizer))
            yield name, value

    compressed.write(out_path, plans, reported(), base_model_sha256=model_sha256,
                     recipe={"steps": [s.to_dict() for s in steps]} if pre_steps else recipe.to_dict(),
                     extra=metadata)                     # the header precedes the data: only what is known now
    layout = compressed.layout(plans)
    quantized = [p for p in plans if p.grid is not None]
    quantized_bytes = sum(_nbytes(*layout[f"{p.name}{suffix}"]) for p in quantized
                          for suffix in (".codes", ".scales", ".zeros", ".gguf") if f"{p.name}{suffix}" in layout)
    quantized_weights = sum(int(np.prod(p.shape)) for p in quantized)
    payload = sum(_nbytes(shape, dtype) for shape, dtype in layout.values())
    return CompressResult(reports, payload, 8 * quantized_bytes / quantized_weights if quantized_weights else 32.0,
                          time.perf_counter() - started, device, _metadata(metadata, quantizer))


def _metadata(metadata: dict, quantizer: LayerwiseQuantizer | None) -> dict:
    if quantizer is not None and quantizer.report.awq:
        metadata = {**metadata, "awq": quantizer.report.awq}
    return metadata


def _report(model: ModelDir, name: str, value: QuantizedTensor | GgufTensor,
            quantizer: LayerwiseQuantizer) -> TensorReport:
    """Block weights are measured against what the quantizer saw (after AWQ's scaling); embeddings and
    the head, quantized outside the blocks, against the model's own weights. The histogram is always
    of the model's own weights."""
    if name not in quantizer.report.weight_error:
        return measure(name, model.array(name), value, None)
    noise, signal = quantizer.report.weight_error[name]
    rows, columns = value.shape
    return TensorReport(name, value.grid.name, noise / (rows * columns),
                        10 * math.log10(signal / noise) if noise > 0 else math.inf,
                        value.grid.bits_per_weight(columns), quantizer.report.output_error.get(name, 0.0),
                        quantizer.report.histograms.get(name))


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape)) * {"F32": 4, "F16": 2, "U8": 1}[dtype]
