"""Transform on a causal LM (a tiny llama with random weights and SmolLM2's tokenizer, real text):
each step writes a loadable model, and the report follows size and quality after every step.
Synthetic weights exercise the machinery; real-model quality numbers are in bench/prune_lm.py."""
from __future__ import annotations

import numpy as np
import pytest

from services.compressor.steps import DistillStep, PruneStep, Training
from services.compressor.transform import TransformData, measure_size, run_transform
from shared.models.bundle import ModelDir


@pytest.fixture()
def data(assets):
    text = assets / "data"
    return TransformData("causal_lm", text / "calib.txt", 4, 64, None, text / "eval.txt", max_tokens=256,
                         window_tokens=64)


def test_prune_then_distill_reports_every_step(tiny_model_dir, data, tmp_path):
    steps = (PruneStep("sparsegpt", 0.5, n=2, m=4), DistillStep(temperature=2.0, training=Training(steps=3)))
    reports, parameters = run_transform(tiny_model_dir, steps, data, tmp_path / "work", tmp_path / "out")
    assert [r.kind for r in reports] == ["source", "prune", "distill"]
    source, pruned, distilled = reports
    assert source.sparsity < 0.01 and source.stored_bytes == source.dense_bytes
    assert abs(pruned.sparsity - 0.5) < 1e-6                      # every block linear exactly 2:4
    assert pruned.stored_bytes < pruned.dense_bytes and "bitmask" in pruned.storage
    assert distilled.sparsity == pytest.approx(pruned.sparsity)  # distillation keeps the zeros
    assert all(r.quality.metric == "perplexity" and np.isfinite(r.quality.value) for r in reports)
    assert "loss" in distilled.note
    model = ModelDir(tmp_path / "out")
    up = model.array("model.layers.0.mlp.up_proj.weight").reshape(-1, 4)
    assert ((up != 0).sum(axis=1) <= 2).all()
    assert parameters == source.parameter_count


def test_structured_neurons_make_a_smaller_model(tiny_model_dir, data, tmp_path):
    reports, parameters = run_transform(tiny_model_dir, (PruneStep("structured", 0.25),), data, tmp_path / "work",
                                        tmp_path / "out")
    model = ModelDir(tmp_path / "out")
    assert model.config.intermediate_size == 96                   # 128 − 25 %
    assert parameters == reports[1].parameter_count < reports[0].parameter_count
    assert reports[1].dense_bytes < reports[0].dense_bytes and reports[1].sparsity < 0.01


def test_measure_size_is_honest_about_sparse_storage():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(64, 64)).astype(np.float32)
    half = dense * (rng.random((64, 64)) < 0.5)
    size = measure_size([("a", dense, True), ("b", half, True)])
    assert size.parameters == 2 * 4096 and size.dense_bytes == 2 * 4096 * 4
    assert size.sparse_tensors == 1 and size.sparse_format == "bitmask"
    # the half-zero tensor costs its nonzeros (≈2048·4 B) plus one bit per element (512 B)
    assert size.stored_bytes == 4096 * 4 + int((half != 0).sum()) * 4 + 512
