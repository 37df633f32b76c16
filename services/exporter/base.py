"""The exporter interface shared by every format, the inputs an export reads, and the options it takes.

Every format is one module under `formats/` that subclasses `Exporter` and imports its SDK (gguf-py,
onnx, litert-torch, coremltools) inside its methods, so a worker without an SDK still serves the
others. An exporter first `check`s what it is asked (cheap: config and options only) and raises
FailedPrecondition with reason UNSUPPORTED_ARCH / UNSUPPORTED_OP before any long work; then `export`
writes a file or a directory (a Core ML package, ONNX with external data) at a scratch path that the
caller stores only after the file passed validation in its own runtime.
"""
from __future__ import annotations

import abc
import dataclasses
import enum
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import FailedPrecondition, InvalidArgument
from shared.models.bundle import ModelDir
from shared.quant.compressed import CompressedModel
from shared.quant.qtensor import QuantizedTensor


class ExportFormat(enum.Enum):
    GGUF = "gguf"
    ONNX = "onnx"
    TFLITE = "tflite"
    COREML = "coreml"
    REFERENCE = "reference"


FLOAT_TYPES = ("f32", "f16", "bf16")


class OnnxWeightOperator(enum.Enum):
    """How ONNX carries quantized linear weights."""
    DEQUANTIZE_LINEAR = "dequantize_linear"      # standard opset-21 DequantizeLinear → MatMul (any grid)
    MATMUL_NBITS = "matmul_nbits"                # com.microsoft MatMulNBits (4-bit per-group, onnxruntime)


class PaletteMode(enum.Enum):
    KMEANS = "kmeans"
    UNIFORM = "uniform"


@dataclasses.dataclass(frozen=True)
class CoremlOptions:
    """Core ML weight compression applied on top of (or instead of) the compressed model's grid."""
    palette_bits: int = 0                        # 0: no palettization; 1..8: a 2^bits-entry LUT per tensor/group
    palette_mode: PaletteMode = PaletteMode.KMEANS
    palette_group_size: int = 0                  # 0: one LUT per tensor; n: one per n output channels
    sparsity: float = 0.0                        # magnitude-prune to this fraction of zeros and store sparse
    deployment_target: str = "iOS18"            # minimum_deployment_target (int4 per-block needs iOS18)

    def __post_init__(self):
        if not 0 <= self.palette_bits <= 8:
            raise InvalidArgument(f"coreml.palette_bits must be in [0, 8], got {self.palette_bits}",
                                  field="export.coreml.palette_bits")
        if not 0.0 <= self.sparsity < 1.0:
            raise InvalidArgument(f"coreml.sparsity must be in [0, 1), got {self.sparsity}",
                                  field="export.coreml.sparsity")
        if self.palette_group_size < 0:
            raise InvalidArgument(f"coreml.palette_group_size must be ≥ 0, got {self.palette_group_size}",
                                  field="export.coreml.palette_group_size")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What an export does beyond writing the compressed model's weights as they are."""
    float_type: str = "f32"                      # storage of tensors left float: f32, f16, bf16 (GGUF only)
    onnx_weight_operator: OnnxWeightOperator = OnnxWeightOperator.DEQUANTIZE_LINEAR
    int8_activations: bool = False              # ONNX static QDQ / TFLite full int8, from activation ranges
    external_data: bool = False                 # ONNX: weights in a side file even below 2 GiB
    coreml: CoremlOptions = CoremlOptions()

    def __post_init__(self):
        if self.float_type not in FLOAT_TYPES:
            raise InvalidArgument(f"float_type must be one of {', '.join(FLOAT_TYPES)}, got {self.float_type!r}",
                                  field="float_type")

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for lineage and provenance."""
        def plain(value):
            if isinstance(value, enum.Enum):
                return value.value
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            return value
        return plain(self)


@dataclasses.dataclass(frozen=True)
class ActivationRanges:
    """Per-linear input ranges from the calibrator (what static activation quantization needs):
    HF linear name (e.g. "model.layers.0.self_attn.q_proj") -> (min, max) of its input."""
    ranges: dict[str, tuple[float, float]]
    source: str = ""                             # the calibration artifact they came from

    @classmethod
    def from_stats(cls, path: Path, name: str = "") -> "ActivationRanges":
        """Min/max of each linear's input from a calibration statistics file (the calibrator's format)."""
        from services.calibrator.stats_file import CalibrationStats
        stats = CalibrationStats.open(path)
        ranges = {}
        for weight in stats.weights():
            measured = stats.activation_range(weight)
            ranges[weight.removesuffix(".weight")] = (measured["min"], measured["max"])
        return cls(ranges, name)

    def get(self, linear: str) -> tuple[float, float]:
        if linear not in self.ranges:
            raise FailedPrecondition(f"the calibration statistics have no input range for {linear}",
                                     reason="MISSING_CALIBRATION", field="calibration")
        return self.ranges[linear]


@dataclasses.dataclass(frozen=True)
class ExportInput:
    """The float model (config, tokenizer, float tensors) and, optionally, its quantized weights."""
    model: ModelDir
    model_sha256: str
    compressed: CompressedModel | None = None
    options: ExportOptions = ExportOptions()
    activations: ActivationRanges | None = None

    def __post_init__(self):
        if self.compressed is not None and self.compressed.base_model != self.model_sha256:
            raise InvalidArgument(f"compressed model was made from artifacts/{self.compressed.base_model}, "
                                  f"not from artifacts/{self.model_sha256}", field="compressed")
        if self.options.int8_activations and self.activations is None:
            raise FailedPrecondition("int8 activations need the calibrator's activation ranges",
                                     reason="MISSING_CALIBRATION", field="calibration")

    @property
    def float_type(self) -> str:
        return self.options.float_type

    def tensor(self, name: str) -> np.ndarray | QuantizedTensor:
        """A quantized tensor when the compressed model quantized it, else float32 from the model."""
        if self.compressed is not None:
            plan = self.compressed.plan(name)
            if plan.grid is not None:
                return self.compressed.read(name)
        return self.model.array(name)

    def dequantized(self, name: str) -> np.ndarray:
        """The weights the exported file must compute with, as float32 (quantized tensors decoded)."""
        if self.compressed is not None and self.compressed.plan(name).grid is not None:
            return np.ascontiguousarray(self.compressed.dequantized(name), dtype=np.float32)
        return self.model.array(name)

    def grid(self, name: str):
        """The tensor's quantization grid, or None when it stays float."""
        return self.compressed.plan(name).grid if self.compressed is not None else None

    @property
    def recipe(self) -> dict:
        return self.compressed.recipe if self.compressed is not None else {"method": "none", "type": self.float_type}


