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


def test_float16_stores_half_the_bytes_and_computes_in_float32(tiny_model_dir, tmp_path):
    """f16: weights stored float16 and Cast to float32, so the graph computes the float32 model on
    float16-rounded weights exactly; KV cache and logits stay float32 (onnx.py says why)."""
    from services.exporter.base import ExportOptions
    model = ModelDir(tiny_model_dir)
    source = ExportInput(model, SHA, options=ExportOptions(float_type="f16"))
    exported = OnnxExporter().export(source, tmp_path / "m.onnx")
    found = OnnxExporter().read_back(exported, source)
    assert found["initializer_bytes"]["float16"] > 3_000_000 and found["initializer_bytes"].get("float", 0) < 300_000
    assert exported.provenance["kv_cache_dtype"] == "float32" and exported.provenance["float_storage"] == "float16"
    rounded = lambda n: torch.from_numpy(model.array(n).astype(np.float16).astype(np.float32))   # noqa: E731
    with torch.inference_mode():
        expected = build_reference(model.config, rounded)(torch.tensor([TOKENS]))[0].numpy()
    logits, pasts = run(session(tmp_path / "m.onnx", optimize=True), TOKENS)
    assert np.abs(logits - expected).max() < 1e-4
    assert pasts["past_key_values.0.key"].dtype == np.float32


def test_float16_compute_graph_runs_with_a_float16_cache(tiny_model_dir, tmp_path):
    """The float16-compute variant measured against float16 storage (onnx.py) still builds and runs."""
    from services.exporter.formats.onnx_builder import GraphBuilder
    from services.exporter.formats.onnx_graph import build_decoder
    from services.exporter.formats.onnx_weights import Linears, Precision
    model = ModelDir(tiny_model_dir)
    g = GraphBuilder()
    onnx.save_model(build_decoder(model.config, model.array, g, Linears(g, Precision(np.float16, np.float16))),
                    str(tmp_path / "m.onnx"))
    from services.exporter.runtimes import OnnxRuntime
    runtime = OnnxRuntime(tmp_path / "m.onnx", 1)
    logits, cache = runtime.step(TOKENS)
    assert logits.dtype == np.float32 and cache["past_key_values.1.value"].dtype == np.float16
    expected = reference_logits(model, None, TOKENS)
    assert np.abs(logits - expected).max() < 0.02


def test_provenance_names_versions_and_options(tiny_model_dir, tmp_path):
    from services.exporter.base import ExportOptions
    options = ExportOptions(float_type="f16")
    exported = OnnxExporter().export(ExportInput(ModelDir(tiny_model_dir), SHA, options=options), tmp_path / "m.onnx")
    assert exported.provenance["tools"]["onnxruntime"] == ort.__version__
    assert exported.provenance["tools"]["onnx"] == onnx.__version__
    assert exported.provenance["options"] == options.to_dict()
    assert exported.labels["float_type"] == "f16" and exported.labels["external_data"] == "false"


def test_what_onnx_cannot_express_fails_before_any_work(tiny_model_dir, tmp_path):
    import types

    from services.exporter.base import ExportOptions
    from shared.errors import FailedPrecondition
    model = ModelDir(tiny_model_dir)
    with pytest.raises(FailedPrecondition) as error:
        OnnxExporter().export(ExportInput(model, SHA, options=ExportOptions(float_type="bf16")), tmp_path / "a.onnx")
    assert error.value.reason == "UNSUPPORTED_OP" and "bf16" in error.value.message
    mamba = types.SimpleNamespace(config=types.SimpleNamespace(architecture="mamba"))   # no graph for it
    with pytest.raises(FailedPrecondition) as error:
        OnnxExporter().export(ExportInput(mamba, SHA), tmp_path / "b.onnx")
    assert error.value.reason == "UNSUPPORTED_ARCH" and "'mamba'" in error.value.message
    assert not list(tmp_path.iterdir())


def test_fused_int8_weights_compute_exactly_ours_at_accuracy_level_0(tiny_model_dir, tmp_path):
    """onnxruntime 1.32 fuses DequantizeLinear → MatMul into MatMulNBits over our codes; at
    accuracy level 0 that is our computation exactly, at its default (4) activations become int8."""
    from services.exporter.runtimes import OnnxRuntime
    model = ModelDir(tiny_model_dir)
    compress(model, SHA, RECIPES["int8-per_channel"], tmp_path / "c.safetensors")
    compressed = CompressedModel(tmp_path / "c.safetensors")
    OnnxExporter().export(ExportInput(model, SHA, compressed), tmp_path / "m.onnx")
    expected = reference_logits(model, compressed, TOKENS)
    exact = OnnxRuntime(tmp_path / "m.onnx", 1, {"session.qdq_matmulnbits_accuracy_level": "0"}).logits(TOKENS)
    assert np.abs(exact - expected).max() < 1e-4
    default = OnnxRuntime(tmp_path / "m.onnx", 1).logits(TOKENS)
    assert (default.argmax(-1) == expected.argmax(-1)).mean() >= 0.75
