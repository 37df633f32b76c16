"""Pipeline candidates (prune → distill → quantize, QAT) through a real coordinator, compressor,
exporter and agent, for a causal LM (tiny random llama) and an image classifier (a SmallCNN trained on
real Fashion-MNIST): the transformed model is what gets compressed, exported, evaluated and measured,
and every step's size and quality reaches the report."""
from __future__ import annotations

import json

import pytest
from test_builds import run_build, tiny_spec

from clients.python import spec as spec_file
from edgeforge.v1 import coordinator_pb2

BENCH = {"warmup_runs": 1, "timed_runs": 2, "min_duration_ms": 0, "cooldown_ms": 0}


def test_lm_pipelines_sparse_and_structured(coordinator, agent, tiny_model_dir, assets):
    candidates = [
        {"format": "gguf", "steps": [{"prune": {"method": "sparsegpt", "n": 2, "m": 4}},
                                     {"quantize": {"type": "q8_0"}}]},
        {"format": "gguf", "steps": [{"prune": {"method": "structured", "sparsity": 0.25}},
                                     {"distill": {"temperature": 2, "training": {"steps": 2, "batch_size": 2}}},
                                     {"quantize": {"type": "q8_0"}}]},
        {"format": "gguf", "quantization": {"type": "q8_0"}},
    ]
    operation, build = run_build(coordinator, tiny_spec(tiny_model_dir, assets, candidates=candidates), 600)
    assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED, build.error
    sparse, structured, plain = build.candidates
    assert [c.id for c in build.candidates] == ["gguf-sparsegpt2of4-q8_0", "gguf-structured-neurons25-distill-q8_0",
                                                "gguf-q8_0"]
    for candidate in (sparse, structured):
        assert not candidate.HasField("error"), candidate.error
        assert candidate.transformed_model and candidate.transformed_model != build.reference_model
        assert [s.kind for s in candidate.steps][0] == "source" and candidate.steps[-1].kind == "export"
        assert candidate.steps[-1].stored_bytes == candidate.size_bytes
        assert candidate.quality.metric == "perplexity" and candidate.quality.baseline == build.baseline.value
    assert [s.kind for s in structured.steps] == ["source", "prune", "distill", "quantize", "export"]
    assert abs(sparse.steps[1].sparsity - 0.5) < 1e-6
    assert "saves nothing" in sparse.steps[-1].note                  # GGUF stores the zeros densely
    assert abs(sparse.size_bytes - plain.size_bytes) < 0.01 * plain.size_bytes
    assert structured.size_bytes < plain.size_bytes                  # a genuinely smaller model
    report = json.loads(coordinator.read_text(build.report_json_artifact))
    assert {p["id"] for p in report["pipelines"]} == {sparse.id, structured.id}
    html = coordinator.read_text(build.report_html_artifact)
    assert "Pipelines, step by step" in html and "structured neurons 25%" in html
    _, again = run_build(coordinator, tiny_spec(tiny_model_dir, assets, candidates=candidates), 600)
    assert [c.transformed_model for c in again.candidates] == [c.transformed_model for c in build.candidates]


def cnn_spec(small_cnn, candidates, **overrides) -> spec_file.SpecFile:
    directory, files = small_cnn
    raw = {"name": "cnn", "model": {"path": str(directory), "task": "image-classification"},
           "calibration": {"file": str(files["calibration"]), "samples": 128},
           "training": {"file": str(files["training"])}, "evaluation": {"file": str(files["evaluation"])},
           "targets": [{"selector": {"device": "test-host"}}], "candidates": candidates, "benchmark": BENCH}
    raw.update(overrides)
    return spec_file.parse(raw, directory.parent)


def test_image_classifier_build(coordinator, agent, small_cnn):
    candidates = [
        {"format": "onnx", "quantization": {"method": "none"}},
        {"format": "tflite", "quantization": {"bits": 8, "granularity": "per_channel"}},
        {"format": "onnx", "steps": [{"prune": {"method": "structured", "sparsity": 0.5}},
                                     {"distill": {"training": {"steps": 30}}},
                                     {"quantize": {"bits": 8, "granularity": "per_channel"}}]},
        {"format": "onnx", "steps": [{"qat": {"quantization": {"bits": 4, "granularity": "per_channel"},
                                              "training": {"steps": 20}}}]},
    ]
    _, build = run_build(coordinator, cnn_spec(small_cnn, candidates), 600)
    assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED, build.error
    assert build.baseline.metric == "top1_accuracy" and build.baseline.value > 0.6
    for candidate in build.candidates:
        assert not candidate.HasField("error"), (candidate.id, candidate.error)
        assert candidate.quality.metric == "top1_accuracy" and candidate.quality.higher_is_better
        assert candidate.validation.loaded and candidate.validation.positions > 0
    float_onnx, tflite, structured, qat = build.candidates
    assert abs(float_onnx.quality.delta_pct) < 1e-6                  # the float export is the float model
    assert structured.size_bytes < 0.5 * float_onnx.size_bytes
    assert [s.kind for s in structured.steps] == ["source", "prune", "distill", "export"]
    assert qat.id == "onnx-qat-int4-per_channel-sym" and qat.steps[1].kind == "qat"
    (device,) = build.devices
    assert all(c.measurement.latency.p50_ms > 0 for c in device.candidates)
    assert device.chosen_candidate


@pytest.mark.parametrize("candidates, field", [
    ([{"format": "gguf", "quantization": {"method": "none"}}], "candidates[0].format"),
    ([{"format": "onnx", "steps": [{"prune": {"method": "wanda", "sparsity": 0.5}}]}], "calibration.dataset"),
])
def test_image_classifier_spec_errors(coordinator, small_cnn, candidates, field):
    import grpc
    spec = cnn_spec(small_cnn, candidates)
    spec.calibration_path = spec.training_path = None
    with pytest.raises(grpc.RpcError) as caught:
        coordinator.create_build(spec)
    from shared.grpc_status import error_details
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value)[1].get("field") == field, caught.value.details()


def test_text_encoder_build_on_minilm(coordinator, agent, assets):
    """The real all-MiniLM-L6-v2 directory, as a user uploads it: INT8 keeps cosine similarity ≥ 0.99."""
    from shared.models.encoder import minilm_dir
    raw = {"name": "minilm", "model": {"path": str(minilm_dir()), "task": "text-embedding"},
           "calibration": {"file": str(assets / "sentences-calibration.json"), "samples": 32},
           "evaluation": {"file": str(assets / "sentences-evaluation.json"), "max_samples": 64},
           "targets": [{"selector": {"device": "test-host"}}], "constraints": {"max_quality_loss_pct": 1},
           "objective": "smallest", "benchmark": BENCH,
           "candidates": [{"format": "onnx", "quantization": {"bits": 8, "granularity": "per_channel"}},
                          {"format": "onnx", "quantization": {"bits": 4, "granularity": "per_tensor"}}]}
    _, build = run_build(coordinator, spec_file.parse(raw, assets), 900)
    assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED, build.error
    assert build.baseline.metric == "cosine_similarity" and abs(build.baseline.value - 1) < 1e-4
    int8, int4 = build.candidates
    assert not int8.HasField("error") and not int4.HasField("error"), (int8.error, int4.error)
    assert int8.quality.value >= 0.99 and int8.quality.delta_pct <= 1
    assert "wordsim_spearman" in int8.quality.metrics
    assert int4.quality.value < 0.99 and int4.size_bytes < int8.size_bytes
    (device,) = build.devices
    assert device.chosen_candidate == int8.id                          # int4 per tensor loses more than 1 %
