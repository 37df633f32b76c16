"""qwen2 and gemma3 graphs equal the torch reference (shared/models/llama.py) on the same weights,
float and through MatMulNBits, and decode through the KV cache (gemma3's sliding window included)
exactly as a full forward."""
from __future__ import annotations

import json

import numpy as np
import pytest

from services.compressor.compress import compress
from services.exporter.base import ExportInput, ExportOptions, OnnxWeightOperator
from services.exporter.formats.onnx import OnnxExporter
from shared.models.bundle import ModelDir
from shared.models.decoder_config import FULL, SLIDING, DecoderConfig
from shared.quant.compressed import CompressedModel
from shared.quant.grids import Granularity, Method, QuantizationConfig
from shared.tensors.safetensors_writer import write_safetensors
from test_onnx_export import SHA, TOKENS, reference_logits, run, session

TOKENS = [t % 1024 for t in TOKENS]
CONFIGS = {
    "qwen2": DecoderConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           rope_theta=1_000_000.0, architecture="qwen2"),
    "gemma3": DecoderConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=48, max_position_embeddings=256,
                            tie_word_embeddings=True, architecture="gemma3", query_pre_attn_scalar=40.0,
                            sliding_window=5, layer_types=(SLIDING, FULL), rope_local_base_freq=10_000.0,
                            final_logit_softcapping=30.0),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_dir(request, tmp_path_factory):
    """Random weights (norm weights around 0 for gemma3's (1 + w), biases non-zero for qwen2)."""
    config = CONFIGS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    (directory / "config.json").write_text(json.dumps(config.to_hf()))
    rng = np.random.default_rng(0)
    shapes = config.tensor_shapes()
    scale = {1: 0.3, 2: 0.08}
    tensors = ((name, (rng.normal(0, scale[len(shape)], shape) + (1.0 if len(shape) == 1 and
                                                                   config.architecture != "gemma3" and
                                                                   name.endswith("norm.weight") else 0.0))
                .astype(np.float32)) for name, shape in shapes.items())
    write_safetensors(directory / "model.safetensors", {n: (s, "F32") for n, s in shapes.items()}, tensors)
    return directory


def test_float_graph_equals_reference_and_decodes_through_the_cache(model_dir, tmp_path):
    model = ModelDir(model_dir)
    OnnxExporter().export(ExportInput(model, SHA), tmp_path / "m.onnx")
    sess = session(tmp_path / "m.onnx", optimize=True)
    full, _ = run(sess, TOKENS)
    assert np.abs(full - reference_logits(model, None, TOKENS)).max() < 1e-4
    logits, pasts = run(sess, TOKENS[:6])
    steps = [logits[-1]]
    for token in TOKENS[6:]:                                    # past the sliding window of 5
        logits, pasts = run(sess, [token], pasts)
        steps.append(logits[-1])
    assert np.abs(np.stack(steps[:-1]) - full[5:-1]).max() < 1e-4


def test_matmul_nbits_graph_equals_reference(model_dir, tmp_path):
    model = ModelDir(model_dir)
    recipe = QuantizationConfig(Method.RTN, bits=4, granularity=Granularity.PER_GROUP, group_size=16, symmetric=False)
    compress(model, SHA, recipe, tmp_path / "c.safetensors")
    compressed = CompressedModel(tmp_path / "c.safetensors")
    options = ExportOptions(onnx_weight_operator=OnnxWeightOperator.MATMUL_NBITS)
    OnnxExporter().export(ExportInput(model, SHA, compressed, options), tmp_path / "m.onnx")
    logits, _ = run(session(tmp_path / "m.onnx", optimize=True), TOKENS)
    assert np.abs(logits - reference_logits(model, compressed, TOKENS)).max() < 1e-4
