"""The exporter interface shared by every format, and the inputs an export reads."""
from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Protocol

import numpy as np

from shared.errors import InvalidArgument
from shared.models.bundle import ModelDir
from shared.quant.compressed import CompressedModel
from shared.quant.qtensor import QuantizedTensor


class ExportFormat(enum.Enum):
    GGUF = "gguf"
    ONNX = "onnx"
    REFERENCE = "reference"


@dataclasses.dataclass(frozen=True)
class ExportInput:
    """The float model (config, tokenizer, float tensors) and, optionally, its quantized weights."""
    model: ModelDir
    model_sha256: str
    compressed: CompressedModel | None = None
    float_type: str = "f32"            # for tensors the compressed model leaves float (or all, if none)

    def __post_init__(self):
        if self.compressed is not None and self.compressed.base_model != self.model_sha256:
            raise InvalidArgument(f"compressed model was made from artifacts/{self.compressed.base_model}, "
                                  f"not from artifacts/{self.model_sha256}", field="compressed")
        if self.float_type not in ("f32", "f16"):
            raise InvalidArgument(f"float_type must be f32 or f16, got {self.float_type!r}", field="float_type")

    def tensor(self, name: str) -> np.ndarray | QuantizedTensor:
        """A quantized tensor when the compressed model quantized it, else float32 from the model."""
        if self.compressed is not None:
            plan = self.compressed.plan(name)
            if plan.grid is not None:
                return self.compressed.read(name)
        return self.model.array(name)

    def grid(self, name: str):
        """The tensor's quantization grid, or None when it stays float."""
        return self.compressed.plan(name).grid if self.compressed is not None else None

    @property
    def recipe(self) -> dict:
        return self.compressed.recipe if self.compressed is not None else {"method": "none", "type": self.float_type}


@dataclasses.dataclass(frozen=True)
class ExportedFile:
    path: Path
    media_type: str
    labels: dict[str, str]


class Exporter(Protocol):
    format: ExportFormat

    def export(self, source: ExportInput, out_path: Path) -> ExportedFile:
        """Writes the file for `source` at `out_path` (a temp path the caller renames into the store)."""
        ...
