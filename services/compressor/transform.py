"""Transform: a candidate's prune / distill / qat steps on a float model, with size and quality after each.

The output is a float model of the same family and format as the input (a decoder bundle for causal LMs,
a module bundle for image classifiers and encoders): what the step did is in its weights (zeros, fewer
units, values on a grid), so everything downstream — Compress, every exporter, every runtime — works on
it unchanged. Post-training quantization is not a Transform step (Compress or the exporter does it).

After every step the model is measured the same way:
- size: parameters, nonzero share of the prunable (linear/conv) weights, bytes stored densely at float32,
  and bytes at the best honest storage (services/compressor/prune/sparse.py: a tensor is stored as CSR or
  a bitmask only where that is smaller than dense — at 50% sparsity float32 CSR is *larger* than dense,
  a bitmask saves 47%);
- quality on the build's evaluation data, in torch: perplexity for LMs, top-1 accuracy / agreement or
  embedding cosine similarity for the other families (shared/models/module_quality.py).

Causal LMs stream block by block where the algorithm allows (services/compressor/prune/decoder.py);
distillation loads student and teacher whole (135M parameters: ~1.6 GB with AdamW state). Image and
encoder models are small and live in memory. Training runs on CUDA when present, else on the CPU.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from edgeforge.v1 import common_pb2
from services.compressor.convert import histogram_to_proto
from services.compressor.histogram import WeightHistogram
from services.compressor.prune.sparse import sparse_size
from services.compressor.steps import CAUSAL_LM, TransformStep, Training, quality_loss_pct
from services.compressor.train.loop import TrainingConfig, resolve_device
from shared.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class TransformData:
    """The build's datasets as local files, and how much of them each use takes."""
    task: str
    calibration: Path | None
    calibration_samples: int
    sequence_length: int
    training: Path | None
    evaluation: Path
    max_tokens: int = 4096
    window_tokens: int = 512
    max_samples: int = 0


@dataclasses.dataclass(frozen=True)
class Size:
    parameters: int
    prunable: int
    nonzero: int
    dense_bytes: int
    stored_bytes: int
    sparse_tensors: int
    sparse_format: str

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.prunable if self.prunable else 0.0

    @property
    def storage(self) -> str:
        if not self.sparse_tensors:
            return "dense f32"
        return f"{self.sparse_format}+f32 for {self.sparse_tensors} sparse tensors, dense f32 for the rest"


def measure_size(tensors: Iterable[tuple[str, np.ndarray, bool]]) -> Size:
    """Sizes of (name, float32 array, prunable) tensors; sparse storage only where it is smaller."""
    parameters = prunable = nonzero = dense = stored = sparse = 0
    formats = set()
    for _, array, is_prunable in tensors:
        parameters += array.size
        size = sparse_size(array, 4)
        dense += size.dense_bytes
        stored += size.stored_bytes
        if size.format != "dense":
            sparse += 1
            formats.add(size.format)
        if is_prunable:
            prunable += array.size
            nonzero += size.nonzeros
    return Size(parameters, prunable, nonzero, dense, stored, sparse, "/".join(sorted(formats)))


def step_report(index: int, kind: str, description: str, size: Size, quality: dict, seconds: float,
                note: str = "", histograms: Iterable[WeightHistogram] = ()) -> common_pb2.StepReport:
    return common_pb2.StepReport(
        index=index, kind=kind, description=description, parameter_count=size.parameters,
        nonzero_count=size.nonzero, sparsity=size.sparsity, dense_bytes=size.dense_bytes,
        stored_bytes=size.stored_bytes, storage=size.storage, quality=common_pb2.Quality(**quality),
        seconds=seconds, note=note, histograms=[histogram_to_proto(h) for h in histograms])


def training_config(training: Training, task: str) -> TrainingConfig:
    resolved = training.resolved(task)
    return TrainingConfig(resolved.steps, resolved.batch_size, resolved.learning_rate, resolved.seed).validated()


def loss_note(losses: list[float]) -> str:
    if not losses:
        return ""
    head, tail = np.mean(losses[:max(1, len(losses) // 10)]), np.mean(losses[-max(1, len(losses) // 10):])
    return f"{len(losses)} steps, loss {head:.4f} → {tail:.4f}"


# ======================================================================================= the runner

def run_transform(source: Path, steps: tuple[TransformStep, ...], data: TransformData, work: Path, out: Path, *,
                  device: str | None = None, progress: Progress | None = None
                  ) -> tuple[list[common_pb2.StepReport], int]:
    """Runs `steps` on the float model at `source`, writes the result to `out`; returns the step reports
    (index 0: the source) and the resulting parameter count."""
    progress = progress or (lambda message: log.info("%s", message))
    target = resolve_device(device)
    if data.task == CAUSAL_LM:
        from services.compressor.transform_decoder import DecoderTransform
        runner = DecoderTransform(source, data, work, target, progress)
        current = runner.source
    else:
        from services.compressor.transform_modules import ModuleTransform
        runner = ModuleTransform(source, data, work, target, progress)
        current = runner.student()
    size = runner.size(current)
    reports = [step_report(0, "source", "float32 source model", size, runner.quality(current), 0.0)]
    previous_dir = None
    for index, step in enumerate(steps, start=1):
        progress(f"step {index}/{len(steps)}: {step.describe()}")
        started = time.perf_counter()
        current, note, histograms = runner.run(index, step, current)
        seconds = time.perf_counter() - started
        size = runner.size(current)
        reports.append(step_report(index, step.kind, step.describe(), size, runner.quality(current), seconds, note,
                                   histograms))
        reports[-1].quality.baseline = reports[0].quality.value
        reports[-1].quality.delta_pct = quality_loss_pct(reports[-1].quality)
        log.info("transform step %d %s: sparsity %.3f, %d parameters, %s %.4f (%.1f s)", index, step.describe(),
                 size.sparsity, size.parameters, reports[-1].quality.metric, reports[-1].quality.value, seconds)
        if data.task == CAUSAL_LM:
            if previous_dir is not None:
                shutil.rmtree(previous_dir, ignore_errors=True)   # one intermediate LM on disk at a time
            previous_dir = current.path
    _check_finite(reports)
    runner.save(current, out)
    return reports, size.parameters


def _check_finite(reports: list[common_pb2.StepReport]) -> None:
    last = reports[-1]
    if not math.isfinite(last.quality.value):
        raise FailedPrecondition(f"the model after step {last.index} ({last.description}) gives non-finite "
                                 f"{last.quality.metric}; training diverged (lower the learning rate)",
                                 reason="VALIDATION_FAILED")


def check_inputs(data: TransformData, steps: tuple[TransformStep, ...]) -> None:
    """Datasets the steps need, before any work."""
    if any(step.calibrated for step in steps) and data.calibration is None:
        raise InvalidArgument("calibration_dataset is required by wanda, sparsegpt and structured pruning",
                              field="calibration_dataset")
