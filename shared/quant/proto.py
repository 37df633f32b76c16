"""QuantizationConfig proto <-> dataclass, shared by the services, the SDK and the CLI."""
from __future__ import annotations

from edgeforge.v1 import common_pb2
from shared.errors import InvalidArgument
from shared.quant.grids import AwqOptions, GptqOptions, Granularity, Method, MixedPrecision, QuantizationConfig, \
    ScaleRule

_METHODS = {common_pb2.QUANT_METHOD_NONE: Method.NONE, common_pb2.QUANT_METHOD_RTN: Method.RTN,
            common_pb2.QUANT_METHOD_IMATRIX: Method.IMATRIX, common_pb2.QUANT_METHOD_GPTQ: Method.GPTQ,
            common_pb2.QUANT_METHOD_AWQ: Method.AWQ}
_GRANULARITIES = {common_pb2.GRANULARITY_PER_TENSOR: Granularity.PER_TENSOR,
                  common_pb2.GRANULARITY_PER_CHANNEL: Granularity.PER_CHANNEL,
                  common_pb2.GRANULARITY_PER_GROUP: Granularity.PER_GROUP}
_SCALES = {common_pb2.SCALE_SEARCH_MINMAX: ScaleRule.MINMAX, common_pb2.SCALE_SEARCH_PERCENTILE: ScaleRule.PERCENTILE,
           common_pb2.SCALE_SEARCH_MSE: ScaleRule.MSE}


def quantization_from_proto(proto: common_pb2.QuantizationConfig, field: str = "quantization") -> QuantizationConfig:
    """Validated config; errors name `field` (e.g. "candidates[2].recipe[0]") instead of "quantization"."""
    try:
        return _from_proto(proto).validated()
    except InvalidArgument as error:
        if field != "quantization" and error.field and error.field.startswith("quantization"):
            raise InvalidArgument(error.message.replace("quantization.", f"{field}."), reason=error.reason,
                                  field=field + error.field[len("quantization"):])
        raise


def _from_proto(proto: common_pb2.QuantizationConfig) -> QuantizationConfig:
    if proto.method not in _METHODS:
        raise InvalidArgument(f"quantization.method {proto.method} is not one of none, rtn, imatrix, gptq, awq",
                              field="quantization.method")
    if proto.granularity and proto.granularity not in _GRANULARITIES:
        raise InvalidArgument(f"quantization.granularity {proto.granularity} is unknown",
                              field="quantization.granularity")
    if proto.scale and proto.scale not in _SCALES:
        raise InvalidArgument(f"quantization.scale {proto.scale} is unknown", field="quantization.scale")
    g, a = proto.gptq, proto.awq
    gptq = GptqOptions(g.damp_percent or 0.01, g.block_size or 128,
                       g.act_order if g.HasField("act_order") else True,
                       g.sequential if g.HasField("sequential") else True)
    awq = AwqOptions(a.grid or 20, a.clip if a.HasField("clip") else True)
    mixed = None
    if proto.HasField("mixed_precision"):
        mixed = MixedPrecision(tuple(proto.mixed_precision.options), proto.mixed_precision.max_bits_per_weight)
    return QuantizationConfig(_METHODS[proto.method], proto.gguf_type, proto.bits,
                              _GRANULARITIES.get(proto.granularity), proto.group_size,
                              proto.symmetric if proto.HasField("symmetric") else True,
                              _SCALES.get(proto.scale, ScaleRule.MINMAX), proto.percentile or 99.9, gptq, awq, mixed)


def quantization_to_proto(config: QuantizationConfig) -> common_pb2.QuantizationConfig:
    methods = {v: k for k, v in _METHODS.items()}
    granularities = {v: k for k, v in _GRANULARITIES.items()}
    scales = {v: k for k, v in _SCALES.items()}
    proto = common_pb2.QuantizationConfig(
        method=methods[config.method], gguf_type=config.gguf_type, bits=config.bits,
        granularity=granularities.get(config.granularity, 0), group_size=config.group_size,
        symmetric=config.symmetric)
    if config.bits:
        proto.scale = scales.get(config.scale, 0)
        if config.scale is ScaleRule.PERCENTILE:
            proto.percentile = config.percentile
    if config.method is Method.GPTQ:
        proto.gptq.CopyFrom(common_pb2.GptqOptions(damp_percent=config.gptq.damp_percent,
                                                   block_size=config.gptq.block_size,
                                                   act_order=config.gptq.act_order,
                                                   sequential=config.gptq.sequential))
    if config.method is Method.AWQ:
        proto.awq.CopyFrom(common_pb2.AwqOptions(grid=config.awq.grid, clip=config.awq.clip))
    if config.mixed is not None:
        proto.mixed_precision.CopyFrom(common_pb2.MixedPrecision(options=list(config.mixed.options),
                                                                 max_bits_per_weight=config.mixed.max_bits_per_weight))
    return proto
