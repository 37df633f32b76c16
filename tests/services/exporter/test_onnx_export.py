"""The hand-built ONNX llama graph: equals the torch reference on the same (dequantized) weights,
decodes step by step through its KV cache exactly as a full forward, and carries our codes unchanged."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from services.compressor.compress import compress
from services.exporter.base import ExportInput
from services.exporter.formats.onnx import OnnxExporter
from shared.models.bundle import ModelDir
from shared.models.llama import build_reference
from shared.quant.compressed import CompressedModel
from shared.quant.grids import Granularity, Method, QuantizationConfig

SHA = "0" * 64
TOKENS = [1, 504, 3458, 282, 4649, 314, 7042, 28, 284, 260, 5765, 338, 6656, 2099, 281, 357]


def session(path, optimize: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:          # ORT's QDQ fusions may compute with int8 activations; this checks the weights
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, tokens, pasts=None):
    feeds = {"input_ids": np.array([tokens], dtype=np.int64)}
    for past in (i for i in sess.get_inputs() if i.name.startswith("past_key_values.")):
        feeds[past.name] = pasts[past.name] if pasts else np.zeros((1, past.shape[1], 0, past.shape[3]), np.float32)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(names, feeds)))
    return out["logits"][0], {k.replace("present.", "past_key_values."): v for k, v in out.items() if k != "logits"}


def reference_logits(model: ModelDir, compressed: CompressedModel | None, tokens):
    read = (lambda n: torch.from_numpy(np.ascontiguousarray(compressed.dequantized(n)))) if compressed else model.tensor
    with torch.inference_mode():
        return build_reference(model.config, read)(torch.tensor([tokens]))[0].numpy()


RECIPES = {
    "f32": None,
    "int8-per_channel": QuantizationConfig(Method.RTN, bits=8, granularity=Granularity.PER_CHANNEL),
    "int8-per_tensor-asym": QuantizationConfig(Method.RTN, bits=8, granularity=Granularity.PER_TENSOR, symmetric=False),
    "int4-g32": QuantizationConfig(Method.RTN, bits=4, granularity=Granularity.PER_GROUP, group_size=32),
    "int4-g64-asym": QuantizationConfig(Method.RTN, bits=4, granularity=Granularity.PER_GROUP, group_size=64,
                                        symmetric=False),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_onnx_equals_reference_on_our_weights(tiny_model_dir, tmp_path, name):
    model = ModelDir(tiny_model_dir)
    compressed = None
    if RECIPES[name] is not None:
        compress(model, SHA, RECIPES[name], tmp_path / "c.safetensors")
        compressed = CompressedModel(tmp_path / "c.safetensors")
    OnnxExporter().export(ExportInput(model, SHA, compressed), tmp_path / "m.onnx")
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    logits, _ = run(session(tmp_path / "m.onnx", optimize=False), TOKENS)
    assert np.abs(logits - reference_logits(model, compressed, TOKENS)).max() < 1e-4


def test_int8_initializers_are_our_codes(tiny_model_dir, tmp_path):
    model = ModelDir(tiny_model_dir)
    compress(model, SHA, RECIPES["int8-per_channel"], tmp_path / "c.safetensors")
    compressed = CompressedModel(tmp_path / "c.safetensors")
    OnnxExporter().export(ExportInput(model, SHA, compressed), tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    name = "model.layers.1.mlp.down_proj.weight"
    ours = compressed.read(name)
    assert np.array_equal(initializers[name + ".codes"], (ours.codes.astype(np.int16) - 128).astype(np.int8).T)
    assert np.array_equal(initializers[name + ".scales"], ours.scales[:, 0].astype(np.float32))
    assert {n.op_type for n in graph.node} >= {"DequantizeLinear", "MatMul", "Softmax", "Gemm"}


def test_kv_cache_decoding_matches_a_full_forward(tiny_model_dir, tmp_path):
    model = ModelDir(tiny_model_dir)
    OnnxExporter().export(ExportInput(model, SHA), tmp_path / "m.onnx")
    sess = session(tmp_path / "m.onnx", optimize=True)
    full, _ = run(sess, TOKENS)
    logits, pasts = run(sess, TOKENS[:10])                       # prompt
    steps = [logits[-1]]
    for token in TOKENS[10:]:                                    # then one token at a time through the cache
        logits, pasts = run(sess, [token], pasts)
        steps.append(logits[-1])
    assert pasts["past_key_values.0.key"].shape == (1, 1, len(TOKENS), 32)
    assert np.abs(np.stack(steps[:-1]) - full[9:-1]).max() < 1e-4
