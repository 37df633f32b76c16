"""Compressor protos <-> core dataclasses (reports); the recipe converters live in shared/quant/proto.py."""
from __future__ import annotations

from edgeforge.v1 import compressor_pb2
from services.compressor.compress import CompressResult
from shared.quant.proto import quantization_from_proto, quantization_to_proto  # noqa: F401  (re-exported)


def result_to_proto(result: CompressResult) -> list[compressor_pb2.TensorReport]:
    return [compressor_pb2.TensorReport(name=t.name, grid=t.grid, mse=t.mse,
                                        snr_db=t.snr_db if t.snr_db != float("inf") else 999.0,
                                        bits_per_weight=t.bits_per_weight, output_error=t.output_error)
            for t in result.tensors]
