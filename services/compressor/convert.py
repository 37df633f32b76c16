"""Compressor protos <-> core dataclasses (reports); recipe converters: shared/quant/proto.py."""
from __future__ import annotations

from edgeforge.v1 import compressor_pb2
from services.compressor.compress import CompressResult


def result_to_proto(result: CompressResult) -> list[compressor_pb2.TensorReport]:
    return [compressor_pb2.TensorReport(name=t.name, grid=t.grid, mse=t.mse,
                                        snr_db=t.snr_db if t.snr_db != float("inf") else 999.0,
                                        bits_per_weight=t.bits_per_weight, output_error=t.output_error)
            for t in result.tensors]