@dataclasses.dataclass(frozen=True)
class ExportedFile:
    """What an exporter wrote: a file, or a directory (Core ML package, ONNX + external data) that the
    caller stores as a deterministic tar."""
    path: Path
    media_type: str
    labels: dict[str, str]
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)   # exporter options, tool versions


class Exporter(abc.ABC):
    format: ExportFormat
    suffix: str                  # ".gguf", ".onnx", ".tflite", ".mlpackage"

    def check(self, source: ExportInput) -> None:
        """Raises FailedPrecondition (UNSUPPORTED_ARCH / UNSUPPORTED_OP) for what this format cannot
        express, from the config and options alone (no weights read)."""

    @abc.abstractmethod
    def export(self, source: ExportInput, out_path: Path) -> ExportedFile:
        """Writes `source` at `out_path` (a scratch path the caller renames into the store)."""

    def runs_here(self) -> bool:
        """Whether this machine can run the format's runtime (Core ML prediction needs macOS). When it
        cannot, `read_back` alone proves the file."""
        return True

    def why_not_here(self) -> str:
        """When runs_here() is False: the reason, for the fidelity record and the report."""
        return ""

    def read_back(self, exported: ExportedFile, source: ExportInput) -> dict[str, Any]:
        """Reads the written file back with the format's own tooling and returns what it holds (ops,
        weight dtypes, sizes, input/output shapes); raises FailedPrecondition (VALIDATION_FAILED) when
        it does not hold what was asked. The result joins the artifact's fidelity record."""
        return {}


def unsupported_arch(format_name: str, architecture: str, supported: tuple[str, ...]) -> FailedPrecondition:
    return FailedPrecondition(f"{format_name} export does not support architecture {architecture!r} "
                              f"(supported: {', '.join(supported)})", reason="UNSUPPORTED_ARCH", field="model")


def unsupported_op(format_name: str, what: str) -> FailedPrecondition:
    return FailedPrecondition(f"{format_name} cannot express {what}", reason="UNSUPPORTED_OP", field="format")
