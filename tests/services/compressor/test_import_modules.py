"""Compressor.ImportModel over real gRPC for image classifiers and text encoders: an ONNX file and a
BERT directory become module bundles, a module bundle is checked and returned unchanged, and anything
else is refused naming what is accepted — with nothing stored on a refusal."""
from __future__ import annotations

import json

import grpc
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from clients.python.client import Client
from edgeforge.v1 import common_pb2, compressor_pb2, compressor_pb2_grpc
from shared.grpc_status import error_details
from shared.models import modules
from shared.models.cnn import SmallCNN
from shared.models.encoder import minilm_dir

IMAGE, TEXT = common_pb2.MODEL_TASK_IMAGE_CLASSIFICATION, common_pb2.MODEL_TASK_TEXT_EMBEDDING
CNN_INPUT = {"image": {"channels": 1, "size": 28, "mean": [0.286], "std": [0.353]}, "names": ["images"]}


@pytest.fixture
def coordinator(tmp_path):
    from services.coordinator.server import create_server
    server, port, ctx = create_server("127.0.0.1:0", tmp_path / "data", device_wait_s=2.0, lease_ttl_s=2.0)
    client = Client(f"127.0.0.1:{port}", token=ctx.admin_token)
    client.ctx = ctx
    yield client
    client.close()
    server.stop(0).wait()


def _import(client: Client, path, task: int = common_pb2.MODEL_TASK_UNSPECIFIED):
    source = client.upload(path, common_pb2.ARTIFACT_KIND_SOURCE_MODEL)
    stub = compressor_pb2_grpc.CompressorStub(client.channel)
    return source, stub.ImportModel(compressor_pb2.ImportModelRequest(source=source.name, task=task), timeout=120)


def _refused(client: Client, path, task: int = common_pb2.MODEL_TASK_UNSPECIFIED):
    """(code, reason, field, message) of a refused import; nothing but the upload is stored."""
    source = client.upload(path, common_pb2.ARTIFACT_KIND_SOURCE_MODEL)
    before = {record.sha256 for record in client.ctx.store.list()}
    stub = compressor_pb2_grpc.CompressorStub(client.channel)
    with pytest.raises(grpc.RpcError) as error:
        stub.ImportModel(compressor_pb2.ImportModelRequest(source=source.name, task=task), timeout=120)
    assert {record.sha256 for record in client.ctx.store.list()} == before
    reason, metadata = error_details(error.value)
    return error.value.code(), reason, metadata.get("field"), error.value.details()


def _onnx(path):
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "W"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_file_becomes_a_module_bundle(coordinator, tmp_path):
    path = _onnx(tmp_path / "tiny.onnx")
    code, reason, field, details = _refused(coordinator, path)
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "task") and "task is required" in details
    source, response = _import(coordinator, path, IMAGE)
    assert (response.architecture, response.parameter_count, response.task) == ("onnx", 15, IMAGE)
    assert response.model.kind == common_pb2.ARTIFACT_KIND_MODEL and response.model.media_type == modules.MEDIA_TYPE
    record = coordinator.ctx.store.get(response.model.sha256)
    assert record.lineage.inputs == (source.name,) and record.labels["architecture"] == "onnx"
    module_dir = modules.ModuleDir(modules.unpack(coordinator.ctx.store.path(record.sha256), tmp_path / "out"))
    assert module_dir.task == "image_classification" and module_dir.source["sha256"] == source.sha256


def test_module_bundle_is_checked_and_returned_unchanged(coordinator, tmp_path):
    torch.manual_seed(0)
    module_dir = modules.write_module_dir(SmallCNN(channels=[4, 8], hidden=16), tmp_path / "cnn",
                                          architecture="small_cnn", task="image_classification",
                                          input=CNN_INPUT, source={"format": "test"})
    modules.pack(module_dir.path, tmp_path / "cnn.tar")
    source, response = _import(coordinator, tmp_path / "cnn.tar")
    assert response.model.name == source.name
    assert (response.architecture, response.task) == ("small_cnn", IMAGE)
    assert response.parameter_count == sum(p.numel() for p in SmallCNN(channels=[4, 8], hidden=16).parameters())
    code, _, field, details = _refused(coordinator, tmp_path / "cnn.tar", TEXT)
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "task") and "is a image_classification module" in details

    from safetensors.torch import save_file
    state = SmallCNN(channels=[4, 8], hidden=16).state_dict()
    save_file({**state, "head.bias": torch.full((10,), float("inf"))}, str(module_dir.path / "model.safetensors"))
    modules.pack(module_dir.path, tmp_path / "broken.tar")
    code, reason, field, details = _refused(coordinator, tmp_path / "broken.tar")
    assert (code, reason, field) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_MODEL", "source")
    assert "head.bias contains NaN or Inf" in details


def test_bert_directory_bundle_becomes_a_text_encoder(coordinator, tmp_path):
    directory = tmp_path / "tiny-bert"
    directory.mkdir()
    config = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.json").write_bytes((minilm_dir() / "tokenizer.json").read_bytes())
    from safetensors.torch import save_file

    from shared.models.encoder import BertConfig, SentenceEncoder
    model = SentenceEncoder(BertConfig.from_hf(config))
    save_file(model.state_dict(), str(directory / "model.safetensors"))
    source = coordinator.upload_model(directory)                            # what `edgeforge build` uploads
    stub = compressor_pb2_grpc.CompressorStub(coordinator.channel)
    response = stub.ImportModel(compressor_pb2.ImportModelRequest(source=source.name), timeout=120)
    assert (response.architecture, response.task) == ("bert", TEXT)
    assert response.parameter_count == sum(p.numel() for p in model.parameters())
    assert response.model.name != source.name


def test_unknown_sources_are_refused_naming_the_formats(coordinator, tmp_path, tiny_model_dir):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"certainly not a model\n" * 100)
    code, reason, field, details = _refused(coordinator, garbage, IMAGE)
    assert (code, reason, field) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_MODEL_FORMAT", "source")
    for words in ("GGUF file", "ONNX file", "ExportedProgram (.pt2)", "BERT directory", "module directory"):
        assert words in details
    decoder = coordinator.upload_model(tiny_model_dir)
    stub = compressor_pb2_grpc.CompressorStub(coordinator.channel)
    with pytest.raises(grpc.RpcError) as error:
        stub.ImportModel(compressor_pb2.ImportModelRequest(source=decoder.name, task=IMAGE), timeout=120)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "is a causal LM" in error.value.details()
    response = stub.ImportModel(compressor_pb2.ImportModelRequest(source=decoder.name), timeout=120)
    assert (response.architecture, response.task) == ("llama", common_pb2.MODEL_TASK_CAUSAL_LM)
