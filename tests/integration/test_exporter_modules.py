"""The Exporter RPC on module bundles (image classifiers, text encoders) over real gRPC: an ONNX file on an
int8 weight grid is validated before it is stored and evaluates like the torch reference on real
Fashion-MNIST images; an encoder is scored against its float model with word similarity; what a module
cannot be exported or evaluated as is refused with the precise code and reason, storing nothing, and the
service keeps serving. A tiny SmallCNN and BERT with random weights: machinery only, never quality claims."""
from __future__ import annotations

import json
import math

import grpc
import pytest
import torch
from status_checks import reason, rpc_code

from edgeforge.v1 import common_pb2, coordinator_pb2, exporter_pb2, exporter_pb2_grpc
from shared.models.cnn import SmallCNN, load_fashion_mnist
from shared.models.encoder import BertConfig, SentenceEncoder, minilm_dir
from shared.models.module_data import save_images, save_sentences, wordsim353
from shared.models.modules import write_module_dir

INT8 = common_pb2.QuantizationConfig(method=common_pb2.QUANT_METHOD_RTN, bits=8,
                                     granularity=common_pb2.GRANULARITY_PER_CHANNEL)


def stored(client) -> set[str]:
    response = client.artifacts.ListArtifacts(coordinator_pb2.ListArtifactsRequest(page_size=1000))
    return {a.name for a in response.artifacts}


@pytest.fixture
def cnn(coordinator, tmp_path):
    """(module bundle, labelled dataset): a random SmallCNN and the first 64 Fashion-MNIST test images."""
    torch.manual_seed(0)
    model = SmallCNN(channels=(8, 16), hidden=32).eval()
    directory = write_module_dir(model, tmp_path / "cnn", architecture="small_cnn", task="image_classification",
                                 source={"test": "random weights"},
                                 input={"image": {"channels": 1, "size": 28, "mean": [0.286], "std": [0.353]},
                                        "names": ["images"]})
    images, labels = load_fashion_mnist("test")
    save_images(tmp_path / "fashion.npz", images[:64], labels[:64])
    return coordinator.upload_model(directory.path).name, coordinator.upload_dataset(tmp_path / "fashion.npz").name


def test_onnx_int8_is_validated_stored_and_evaluates_like_the_reference(coordinator, cnn):
    model, dataset = cnn
    exporter = exporter_pb2_grpc.ExporterStub(coordinator.channel)
    response = exporter.Export(exporter_pb2.ExportRequest(model=model, format=common_pb2.EXPORT_FORMAT_ONNX,
                                                          quantization=INT8), timeout=600)
    validation = response.validation
    assert validation.runtime.startswith("onnxruntime@") and validation.positions == 8   # the 8 photos
    assert validation.top1_agreement == 1.0 and validation.loaded
    exported = response.exported
    assert exported.labels["task"] == "image_classification" and exported.labels["weights"] == "int8/per_channel/sym"
    recipe, fidelity = exported.lineage.recipe, dict(exported.lineage.fidelity)
    assert recipe["method"] == "rtn" and recipe["grid"] == "int8/per_channel/sym" and recipe["format"] == "onnx"
    assert "int8/per_channel" in fidelity["reference"] and "photos" in fidelity["inputs"]
    assert list(exported.lineage.inputs) == [model]

    def evaluate(name, export_format):
        return exporter.Evaluate(exporter_pb2.EvaluateRequest(model=name, format=export_format, dataset=dataset,
                                                              tokenizer_model=model, max_samples=48), timeout=600)
    onnx, reference = evaluate(exported.name, common_pb2.EXPORT_FORMAT_ONNX), \
        evaluate(model, common_pb2.EXPORT_FORMAT_REFERENCE)
    for result in (onnx, reference):
        quality = result.quality
        assert quality.metric == "top1_accuracy" and quality.higher_is_better and quality.tokens == 48
        assert set(quality.metrics) >= {"top1_agreement", "top5_accuracy", "samples"}
    assert reference.runtime.startswith("torch@") and reference.quality.metrics["top1_agreement"] == 1.0
    assert onnx.runtime.startswith("onnxruntime@") and onnx.quality.metrics["top1_agreement"] >= 0.9
    assert math.isclose(onnx.quality.value, reference.quality.value, abs_tol=0.1)


