"""Calibration statistics on the tiny llama (real tokenizer, real text): shapes, determinism, what they
mean, and the refusal of too little data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from services.calibrator.stats import METADATA_KEY, CalibrationConfig, calibrate, sequences, write_stats
from shared.errors import InvalidArgument
from shared.models.bundle import ModelDir
from shared.models.llama import build_reference


@pytest.fixture(scope="module")
def text(assets) -> str:
    return (assets / "data" / "calib.txt").read_text()[:200_000]


def test_statistics_per_linear_are_deterministic_and_shaped(tiny_model_dir, text, tmp_path):
    model = ModelDir(tiny_model_dir)
    config = CalibrationConfig(samples=3, sequence_length=32)
    first, second = calibrate(model, text, config), calibrate(model, text, config)
    assert first.tokens == 3 * 32
    names = [layer.weight for layer in first.layers]
    assert len(names) == 2 * 7 and "model.layers.1.mlp.down_proj.weight" in names
    for a, b in zip(first.layers, second.layers):
        assert np.array_equal(a.abs_max, b.abs_max) and np.array_equal(a.mean_abs, b.mean_abs)
        width = 128 if a.weight.endswith("down_proj.weight") else 64
        assert a.abs_max.shape == (width,) and (a.abs_max >= a.mean_abs).all() and (a.mean_abs > 0).all()
    by_name = {layer.weight: layer for layer in first.layers}
    q, k = by_name["model.layers.0.self_attn.q_proj.weight"], by_name["model.layers.0.self_attn.k_proj.weight"]
    assert np.array_equal(q.abs_max, k.abs_max)                 # q and k read the same normed input

    write_stats(tmp_path / "stats.safetensors", first, {"model": "m", "dataset": "d"})
    with safe_open(str(tmp_path / "stats.safetensors"), framework="np") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["tokens"] == 96
        assert np.array_equal(f.get_tensor("model.layers.0.self_attn.q_proj.weight.abs_max"), q.abs_max)


def test_abs_max_equals_a_direct_measurement(tiny_model_dir, text):
    """The hooks see exactly the linear's input: recompute one layer's input by hand."""
    model = ModelDir(tiny_model_dir)
    config = CalibrationConfig(samples=1, sequence_length=16)
    result = calibrate(model, text, config)
    from shared.models.tokenizer import TextTokenizer
    tokenizer = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    (tokens,) = sequences(tokenizer.encode(text), tokenizer.bos_id, config)
    reference = build_reference(model.config, model.tensor)
    with torch.inference_mode():
        x = reference.model.embed_tokens(torch.tensor([tokens]))
        normed = reference.model.layers[0].input_layernorm(x)[0]                     # (T, d)
    stats = {layer.weight: layer for layer in result.layers}["model.layers.0.self_attn.v_proj.weight"]
    assert np.allclose(stats.abs_max, normed.abs().max(0).values.numpy(), rtol=1e-6)
    assert np.allclose(stats.mean_abs, normed.abs().mean(0).numpy(), rtol=1e-5)


def test_too_little_text_is_refused(tiny_model_dir):
    with pytest.raises(InvalidArgument) as error:
        calibrate(ModelDir(tiny_model_dir), "only a few words", CalibrationConfig(samples=4, sequence_length=64))
    assert error.value.reason == "INSUFFICIENT_DATA" and error.value.field == "calibration.dataset"


@pytest.mark.parametrize("samples,length", [(0, 64), (5000, 64), (4, 4), (4, 9000)])
def test_config_ranges(samples, length):
    with pytest.raises(InvalidArgument):
        CalibrationConfig(samples, length).validated()
