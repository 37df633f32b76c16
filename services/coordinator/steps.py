"""The coordinator's side of a pipeline candidate's per-step report: the steps after Transform.

Transform reports the source model and every prune/distill/qat step (size and quality in torch). What
follows is known only here: the quantization (Compress's payload, for LMs) and the exported file (its
size, and its quality measured in its own runtime). The export step says plainly when sparsity buys
nothing: GGUF, ONNX and TFLite store the zeros of an unstructured or N:M-pruned model densely, so only a
structurally pruned (smaller dense) model or a sparse-aware format makes the file smaller.
"""
from __future__ import annotations

from edgeforge.v1 import common_pb2, compressor_pb2
from shared.quant.grids import QuantizationConfig

DENSE_FORMATS = ("gguf", "onnx", "tflite")


def quantize_report(index: int, config: QuantizationConfig,
                    response: compressor_pb2.CompressResponse) -> common_pb2.StepReport:
    return common_pb2.StepReport(
        index=index, kind="quantize", description=f"{config.method.value} {config.grid().name}",
        stored_bytes=response.payload_bytes, storage=f"{response.bits_per_weight:.2f} bits/weight",
        seconds=response.seconds)


def export_report(index: int, candidate, result) -> common_pb2.StepReport:
    """The exported file as the last step: its size, and its quality where its runtime runs here."""
    grid = candidate.quantization.grid()
    report = common_pb2.StepReport(
        index=index, kind="export", description=f"{candidate.format.value} {grid.name if grid else candidate.float_type}",
        stored_bytes=result.size_bytes, storage=f"{candidate.format.value} file")
    if result.steps:                                   # the model the file holds: the last step's
        report.parameter_count, report.dense_bytes = result.steps[-1].parameter_count, result.steps[-1].dense_bytes
        report.nonzero_count = result.steps[-1].nonzero_count
    if result.HasField("quality"):
        report.quality.CopyFrom(result.quality)
    earlier = [step for step in result.steps if step.kind in ("prune", "distill", "qat")]
    sparsity = earlier[-1].sparsity if earlier else 0.0
    if sparsity >= 0.01 and candidate.format.value in DENSE_FORMATS:
        report.sparsity = sparsity
        report.note = (f"{candidate.format.value} stores zeros densely: the {100 * sparsity:.0f}% sparsity saves "
                       "nothing in this file (structured pruning does; sparse kernels would need a sparse format)")
    elif not result.HasField("quality"):
        report.note = f"quality not measured here: {result.validation.runtime}"
    return report
