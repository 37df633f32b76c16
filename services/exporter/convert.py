"""Exporter protos <-> core values."""
from __future__ import annotations

from edgeforge.v1 import common_pb2
from services.exporter.base import ExportFormat
from services.exporter.quality import ValidationResult
from shared.errors import InvalidArgument

_FORMATS = {common_pb2.EXPORT_FORMAT_GGUF: ExportFormat.GGUF, common_pb2.EXPORT_FORMAT_ONNX: ExportFormat.ONNX,
            common_pb2.EXPORT_FORMAT_REFERENCE: ExportFormat.REFERENCE}


def format_from_proto(value: int, field: str = "format") -> ExportFormat:
    if value not in _FORMATS:
        raise InvalidArgument(f"{field} {value} is not one of gguf, onnx, reference", field=field)
    return _FORMATS[value]


def format_to_proto(value: ExportFormat) -> int:
    return {v: k for k, v in _FORMATS.items()}[value]


def validation_to_proto(result: ValidationResult) -> common_pb2.Validation:
    return common_pb2.Validation(runtime=result.runtime, max_abs_diff=result.max_abs_diff,
                                 mean_abs_diff=result.mean_abs_diff, top1_agreement=result.top1_agreement,
                                 positions=result.positions, loaded=result.loaded)
