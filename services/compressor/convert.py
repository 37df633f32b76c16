"""Compressor protos <-> core dataclasses (QuantizationConfig, reports)."""
from __future__ import annotations

from edgeforge.v1 import common_pb2, compressor_pb2
from services.compressor.compress import CompressResult
from shared.errors import InvalidArgument
from shared.quant.grids import Granularity, Method, QuantizationConfig

_METHODS = {common_pb2.QUANT_METHOD_NONE: Method.NONE, common_pb2.QUANT_METHOD_RTN: Method.RTN}
_GRANULARITIES = {common_pb2.GRANULARITY_PER_TENSOR: Granularity.PER_TENSOR,
                  common_pb2.GRANULARITY_PER_CHANNEL: Granularity.PER_CHANNEL,
                  common_pb2.GRANULARITY_PER_GROUP: Granularity.PER_GROUP}


def quantization_from_proto(proto: common_pb2.QuantizationConfig) -> QuantizationConfig:
    if proto.method not in _METHODS:
        raise InvalidArgument(f"quantization.method {proto.method} is not one of none, rtn",
                              field="quantization.method")
    if proto.granularity and proto.granularity not in _GRANULARITIES:
        raise InvalidArgument(f"quantization.granularity {proto.granularity} is unknown",
                              field="quantization.granularity")
    return QuantizationConfig(_METHODS[proto.method], proto.gguf_type, proto.bits,
                              _GRANULARITIES.get(proto.granularity), proto.group_size,
                              proto.symmetric if proto.HasField("symmetric") else True).validated()


def quantization_to_proto(config: QuantizationConfig) -> common_pb2.QuantizationConfig:
    methods = {v: k for k, v in _METHODS.items()}
    granularities = {v: k for k, v in _GRANULARITIES.items()}
    return common_pb2.QuantizationConfig(
        method=methods[config.method], gguf_type=config.gguf_type, bits=config.bits,
        granularity=granularities.get(config.granularity, 0), group_size=config.group_size,
        symmetric=config.symmetric)


def result_to_proto(result: CompressResult) -> list[compressor_pb2.TensorReport]:
    return [compressor_pb2.TensorReport(name=t.name, grid=t.grid, mse=t.mse,
                                        snr_db=t.snr_db if t.snr_db != float("inf") else 999.0)
            for t in result.tensors]
