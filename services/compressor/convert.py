"""Compressor protos <-> core dataclasses (reports); recipe converters: shared/quant/proto.py."""
from __future__ import annotations

from edgeforge.v1 import common_pb2, compressor_pb2
from services.compressor.compress import CompressResult
from services.compressor.histogram import WeightHistogram


def histogram_to_proto(histogram: WeightHistogram) -> common_pb2.WeightHistogram:
    return common_pb2.WeightHistogram(tensor=histogram.tensor, low=histogram.low, high=histogram.high,
                                      counts=histogram.counts, threshold=histogram.threshold,
                                      threshold_kind=histogram.threshold_kind,
                                      pruned_fraction=histogram.pruned_fraction)


def result_to_proto(result: CompressResult) -> list[compressor_pb2.TensorReport]:
    reports = []
    for t in result.tensors:
        report = compressor_pb2.TensorReport(name=t.name, grid=t.grid, mse=t.mse,
                                             snr_db=t.snr_db if t.snr_db != float("inf") else 999.0,
                                             bits_per_weight=t.bits_per_weight, output_error=t.output_error)
        if t.histogram is not None:
            report.histogram.CopyFrom(histogram_to_proto(t.histogram))
        reports.append(report)
    return reports
