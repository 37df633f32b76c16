"""Calibration statistics, block by block, on the tiny llama and on SmolLM2 (real tokenizer, real text):
they equal a full-model forward with hooks, they mean what they say, and too little data is refused."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from services.calibrator.accumulate import PERCENTILES
from services.calibrator.stats import (CalibrationConfig, calibrate, calibrate_tokens, model_sites, sequences,
                                       site_statistics, tokenizer_of)
from shared.errors import InvalidArgument
from shared.models.bundle import ModelDir
from shared.models.llama import build_reference


@pytest.fixture(scope="module")
def text(assets) -> str:
    return (assets / "data" / "calib.txt").read_text()[:200_000]


def reference_statistics(model: ModelDir, chunks: list[list[int]]) -> dict[str, dict]:
    """The slow, obvious twin: the whole reference model in one forward, every linear's input captured
    and reduced in float64 with numpy."""
    reference = build_reference(model.config, model.tensor)
    inputs: dict[str, np.ndarray] = {}

    def keep(name):
        return lambda _module, args: inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]).double().numpy())
    handles = [module.register_forward_pre_hook(keep(name)) for name, module in reference.named_modules()
               if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")]
    with torch.inference_mode():
        reference.hidden_states(torch.tensor(chunks))
    for handle in handles:
        handle.remove()
    out = {}
    for name, x in inputs.items():
        magnitude = np.abs(x)
        out[f"{name}.weight"] = {
            "abs_max": magnitude.max(0), "mean_abs": magnitude.mean(0), "sq_mean": (x * x).mean(0),
            "hessian": x.T @ x / len(x), "min": x.min(), "max": x.max(),
            **{f"p{q:g}": np.percentile(magnitude, q) for q in PERCENTILES}}
    return out


@pytest.mark.parametrize("which,samples,length", [("tiny", 3, 32), ("smollm2", 3, 24)])
def test_block_by_block_equals_the_full_model_with_hooks(which, samples, length, tiny_model_dir, smollm2_dir, text):
    model = ModelDir(tiny_model_dir if which == "tiny" else smollm2_dir)
    config = CalibrationConfig(samples, length, hessians="all")
    tokens = tokenizer_of(model).encode(text)
    expected = reference_statistics(model, sequences(tokens, tokenizer_of(model).bos_id, config))
    covered = set()
    for site, summary in site_statistics(model, tokens, config, batch=2):      # 2 batches per block
        for weight in site.weights:
            covered.add(weight)
            want = expected[weight]
            scale = want["abs_max"].max()
            close = lambda got, ref, rtol=1e-4: np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-5 * scale,
                                                                           err_msg=weight)
            close(summary.abs_max, want["abs_max"])
            close(summary.mean_abs, want["mean_abs"])
            close(summary.sq_mean, want["sq_mean"], rtol=2e-4)
            np.testing.assert_allclose(summary.hessian, want["hessian"], rtol=2e-4, atol=1e-5 * scale ** 2,
                                       err_msg=weight)
            close(summary.value_range, [want[key] for key in ("min", "max", "p99", "p99.9", "p99.99")])
    assert covered == set(expected)


def test_hessian_is_symmetric_psd_and_its_diagonal_is_the_importance(smollm2_dir, text):
    model = ModelDir(smollm2_dir)
    result = calibrate(model, text, CalibrationConfig(2, 32))
    assert len(result.sites) == 4 * model.config.num_hidden_layers
    for site, summary in result.sites:
        H = summary.hessian.astype(np.float64)                                 # (in, in)
        assert H.shape == (site.in_features, site.in_features) and np.array_equal(H, H.T)
        np.linalg.cholesky(H + 1e-6 * np.abs(H).max() * np.eye(len(H)))        # λ_min(H) > -1e-6 max|H|
        np.testing.assert_allclose(np.diag(H), summary.sq_mean, rtol=1e-5, atol=1e-9)
        assert (summary.sq_mean >= summary.mean_abs ** 2 * (1 - 1e-5)).all()       # Jensen
        low, high, p99, p999, p9999 = summary.value_range
        assert low < 0 < high and p99 <= p999 <= p9999 <= max(-low, high) == summary.abs_max.max()


def test_statistics_per_linear_are_deterministic_and_shaped(tiny_model_dir, text):
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


def test_abs_max_equals_a_direct_measurement(tiny_model_dir, text):
    """The hooks see exactly the linear's input: recompute one layer's input by hand."""
    model = ModelDir(tiny_model_dir)
    config = CalibrationConfig(samples=1, sequence_length=16)
    result = calibrate(model, text, config)
    tokenizer = tokenizer_of(model)
    (tokens,) = sequences(tokenizer.encode(text), tokenizer.bos_id, config)
    reference = build_reference(model.config, model.tensor)
    with torch.inference_mode():
        x = reference.model.embed_tokens(torch.tensor([tokens]))
        normed = reference.model.layers[0].input_layernorm(x)[0]                     # (T, d)
    stats = {layer.weight: layer for layer in result.layers}["model.layers.0.self_attn.v_proj.weight"]
    assert np.allclose(stats.abs_max, normed.abs().max(0).values.numpy(), rtol=1e-6)
    assert np.allclose(stats.mean_abs, normed.abs().mean(0).numpy(), rtol=1e-5)


def test_sites_group_the_linears_that_share_an_input(smollm2_dir):
    config = ModelDir(smollm2_dir).config
    sites = model_sites(config)
    assert [s.name for s in sites[:4]] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
                                          "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"]
    assert sites[0].weights == tuple(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    assert [s.in_features for s in sites[:4]] == [576, 576, 576, 1536] and all(s.hessian for s in sites)
    assert not any(s.hessian for s in model_sites(config, "none"))
    big = dataclasses.replace(config, intermediate_size=9000)
    assert [s.hessian for s in model_sites(big)[:4]] == [True, True, True, False]   # auto: in ≤ 8192
    assert all(s.hessian for s in model_sites(big, "all"))


def test_without_hessians_the_other_statistics_are_unchanged(tiny_model_dir, text):
    model = ModelDir(tiny_model_dir)
    tokens = tokenizer_of(model).encode(text)
    full = calibrate_tokens(model, tokens, CalibrationConfig(2, 32, "all"))
    bare = calibrate_tokens(model, tokens, CalibrationConfig(2, 32, "none"))
    for (site, a), (_, b) in zip(full.sites, bare.sites):
        assert site.hessian and a.hessian is not None and b.hessian is None
        assert np.array_equal(a.sq_mean, b.sq_mean) and np.array_equal(a.value_range, b.value_range)


def test_too_little_text_is_refused(tiny_model_dir):
    with pytest.raises(InvalidArgument) as error:
        calibrate(ModelDir(tiny_model_dir), "only a few words", CalibrationConfig(samples=4, sequence_length=64))
    assert error.value.reason == "INSUFFICIENT_DATA" and error.value.field == "calibration.dataset"
    assert "need 252" in error.value.message


def test_no_tokens_and_bad_token_ids_are_refused(tiny_model_dir):
    model = ModelDir(tiny_model_dir)
    with pytest.raises(InvalidArgument) as error:
        calibrate_tokens(model, [], CalibrationConfig(2, 16))
    assert error.value.reason == "INSUFFICIENT_DATA" and error.value.field == "calibration.dataset"
    for bad in (-1, 49152):
        tokens = [5] * 40
        tokens[7] = bad
        with pytest.raises(InvalidArgument) as error:
            site_statistics(model, tokens, CalibrationConfig(2, 16))        # refused before any block runs
        assert error.value.field == "calibration.dataset" and f"id {bad}" in error.value.message
        assert "[0, 49152)" in error.value.message


@pytest.mark.parametrize("samples,length,hessians", [(0, 64, "auto"), (5000, 64, "auto"), (4, 4, "auto"),
                                                     (4, 9000, "auto"), (4, 64, "some")])
def test_config_ranges(samples, length, hessians):
    with pytest.raises(InvalidArgument):
        CalibrationConfig(samples, length, hessians).validated()
