"""Module bundles (image classifiers, text encoders) through services/exporter/modules.py: every format's
file agrees in its own runtime with the torch module computing with the file's weights, a grid puts the
compressor's RTN values in the file, Core ML is proven by reading the package back, ONNX-architecture
bundles keep their own graph, and what a format cannot do is refused before any export.
Tiny random models (synthetic weights: machinery only, never quality claims); real inputs."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from services.compressor.quant.rtn import quantize
from services.exporter import modules as module_export
from services.exporter.base import ExportFormat, ExportOptions
from shared.errors import FailedPrecondition, InvalidArgument
from shared.models.cnn import SmallCNN
from shared.models.encoder import BertConfig, SentenceEncoder, minilm_dir
from shared.models.module_quality import runner
from shared.models.module_import import import_source
from shared.models.modules import ModuleDir, write_module_dir
from shared.quant.grids import Granularity, Grid, Method, QuantizationConfig

F32 = ExportOptions()
INT8 = Grid(8, Granularity.PER_CHANNEL)
INT4_G32 = Grid(4, Granularity.PER_GROUP, 32)
TINY_BERT = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=32)


def seeded(module: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim > 1:
                nn.init.normal_(parameter, 0, 0.1)
    return module.eval()


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory) -> ModuleDir:
    """A 1-channel 28×28 SmallCNN (Fashion-MNIST's shape): the validation photos become grey."""
    model = seeded(SmallCNN(channels=(8, 16), hidden=32, classes=10), 0)
    return write_module_dir(model, tmp_path_factory.mktemp("cnn") / "module", architecture="small_cnn",
                            task="image_classification", source={"test": "random weights"},
                            input={"image": {"channels": 1, "size": 28, "mean": [0.286], "std": [0.353]},
                                   "names": ["images"]})


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> ModuleDir:
    """A 2-layer BERT with MiniLM's WordPiece tokenizer and random weights."""
    staging = tmp_path_factory.mktemp("bert-files")
    config = {"model_type": "bert", "hidden_act": "gelu", **TINY_BERT.__dict__}
    (staging / "config.json").write_text(json.dumps(config))
    model = seeded(SentenceEncoder(TINY_BERT), 1)
    return write_module_dir(model, tmp_path_factory.mktemp("bert") / "module", architecture="bert",
                            task="text_embedding", source={"test": "random weights"},
                            input={"text": {"max_tokens": 16}, "names": ["input_ids", "attention_mask"]},
                            files={"config.json": staging / "config.json",
                                   "tokenizer.json": minilm_dir() / "tokenizer.json"})


@pytest.fixture(scope="module")
def onnx_dir(bert_dir, tmp_path_factory) -> ModuleDir:
    """The tiny BERT as an ONNX-architecture bundle: its graph (opset 17, TorchScript) and tokenizer."""
    loaded = bert_dir.load()
    path = tmp_path_factory.mktemp("graph") / "encoder.onnx"
    torch.onnx.export(loaded.module, loaded.example_inputs, str(path), dynamo=False, opset_version=17,
                      input_names=loaded.input_names, output_names=loaded.output_names,
                      dynamic_axes=loaded.dynamic_axes)
    return write_module_dir(onnx.load(str(path)), tmp_path_factory.mktemp("onnx") / "module", architecture="onnx",
                            task="text_embedding", source={"test": "tiny bert graph"}, input=bert_dir.input,
                            files={"tokenizer.json": bert_dir.path / "tokenizer.json"})


def test_validation_inputs_are_real_photos_resized_and_grey(cnn_dir):
    samples, described = module_export.validation_samples(cnn_dir)
    assert samples.images.shape == (8, 28, 28, 3) and samples.images.dtype == np.uint8
    assert "chelsea" in described and samples.images.std() > 20                 # photos, not a constant
    pixels = cnn_dir.prepare(samples)["images"]
    assert pixels.shape == (8, 1, 28, 28) and pixels.dtype == np.float32


@pytest.fixture(scope="module")
def cnn_int8(cnn_dir, tmp_path_factory):
    return module_export.export(cnn_dir, ExportFormat.ONNX, F32, INT8, tmp_path_factory.mktemp("x") / "cnn.onnx")


def test_cnn_onnx_agrees_with_the_torch_module_at_its_weights(cnn_int8):
    result = cnn_int8.validation
    assert result.runtime.startswith("onnxruntime@") and result.positions == 8
    # The agreement is the logits' (within 5e-3). Top-1 may flip on one photo: with random weights two classes'
    # logits can lie closer than that, and which wins then depends on the runtimes' summation order (threads):
    # under Bazel's OMP_NUM_THREADS=1 one of 8 flipped at a max difference of 0.0017.
    assert result.max_abs_diff < 5e-3 and result.top1_agreement >= 7 / 8
    assert cnn_int8.exported.provenance["weights_quantized"] == 4                  # 2 convs + 2 linears
    assert "int8/per_channel" in cnn_int8.reference and "photos" in cnn_int8.inputs


def test_the_grid_puts_the_compressors_rtn_codes_in_the_file(cnn_dir, cnn_int8):
    """The int8 file's head weight, decoded from its DequantizeLinear, equals RTN of the float weight."""
    float_weight = cnn_dir.load().module.head.weight.detach().numpy()                # (10, 32)
    expected = quantize(float_weight, INT8).dequantize()
    decoded = module_export.dequantized_graph(cnn_int8.exported.path)
    weights = [onnx.numpy_helper.to_array(t) for t in decoded.graph.initializer if tuple(t.dims) == (32, 10)]
    assert len(weights) == 1 and np.array_equal(weights[0].T, expected)


def test_bert_int8_tflite_is_validated_in_litert(bert_dir, tmp_path):
    done = module_export.export(bert_dir, ExportFormat.TFLITE, F32, INT8, tmp_path / "bert.tflite")
    assert done.validation.runtime.startswith("ai-edge-litert@") and done.validation.top1_agreement == 1.0
    assert done.exported.labels["variant"].startswith("int8")
    assert done.exported.provenance["tflite"]["carried_weights"] == 12
    assert done.exported.provenance["tflite"]["input_shapes"] == {"args_0": [1, 16], "args_1": [1, 16]}


def test_bert_coreml_is_read_back_only(bert_dir, tmp_path):
    done = module_export.export(bert_dir, ExportFormat.COREML, F32, INT8, tmp_path / "bert.mlpackage")
    result = done.validation
    assert "read back only" in result.runtime and "macOS" in result.runtime
    assert result.positions == 0 and math.isnan(result.max_abs_diff) and result.loaded
    assert done.package["carried"]["equal"] and done.package["storage"]             # our codes, as stored


@pytest.mark.parametrize("grid", [None, INT8, INT4_G32], ids=["f32", "int8", "int4-g32"])
def test_onnx_bundle_keeps_its_graph_and_takes_a_grid(onnx_dir, tmp_path, grid):
    done = module_export.export(onnx_dir, ExportFormat.ONNX, F32, grid, tmp_path / "graph.onnx")
    result = done.validation
    assert result.positions == 6 and result.top1_agreement == 1.0            # every sentence's cosine ≥ 0.99
    # onnxruntime's default fuses DequantizeLinear → MatMul into kernels that quantize activations to int8
    assert result.max_abs_diff < (1e-5 if grid is None else 5e-3)
    assert done.exported.provenance["exporter"].startswith("source ONNX graph") and "source ONNX" in done.reference
    model = onnx.load(str(done.exported.path))
    assert model.opset_import[0].version == 21
    codes = [t for t in model.graph.initializer if t.name.endswith(".codes")]
    assert len(codes) == (12 if grid else 0) and done.exported.labels["weights"] == (grid.name if grid else "f32")
    if grid is INT4_G32:
        assert {t.data_type for t in codes} == {onnx.TensorProto.INT4}
        source = runner("onnx", onnx_dir.path / "model.onnx", onnx_dir)
        exported = runner("onnx", done.exported.path, onnx_dir)
        samples, _ = module_export.validation_samples(onnx_dir)
        inputs = onnx_dir.prepare(samples)
        assert not np.allclose(source(inputs), exported(inputs), atol=1e-4)    # the grid changed the weights


@pytest.mark.parametrize("module, export_format, options, grid, reason, words", [
    ("onnx", ExportFormat.TFLITE, F32, None, "UNSUPPORTED_OP", "no torch module"),
    ("onnx", ExportFormat.COREML, F32, None, "UNSUPPORTED_OP", "no torch module"),
    ("cnn", ExportFormat.GGUF, F32, None, "UNSUPPORTED_ARCH", "small_cnn"),
    ("cnn", ExportFormat.ONNX, ExportOptions(int8_activations=True), None, "UNSUPPORTED_OP", "int8 activations"),
    ("cnn", ExportFormat.ONNX, F32, Grid(8, Granularity.PER_GROUP, 32, gguf_type="q8_0"), "UNSUPPORTED_OP", "q8_0"),
    ("cnn", ExportFormat.TFLITE, F32, INT4_G32, "UNSUPPORTED_OP", "per-group"),
    ("cnn", ExportFormat.TFLITE, F32, Grid(8, Granularity.PER_CHANNEL, symmetric=False), "UNSUPPORTED_OP",
     "asymmetric"),
    ("cnn", ExportFormat.COREML, F32, Grid(3, Granularity.PER_CHANNEL), "UNSUPPORTED_OP", "3-bit"),
    ("cnn", ExportFormat.ONNX, F32, INT4_G32, "UNSUPPORTED_OP", "per-group grid on Conv"),
])
def test_refusals_come_before_any_export(cnn_dir, onnx_dir, tmp_path, module, export_format, options, grid,
                                         reason, words):
    module_dir = cnn_dir if module == "cnn" else onnx_dir
    with pytest.raises(FailedPrecondition) as error:
        module_export.export(module_dir, export_format, options, grid, tmp_path / "out")
    assert error.value.reason == reason and words in error.value.message, error.value.message
    assert not (tmp_path / "out").exists()


def test_a_group_that_does_not_divide_a_layer_is_refused(bert_dir, tmp_path):
    with pytest.raises(InvalidArgument, match="group_size 48"):
        module_export.export(bert_dir, ExportFormat.ONNX, F32, Grid(4, Granularity.PER_GROUP, 48), tmp_path / "x")


@pytest.mark.parametrize("config, error, words", [
    (QuantizationConfig(Method.GPTQ, bits=4, granularity=Granularity.PER_CHANNEL), FailedPrecondition, "gptq"),
    (QuantizationConfig(Method.NONE, gguf_type="f16"), InvalidArgument, "options.float_type"),
])
def test_weight_grid_takes_round_to_nearest_only(config, error, words):
    with pytest.raises(error, match=words):
        module_export.weight_grid(config)
    assert module_export.weight_grid(None) is None
    assert module_export.weight_grid(QuantizationConfig(Method.RTN, bits=8, granularity=Granularity.PER_CHANNEL)) \
        == INT8


def test_an_exported_program_exports_with_its_weights_found_in_its_graph(tmp_path):
    """A .pt2's module has no nn.Linear children and refuses .eval(): its weights are read off the graph."""
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(seeded(SmallCNN(channels=(4,), hidden=8), 2), (torch.zeros(2, 1, 28, 28),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "cnn.pt2")
    module_dir = import_source(tmp_path / "cnn.pt2", tmp_path / "module", "image_classification")
    assert module_export.weight_names(module_dir.load().module) == ["convs.0.weight", "fc.weight", "head.weight"]
    done = module_export.export(module_dir, ExportFormat.ONNX, F32, INT8, tmp_path / "cnn.onnx")
    assert done.exported.provenance["weights_quantized"] == 3 and done.validation.top1_agreement == 1.0


def test_a_wrong_output_fails_validation():
    expected = np.eye(4, dtype=np.float32)
    assert module_export.compare("image_classification", expected, expected, "x").top1_agreement == 1.0
    flipped = module_export.compare("image_classification", expected[::-1].copy(), expected, "x")
    assert flipped.top1_agreement == 0.0 and not flipped.passed
    with pytest.raises(FailedPrecondition, match="NaN"):
        module_export.compare("text_embedding", expected * np.nan, expected, "x")
    with pytest.raises(FailedPrecondition, match="shape"):
        module_export.compare("text_embedding", expected[:2], expected, "x")
