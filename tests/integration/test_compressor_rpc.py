"""The Compressor RPC over real gRPC with every method, and its precise answers to bad input: the status
code, the field, a message that names the problem, a server that keeps serving, and no artifact left
behind."""
from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest
from status_checks import reason, rpc_code

from edgeforge.v1 import common_pb2, compressor_pb2, compressor_pb2_grpc
from shared.grpc_status import error_details
from shared.tensors.safetensors_writer import write_safetensors

Q = common_pb2.QuantizationConfig
GPTQ, AWQ, RTN, IMATRIX = (common_pb2.QUANT_METHOD_GPTQ, common_pb2.QUANT_METHOD_AWQ, common_pb2.QUANT_METHOD_RTN,
                           common_pb2.QUANT_METHOD_IMATRIX)
GROUP = common_pb2.GRANULARITY_PER_GROUP


@pytest.fixture
def compressor(coordinator, tiny_model_dir, assets):
    model = coordinator.upload_model(tiny_model_dir)
    data = coordinator.upload(assets / "data" / "calib.txt", common_pb2.ARTIFACT_KIND_DATASET)
    stub = compressor_pb2_grpc.CompressorStub(coordinator.channel)
    imported = stub.ImportModel(compressor_pb2.ImportModelRequest(source=model.name), timeout=300).model
    return stub, imported.name, data.name


def _stored(coordinator) -> int:
    return sum(1 for _ in coordinator.ctx.store.list())


def test_gptq_and_awq_recipe_over_rpc(compressor, coordinator):
    stub, model, data = compressor
    response = stub.Compress(compressor_pb2.CompressRequest(
        model=model, quantization=Q(method=GPTQ, gguf_type="q4_0"), pre_steps=[Q(method=AWQ, gguf_type="q4_0")],
        calibration_dataset=data, calibration_samples=4, calibration_sequence_length=32), timeout=600)
    assert response.device == "cpu" and response.seconds > 0 and response.bits_per_weight > 4.5
    linears = [t for t in response.tensors if ".layers." in t.name]
    assert linears and all(t.grid == "q4_0" and t.output_error > 0 and t.bits_per_weight == 4.5 for t in linears)
    record = coordinator.ctx.store.get(response.compressed.name.removeprefix("artifacts/"))
    assert data in record.lineage.inputs
    assert [step["method"] for step in record.lineage.recipe["steps"]] == ["awq", "gptq"]
    assert record.lineage.recipe["calibration"] == {"samples": 4, "sequence_length": 32}


@pytest.mark.parametrize("request_fields, code, field, words", [
    (dict(quantization=Q(method=RTN, bits=9, granularity=GROUP, group_size=32)), "INVALID_ARGUMENT",
     "quantization.bits", "[2, 8]"),
    (dict(quantization=Q(method=RTN, bits=1, granularity=GROUP, group_size=32)), "INVALID_ARGUMENT",
     "quantization.bits", "got 1"),
    (dict(quantization=Q(method=RTN, bits=4, granularity=GROUP, group_size=48)), "INVALID_ARGUMENT",
     "quantization.group_size", "do not divide"),
    (dict(quantization=Q(method=42, gguf_type="q4_0")), "INVALID_ARGUMENT", "quantization.method", "42"),
    (dict(quantization=Q(method=RTN, gguf_type="q4_k_x")), "INVALID_ARGUMENT", "quantization.type", "q4_k_x"),
    (dict(quantization=Q(method=GPTQ, gguf_type="q4_0"), calibration_dataset=""), "INVALID_ARGUMENT",
     "calibration_dataset", "calibration_dataset is required"),
    (dict(quantization=Q(method=IMATRIX, gguf_type="q4_0")), "FAILED_PRECONDITION", "calibration_stats",
     "needs calibration statistics"),
    (dict(quantization=Q(method=GPTQ, gguf_type="q4_0"), calibration_samples=4096, calibration_sequence_length=512),
     "INVALID_ARGUMENT", "calibration.dataset", "tokens"),
    (dict(quantization=Q(method=RTN, gguf_type="q4_0"), pre_steps=[Q(method=GPTQ, gguf_type="q4_0")]),
     "INVALID_ARGUMENT", "pre_steps[0].method", "only awq"),
    (dict(quantization=Q(method=GPTQ, gguf_type="q4_0", gptq=common_pb2.GptqOptions(damp_percent=3.0))),
     "INVALID_ARGUMENT", "quantization.gptq.damp_percent", "(0, 1]"),
    (dict(quantization=Q(method=RTN, gguf_type="q4_k", mixed_precision=common_pb2.MixedPrecision(
        options=["q4_k"], max_bits_per_weight=5))), "INVALID_ARGUMENT", "quantization.mixed_precision.options",
     "at least two"),
])
def test_bad_compress_requests(compressor, coordinator, request_fields, code, field, words):
    stub, model, data = compressor
    before = _stored(coordinator)
    request = compressor_pb2.CompressRequest(**{"model": model, "calibration_dataset": data, **request_fields})
    with pytest.raises(grpc.RpcError) as error:
        stub.Compress(request, timeout=300)
    assert rpc_code(error) == code, error.value.details()
    assert error_details(error.value)[1].get("field") == field
    assert words in error.value.details()
    assert _stored(coordinator) == before                                      # nothing half-made is visible
    ok = stub.Compress(compressor_pb2.CompressRequest(model=model, quantization=Q(method=RTN, gguf_type="q8_0")),
                       timeout=300)                                             # and the service still serves
    assert ok.compressed.name


def test_nan_weights_are_refused_naming_the_tensor(coordinator, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    from shared.models.decoder_config import DecoderConfig
    shapes = DecoderConfig.from_hf(config).tensor_shapes()
    rng = np.random.default_rng(1)
    arrays = {name: rng.normal(0, 0.05, shape).astype(np.float32) for name, shape in shapes.items()}
    arrays["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    write_safetensors(broken / "model.safetensors", {n: (a.shape, "F32") for n, a in arrays.items()},
                      iter(arrays.items()))
    model = coordinator.upload_model(broken)
    stub = compressor_pb2_grpc.CompressorStub(coordinator.channel)
    with pytest.raises(grpc.RpcError) as error:
        stub.ImportModel(compressor_pb2.ImportModelRequest(source=model.name), timeout=300)
    assert rpc_code(error) == "INVALID_ARGUMENT" and reason(error) == "MALFORMED_MODEL"
    assert "model.layers.1.mlp.up_proj.weight" in error.value.details() and "NaN" in error.value.details()