def test_an_encoder_is_scored_against_its_float_model(coordinator, tmp_path):
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **config.__dict__}))
    torch.manual_seed(0)
    directory = write_module_dir(SentenceEncoder(config).eval(), tmp_path / "bert", architecture="bert",
                                 task="text_embedding", source={"test": "random weights"},
                                 input={"text": {"max_tokens": 16}, "names": ["input_ids", "attention_mask"]},
                                 files={"config.json": tmp_path / "config.json",
                                        "tokenizer.json": minilm_dir() / "tokenizer.json"})
    save_sentences(tmp_path / "text.json", ["The cat slept on the warm windowsill.", "Revenue grew by twelve percent."],
                   wordsim353()[:20])
    model = coordinator.upload_model(directory.path).name
    dataset = coordinator.upload_dataset(tmp_path / "text.json").name
    exporter = exporter_pb2_grpc.ExporterStub(coordinator.channel)
    quality = exporter.Evaluate(exporter_pb2.EvaluateRequest(model=model, format=common_pb2.EXPORT_FORMAT_REFERENCE,
                                                             dataset=dataset), timeout=600).quality
    assert quality.metric == "cosine_similarity" and math.isclose(quality.value, 1.0, abs_tol=1e-6)
    assert quality.tokens == 2 and quality.metrics["word_pairs"] == 20
    assert -1 <= quality.metrics["wordsim_spearman"] <= 1


def test_refusals_name_the_problem_store_nothing_and_the_service_keeps_serving(coordinator, cnn, tmp_path):
    model, dataset = cnn
    exporter = exporter_pb2_grpc.ExporterStub(coordinator.channel)
    before = stored(coordinator)
    per_group = common_pb2.QuantizationConfig(method=common_pb2.QUANT_METHOD_RTN, bits=4,
                                              granularity=common_pb2.GRANULARITY_PER_GROUP, group_size=32)
    gptq = common_pb2.QuantizationConfig(method=common_pb2.QUANT_METHOD_GPTQ, bits=4,
                                         granularity=common_pb2.GRANULARITY_PER_CHANNEL)
    cases = [
        (dict(format=common_pb2.EXPORT_FORMAT_GGUF), "FAILED_PRECONDITION", "UNSUPPORTED_ARCH"),
        (dict(format=common_pb2.EXPORT_FORMAT_ONNX, quantization=per_group), "FAILED_PRECONDITION", "UNSUPPORTED_OP"),
        (dict(format=common_pb2.EXPORT_FORMAT_ONNX, quantization=gptq), "FAILED_PRECONDITION", "UNSUPPORTED_OP"),
        (dict(format=common_pb2.EXPORT_FORMAT_TFLITE, quantization=per_group), "FAILED_PRECONDITION",
         "UNSUPPORTED_OP"),
        (dict(format=common_pb2.EXPORT_FORMAT_ONNX, options=common_pb2.ExportOptions(int8_activations=True)),
         "FAILED_PRECONDITION", "UNSUPPORTED_OP"),
        (dict(format=common_pb2.EXPORT_FORMAT_ONNX, quantization=common_pb2.QuantizationConfig(
            method=common_pb2.QUANT_METHOD_RTN, bits=9, granularity=common_pb2.GRANULARITY_PER_CHANNEL)),
         "INVALID_ARGUMENT", None),
        (dict(format=common_pb2.EXPORT_FORMAT_ONNX, compressed=model), "INVALID_ARGUMENT", None),
        (dict(format=common_pb2.EXPORT_FORMAT_REFERENCE), "INVALID_ARGUMENT", None),
    ]
    for fields, code, why in cases:
        with pytest.raises(grpc.RpcError) as error:
            exporter.Export(exporter_pb2.ExportRequest(model=model, **fields), timeout=600)
        assert rpc_code(error) == code, (fields, error.value.details())
        if why:
            assert reason(error) == why, (fields, error.value.details())
    with pytest.raises(grpc.RpcError) as error:                              # Core ML runs on macOS only
        exporter.Evaluate(exporter_pb2.EvaluateRequest(model=model, format=common_pb2.EXPORT_FORMAT_COREML,
                                                       dataset=dataset, tokenizer_model=model), timeout=600)
    assert rpc_code(error) == "FAILED_PRECONDITION" and "macOS" in error.value.details()
    assert stored(coordinator) == before                                  # nothing half-written became visible
    assert not list((tmp_path / "data" / "cache" / "tmp").glob("export-*"))
    quality = exporter.Evaluate(exporter_pb2.EvaluateRequest(model=model, format=common_pb2.EXPORT_FORMAT_REFERENCE,
                                                             dataset=dataset), timeout=600).quality
    assert quality.metric == "top1_accuracy" and quality.tokens == 64    # still serving
