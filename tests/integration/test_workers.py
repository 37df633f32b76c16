"""Worker RPCs over real gRPC on the real packaged GGUF: import it as a float32 model, and the precise
errors for inputs a worker cannot use."""
from __future__ import annotations

import grpc
import pytest
from status_checks import reason, rpc_code

from edgeforge.v1 import common_pb2, compressor_pb2, compressor_pb2_grpc, exporter_pb2, exporter_pb2_grpc
from shared.assets import smollm2_gguf

pytestmark = pytest.mark.slow


def test_import_the_packaged_gguf(coordinator, tmp_path):
    source = coordinator.upload(smollm2_gguf(), common_pb2.ARTIFACT_KIND_SOURCE_MODEL, media_type="application/x-gguf")
    compressor = compressor_pb2_grpc.CompressorStub(coordinator.channel)
    imported = compressor.ImportModel(compressor_pb2.ImportModelRequest(source=source.name), timeout=600)
    assert imported.architecture == "llama" and imported.parameter_count == 134_515_008
    model = imported.model
    assert model.kind == common_pb2.ARTIFACT_KIND_MODEL and model.size_bytes > 530e6    # float32 now
    assert list(model.lineage.inputs) == [source.name]
    assert model.lineage.producer == "edgeforge.v1.Compressor/ImportModel"

    with pytest.raises(grpc.RpcError) as error:
        compressor.Compress(compressor_pb2.CompressRequest(model=model.name, quantization=common_pb2.QuantizationConfig(
            method=common_pb2.QUANT_METHOD_RTN, bits=4, granularity=common_pb2.GRANULARITY_PER_GROUP, group_size=128)),
            timeout=600)
    assert rpc_code(error) == "INVALID_ARGUMENT" and "576" in error.value.details()   # 128 does not divide 576


def test_workers_refuse_what_they_cannot_use(coordinator, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("plain text, not a model\n")
    artifact = coordinator.upload(text, common_pb2.ARTIFACT_KIND_DATASET)
    compressor = compressor_pb2_grpc.CompressorStub(coordinator.channel)
    exporter = exporter_pb2_grpc.ExporterStub(coordinator.channel)
    with pytest.raises(grpc.RpcError) as error:
        compressor.ImportModel(compressor_pb2.ImportModelRequest(source=artifact.name))
    assert rpc_code(error) == "INVALID_ARGUMENT" and reason(error) == "UNKNOWN_MODEL_FORMAT"
    with pytest.raises(grpc.RpcError) as error:
        compressor.Compress(compressor_pb2.CompressRequest(model=artifact.name, quantization=common_pb2.QuantizationConfig(
            method=common_pb2.QUANT_METHOD_RTN, bits=9, granularity=common_pb2.GRANULARITY_PER_CHANNEL)))
    assert rpc_code(error) == "INVALID_ARGUMENT" and "bits" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        exporter.Export(exporter_pb2.ExportRequest(model=artifact.name, format=common_pb2.EXPORT_FORMAT_GGUF))
    assert rpc_code(error) == "INVALID_ARGUMENT" and reason(error) == "UNKNOWN_MODEL_FORMAT"
    with pytest.raises(grpc.RpcError) as error:
        exporter.Export(exporter_pb2.ExportRequest(model=artifact.name, format=77))
    assert rpc_code(error) == "INVALID_ARGUMENT" and "format" in error.value.details()
