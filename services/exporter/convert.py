"""Exporter protos <-> core values."""
from __future__ import annotations

from edgeforge.v1 import common_pb2
from services.exporter.base import CoremlOptions, ExportFormat, ExportOptions, OnnxWeightOperator, PaletteMode
from services.exporter.quality import ValidationResult
from shared.errors import InvalidArgument

_FORMATS = {common_pb2.EXPORT_FORMAT_GGUF: ExportFormat.GGUF, common_pb2.EXPORT_FORMAT_ONNX: ExportFormat.ONNX,
            common_pb2.EXPORT_FORMAT_TFLITE: ExportFormat.TFLITE, common_pb2.EXPORT_FORMAT_COREML: ExportFormat.COREML,
            common_pb2.EXPORT_FORMAT_REFERENCE: ExportFormat.REFERENCE}
_WEIGHT_OPERATORS = {common_pb2.ONNX_WEIGHT_OPERATOR_UNSPECIFIED: OnnxWeightOperator.DEQUANTIZE_LINEAR,
                     common_pb2.ONNX_WEIGHT_OPERATOR_DEQUANTIZE_LINEAR: OnnxWeightOperator.DEQUANTIZE_LINEAR,
                     common_pb2.ONNX_WEIGHT_OPERATOR_MATMUL_NBITS: OnnxWeightOperator.MATMUL_NBITS}
_PALETTE_MODES = {common_pb2.PALETTE_MODE_UNSPECIFIED: PaletteMode.KMEANS,
                  common_pb2.PALETTE_MODE_KMEANS: PaletteMode.KMEANS,
                  common_pb2.PALETTE_MODE_UNIFORM: PaletteMode.UNIFORM}


def format_from_proto(value: int, field: str = "format") -> ExportFormat:
    if value not in _FORMATS:
        names = ", ".join(f.value for f in _FORMATS.values())
        raise InvalidArgument(f"{field} {value} is not one of {names}", field=field)
    return _FORMATS[value]


def format_to_proto(value: ExportFormat) -> int:
    return {v: k for k, v in _FORMATS.items()}[value]


def _enum(table: dict, value: int, field: str):
    if value not in table:
        raise InvalidArgument(f"{field} {value} is not a known value", field=field)
    return table[value]


def options_from_proto(proto: common_pb2.ExportOptions, field: str = "options") -> ExportOptions:
    """Validated ExportOptions; unset fields take their defaults."""
    coreml = proto.coreml
    try:
        return ExportOptions(
            float_type=proto.float_type or "f32",
            onnx_weight_operator=_enum(_WEIGHT_OPERATORS, proto.onnx_weight_operator, f"{field}.onnx_weight_operator"),
            int8_activations=proto.int8_activations, external_data=proto.external_data,
            coreml=CoremlOptions(palette_bits=coreml.palette_bits,
                                 palette_mode=_enum(_PALETTE_MODES, coreml.palette_mode, f"{field}.coreml.palette_mode"),
                                 palette_group_size=coreml.palette_group_size, sparsity=coreml.sparsity,
                                 deployment_target=coreml.deployment_target or "iOS18"))
    except InvalidArgument as error:
        raise InvalidArgument(error.message, field=f"{field}.{(error.field or '').removeprefix('export.')}")


def options_to_proto(options: ExportOptions) -> common_pb2.ExportOptions:
    operators = {OnnxWeightOperator.DEQUANTIZE_LINEAR: common_pb2.ONNX_WEIGHT_OPERATOR_DEQUANTIZE_LINEAR,
                 OnnxWeightOperator.MATMUL_NBITS: common_pb2.ONNX_WEIGHT_OPERATOR_MATMUL_NBITS}
    modes = {PaletteMode.KMEANS: common_pb2.PALETTE_MODE_KMEANS, PaletteMode.UNIFORM: common_pb2.PALETTE_MODE_UNIFORM}
    c = options.coreml
    return common_pb2.ExportOptions(
        float_type=options.float_type, onnx_weight_operator=operators[options.onnx_weight_operator],
        int8_activations=options.int8_activations, external_data=options.external_data,
        coreml=common_pb2.CoremlOptions(palette_bits=c.palette_bits, palette_mode=modes[c.palette_mode],
                                        palette_group_size=c.palette_group_size, sparsity=c.sparsity,
                                        deployment_target=c.deployment_target))


def validation_to_proto(result: ValidationResult) -> common_pb2.Validation:
    return common_pb2.Validation(runtime=result.runtime, max_abs_diff=result.max_abs_diff,
                                 mean_abs_diff=result.mean_abs_diff, top1_agreement=result.top1_agreement,
                                 positions=result.positions, loaded=result.loaded)
