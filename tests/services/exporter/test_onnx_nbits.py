"""MatMulNBits carries our own codes: the weight onnxruntime dequantizes equals ours bit for bit, for
every grid it can express; the grids it cannot are refused as UNSUPPORTED_OP before any work."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from services.compressor.compress import compress
from services.compressor.quant.rtn import quantize
from services.exporter.base import ExportInput, ExportOptions, OnnxWeightOperator
from services.exporter.formats.onnx import OnnxExporter
from services.exporter.formats.onnx_builder import GraphBuilder
from services.exporter.formats.onnx_nbits import dequantize_reference, to_matmul_nbits, why_not_expressible
from services.exporter.formats.onnx_weights import Precision, matmul_nbits
from shared.errors import FailedPrecondition
from shared.models.bundle import ModelDir
from shared.quant.compressed import CompressedModel
from shared.quant.grids import GGUF_GRIDS, Granularity, Grid, Method, QuantizationConfig
from test_onnx_export import SHA, TOKENS, reference_logits, run, session

NBITS = ExportOptions(onnx_weight_operator=OnnxWeightOperator.MATMUL_NBITS)


def onnxruntime_weight(q, scale_dtype=np.float32) -> np.ndarray:
    """W (N, K) as onnxruntime's MatMulNBits computes with it: I_K · Wᵀ through one node (each output
    is one product 1·w plus exact zeros, so it is the dequantized weight itself)."""
    g = GraphBuilder()
    y = matmul_nbits(g, "x", "w", q, Precision(scale_dtype, scale_dtype))
    g.node("Identity", [y], "y")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(scale_dtype))
    K = q.shape[1]
    model = g.model("probe", [helper.make_tensor_value_info("x", elem, [None, K])],
                    [helper.make_tensor_value_info("y", elem, None)], {"": 21, "com.microsoft": 1})
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.eye(K, dtype=scale_dtype)})[0].T


GRIDS = [Grid(4, Granularity.PER_GROUP, group, symmetric) for group in (16, 32, 64, 128, 256)
         for symmetric in (True, False)] + [
    Grid(4, Granularity.PER_CHANNEL), Grid(4, Granularity.PER_TENSOR, symmetric=False),
    Grid(8, Granularity.PER_GROUP, 32), Grid(8, Granularity.PER_CHANNEL, symmetric=False),
    Grid(2, Granularity.PER_GROUP, 64, False), Grid(3, Granularity.PER_GROUP, 32),       # 3 bits in 4-bit containers
    Grid(6, Granularity.PER_GROUP, 16, False), Grid(4, Granularity.PER_GROUP, 96),       # group of 96: 3 blocks of 32
]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda grid: grid.name)
def test_onnxruntime_dequantizes_exactly_our_weights(grid):
    rng = np.random.default_rng(grid.bits * 1000 + grid.group_size)
    K = 768                                   # 3 blocks of 256: an odd count pads the zero points' bytes
    q = quantize(rng.normal(0, 0.05, (24, K)).astype(np.float32), grid)
    ours = q.dequantize()
    assert np.array_equal(onnxruntime_weight(q), ours)
    assert np.array_equal(dequantize_reference(to_matmul_nbits(q)), ours)


def test_float16_scales_are_ours_unrounded():
    """With float16 activations the scales are float16, which our scales already are."""
    q = quantize(np.random.default_rng(1).normal(0, 0.05, (16, 128)).astype(np.float32),
                 Grid(4, Granularity.PER_GROUP, 32, False))
    packed = to_matmul_nbits(q, np.float16)
    assert np.array_equal(packed.scales, q.scales)
    assert np.array_equal(onnxruntime_weight(q, np.float16), q.dequantize().astype(np.float16))


@pytest.mark.parametrize("grid, reason", [
    (GGUF_GRIDS["q4_k"], "GGUF block type q4_k"),
    (Grid(4, Granularity.PER_GROUP, 8), "power-of-two block of at least 16"),
    (Grid(4, Granularity.PER_GROUP, 24), "power-of-two block of at least 16"),
])
def test_grids_it_cannot_express_are_named(grid, reason):
    assert reason in why_not_expressible(grid, 96)


@pytest.mark.parametrize("name", ["int4-g32", "int4-g64-asym", "int4-per_channel"])
def test_llama_through_matmul_nbits_equals_reference(tiny_model_dir, tmp_path, name):
    recipes = {"int4-g32": QuantizationConfig(Method.RTN, bits=4, granularity=Granularity.PER_GROUP, group_size=32),
               "int4-g64-asym": QuantizationConfig(Method.RTN, bits=4, granularity=Granularity.PER_GROUP,
                                                   group_size=64, symmetric=False),
               "int4-per_channel": QuantizationConfig(Method.RTN, bits=4, granularity=Granularity.PER_CHANNEL)}
    model = ModelDir(tiny_model_dir)
    compress(model, SHA, recipes[name], tmp_path / "c.safetensors")
    compressed = CompressedModel(tmp_path / "c.safetensors")
    source = ExportInput(model, SHA, compressed, NBITS)
    exported = OnnxExporter().export(source, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 7 * 2         # every linear of both layers
    assert not any(n.op_type == "DequantizeLinear" for n in graph.node)
    assert OnnxExporter().read_back(exported, source)["ops"]["MatMulNBits"] == 14
    logits, _ = run(session(tmp_path / "m.onnx", optimize=True), TOKENS)
    assert np.abs(logits - reference_logits(model, compressed, TOKENS)).max() < 1e-4


def test_gguf_grids_fail_before_any_work(tiny_model_dir, tmp_path):
    model = ModelDir(tiny_model_dir)
    compress(model, SHA, QuantizationConfig(Method.RTN, gguf_type="q4_0"), tmp_path / "c.safetensors")
    source = ExportInput(model, SHA, CompressedModel(tmp_path / "c.safetensors"), NBITS)
    with pytest.raises(FailedPrecondition) as error:
        OnnxExporter().export(source, tmp_path / "m.onnx")
    assert error.value.reason == "UNSUPPORTED_OP"
    assert "model.embed_tokens.weight on GGUF block type q8_0" in error.value.message     # names the tensor
    assert not (tmp_path / "m.onnx").exists()
