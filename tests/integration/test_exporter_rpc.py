"""The Exporter RPC over real gRPC: every format's file is validated in its runtime before it is stored,
carries provenance and a fidelity record, directory exports travel as tars that Evaluate can run, and
what a format cannot do is refused before any work with the precise reason."""
from __future__ import annotations

import math

import grpc
import pytest
from status_checks import reason, rpc_code

from edgeforge.v1 import common_pb2, coordinator_pb2, exporter_pb2, exporter_pb2_grpc
from shared.models.bundle import pack


def stored(client) -> set[str]:
    response = client.artifacts.ListArtifacts(coordinator_pb2.ListArtifactsRequest(page_size=1000))
    return {a.name for a in response.artifacts}


@pytest.fixture
def uploaded(coordinator, tiny_model_dir, tmp_path):
    bundle = tmp_path / "tiny.tar"
    pack(tiny_model_dir, bundle)
    model = coordinator.upload(bundle, common_pb2.ARTIFACT_KIND_MODEL, media_type="application/x-edgeforge-model+tar")
    text = tmp_path / "eval.txt"
    text.write_text("The river that runs through Paris is called the Seine. " * 40)
    dataset = coordinator.upload(text, common_pb2.ARTIFACT_KIND_DATASET)
    return model.name, dataset.name


def test_gguf_export_carries_provenance_and_fidelity(coordinator, uploaded):
    model, _ = uploaded
    exporter = exporter_pb2_grpc.ExporterStub(coordinator.channel)
    response = exporter.Export(exporter_pb2.ExportRequest(
        model=model, format=common_pb2.EXPORT_FORMAT_GGUF, options=common_pb2.ExportOptions(float_type="f16")),
        timeout=600)
    lineage = response.exported.lineage
    assert lineage.producer == "edgeforge.v1.Exporter/Export" and list(lineage.inputs) == [model]
    assert lineage.recipe["export"]["float_type"] == "f16" and lineage.recipe["format"] == "gguf"
    assert {"gguf", "llama_cpp_python", "llama.cpp", "edgeforge"} <= set(lineage.tool_versions)
    assert "AVX" in lineage.tool_versions["llama.cpp"]                    # the llama.cpp build's features
    fidelity = dict(lineage.fidelity)
    assert fidelity["runtime"].startswith("llama.cpp@") and fidelity["top1_agreement"] >= 0.9
    assert fidelity["positions"] == response.validation.positions > 0
    assert response.exported.labels["validation_runtime"] == fidelity["runtime"]


def test_onnx_with_external_data_is_one_tar_that_evaluates(coordinator, uploaded):
    model, dataset = uploaded
    exporter = exporter_pb2_grpc.ExporterStub(coordinator.channel)
    response = exporter.Export(exporter_pb2.ExportRequest(
        model=model, format=common_pb2.EXPORT_FORMAT_ONNX, options=common_pb2.ExportOptions(external_data=True)),
        timeout=600)
    assert response.exported.media_type.endswith("+tar") and response.validation.top1_agreement > 0.99
    evaluated = exporter.Evaluate(exporter_pb2.EvaluateRequest(
        model=response.exported.name, format=common_pb2.EXPORT_FORMAT_ONNX, dataset=dataset,
        tokenizer_model=model, window_tokens=64, max_tokens=256), timeout=600)
    reference = exporter.Evaluate(exporter_pb2.EvaluateRequest(
        model=model, format=common_pb2.EXPORT_FORMAT_REFERENCE, dataset=dataset, window_tokens=64,
        max_tokens=256), timeout=600)
    assert math.isclose(evaluated.quality.value, reference.quality.value, rel_tol=1e-4)


def test_refusals_name_the_problem_and_store_nothing(coordinator, uploaded, tmp_path):
    model, _ = uploaded
    exporter = exporter_pb2_grpc.ExporterStub(coordinator.channel)
    before = stored(coordinator)
    cases = [
        (dict(format=common_pb2.EXPORT_FORMAT_ONNX, options=common_pb2.ExportOptions(int8_activations=True)),
         "FAILED_PRECONDITION", "MISSING_CALIBRATION"),
        (dict(format=common_pb2.EXPORT_FORMAT_ONNX, options=common_pb2.ExportOptions(float_type="bf16")),
         "FAILED_PRECONDITION", "UNSUPPORTED_OP"),
        (dict(format=common_pb2.EXPORT_FORMAT_ONNX, options=common_pb2.ExportOptions(float_type="f8")),
         "INVALID_ARGUMENT", None),
        (dict(format=common_pb2.EXPORT_FORMAT_ONNX, options=common_pb2.ExportOptions(onnx_weight_operator=9)),
         "INVALID_ARGUMENT", None),
        (dict(format=common_pb2.EXPORT_FORMAT_REFERENCE), "INVALID_ARGUMENT", None),
    ]
    for fields, code, why in cases:
        with pytest.raises(grpc.RpcError) as error:
            exporter.Export(exporter_pb2.ExportRequest(model=model, **fields), timeout=600)
        assert rpc_code(error) == code, (fields, error.value.details())
        if why:
            assert reason(error) == why, (fields, error.value.details())
    assert stored(coordinator) == before                                 # nothing half-written became visible
    assert not list((tmp_path / "data" / "cache" / "tmp").glob("export-*"))   # scratch cleaned up


def test_tflite_export_is_validated_in_litert(coordinator, uploaded):
    model, _ = uploaded
    exporter = exporter_pb2_grpc.ExporterStub(coordinator.channel)
    response = exporter.Export(exporter_pb2.ExportRequest(model=model, format=common_pb2.EXPORT_FORMAT_TFLITE),
                               timeout=1800)
    assert response.validation.runtime.startswith("ai-edge-litert") and response.validation.top1_agreement > 0.99
    lineage = response.exported.lineage
    assert {"litert-torch", "ai-edge-litert"} <= set(lineage.tool_versions)
    assert dict(lineage.fidelity)["max_abs_diff"] < 1e-3


def test_coreml_package_is_proven_by_reading_it_back(coordinator, uploaded):
    model, _ = uploaded
    exporter = exporter_pb2_grpc.ExporterStub(coordinator.channel)
    response = exporter.Export(exporter_pb2.ExportRequest(
        model=model, format=common_pb2.EXPORT_FORMAT_COREML, options=common_pb2.ExportOptions(float_type="f16")),
        timeout=1800)
    assert response.exported.media_type.endswith("mlpackage+tar")
    assert "read back only" in response.validation.runtime and "macOS" in response.validation.runtime
    assert response.validation.positions == 0 and response.validation.loaded
    package = dict(response.exported.lineage.fidelity)["package"]
    assert package and "coremltools" in response.exported.lineage.tool_versions
