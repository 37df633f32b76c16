"""Calibrated compression per architecture: GPTQ runs qwen2 block by block and keeps its q/k/v biases
(and the GGUF it exports runs in llama.cpp); what the block-by-block code cannot run — any calibrated
method on gemma3, AWQ on qwen2's biased v_proj — fails with UNSUPPORTED_ARCH before any work."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from services.compressor.compress import Calibration, compress
from services.exporter.base import ExportInput
from services.exporter.formats.gguf import GgufExporter
from services.exporter.runtimes import LlamaCppRuntime
from shared.errors import FailedPrecondition
from shared.models.bundle import ModelDir
from shared.models.decoder_config import DecoderConfig
from shared.quant.compressed import CompressedModel
from shared.quant.grids import GptqOptions, Method, QuantizationConfig

SHA = "0" * 64
SMALL = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def qwen2(random_decoder, smollm2_dir) -> ModelDir:
    return ModelDir(random_decoder(DecoderConfig(**SMALL, architecture="qwen2"), smollm2_dir, seed=7))


@pytest.fixture(scope="module")
def gemma3(random_decoder, smollm2_dir) -> ModelDir:
    config = DecoderConfig(**{**SMALL, "vocab_size": 512}, architecture="gemma3", head_dim=32, sliding_window=16)
    return ModelDir(random_decoder(config, smollm2_dir, seed=8))


def sequences(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(3, 5000, (6, 32)))


def test_gptq_runs_qwen2_blocks_and_keeps_their_biases(qwen2, tmp_path):
    out = tmp_path / "gptq.safetensors"
    compress(qwen2, SHA, QuantizationConfig(Method.GPTQ, gguf_type="q4_0"), out,
             calibration=Calibration(sequences=sequences()), device="cpu")
    compressed = CompressedModel(out)
    biases = [n for n in qwen2.tensor_names() if n.endswith(".bias")]
    assert len(biases) == 6
    for name in biases:
        np.testing.assert_array_equal(compressed.read(name), qwen2.array(name))
    path = tmp_path / "gptq.gguf"
    GgufExporter().export(ExportInput(qwen2, SHA, compressed), path)
    runtime = LlamaCppRuntime(path, 64)
    logits = runtime.logits([1, 504, 3458, 282])
    runtime.close()
    assert logits.shape == (4, 49152) and np.isfinite(logits).all()


@pytest.mark.parametrize("recipe,pre", [
    (QuantizationConfig(Method.GPTQ, gguf_type="q4_0"), ()),
    (QuantizationConfig(Method.AWQ, gguf_type="q4_0"), ()),
    (QuantizationConfig(Method.GPTQ, gguf_type="q4_0"), (QuantizationConfig(Method.AWQ, gguf_type="q4_0"),)),
    (QuantizationConfig(Method.IMATRIX, gguf_type="q4_0"), ()),
    (QuantizationConfig(Method.GPTQ, gguf_type="q4_0", gptq=GptqOptions(sequential=False)), ()),
], ids=["gptq", "awq", "awq+gptq", "imatrix", "gptq-hessians"])
def test_calibrated_methods_refuse_gemma3(gemma3, recipe, pre, tmp_path):
    with pytest.raises(FailedPrecondition) as error:
        compress(gemma3, SHA, recipe, tmp_path / "c.safetensors", pre_steps=pre,
                 calibration=Calibration(sequences=sequences()), device="cpu")
    assert error.value.reason == "UNSUPPORTED_ARCH" and "gemma3" in error.value.message
    assert not (tmp_path / "c.safetensors").exists()


def test_awq_refuses_qwen2(qwen2, tmp_path):
    with pytest.raises(FailedPrecondition) as error:
        compress(qwen2, SHA, QuantizationConfig(Method.AWQ, gguf_type="q4_0"), tmp_path / "c.safetensors",
                 calibration=Calibration(sequences=sequences()), device="cpu")
    assert error.value.reason == "UNSUPPORTED_ARCH" and "qwen2" in error.value.message


def test_rtn_compresses_gemma3(gemma3, tmp_path):
    """Round-to-nearest needs no forward pass: every architecture, every GGUF type."""
    compress(gemma3, SHA, QuantizationConfig(Method.RTN, gguf_type="q4_k_m"), tmp_path / "c.safetensors")
    compressed = CompressedModel(tmp_path / "c.safetensors")
    assert compressed.plan("model.layers.0.self_attn.q_norm.weight").grid is None
    assert compressed.plan("model.layers.0.mlp.down_proj.weight").grid.gguf_type == "q4_k"
    assert compressed.plan("model.layers.1.mlp.down_proj.weight").grid.gguf_type == "q6_k"     # use_more_bits
