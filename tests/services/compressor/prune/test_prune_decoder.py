"""Pruning a causal LM ModelDir: sparsity patterns, what stays dense, loadable outputs, and MLP neurons
removed structurally (a smaller intermediate_size, same outputs as zeroing them)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from services.compressor.prune.decoder import prune_decoder, prune_decoder_neurons
from shared.errors import FailedPrecondition, InvalidArgument
from shared.models.bundle import ModelDir
from shared.models.decoder_config import DecoderConfig, is_linear_weight
from shared.models.llama import build_reference

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny(random_decoder, tmp_path_factory) -> ModelDir:
    return ModelDir(random_decoder(DecoderConfig(**TINY), tmp_path_factory.mktemp("no-tokenizer")))


@pytest.fixture(scope="module")
def sequences() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def logits(model: ModelDir, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return build_reference(model.config, model.tensor)(tokens)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(n=2, m=4)])
def test_every_block_linear_is_pruned_and_the_rest_untouched(tiny, sequences, tmp_path, method, pattern):
    report = prune_decoder(tiny, method=method, sequences=None if method == "magnitude" else sequences,
                           out_dir=tmp_path / "pruned", **pattern)
    pruned = ModelDir(tmp_path / "pruned")
    assert pruned.config == tiny.config
    linears = [name for name in tiny.tensor_names() if is_linear_weight(name)]
    assert sorted(report.sparsity) == sorted(linears) and report.overall_sparsity == pytest.approx(0.5)
    for name in tiny.tensor_names():
        weight = pruned.array(name)
        if name in report.sparsity:
            assert (weight == 0).mean() == pytest.approx(0.5, abs=1e-6 if method == "magnitude" else 0.01)
            if "m" in pattern:
                assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
        else:
            assert np.array_equal(weight, tiny.array(name))            # embeddings and norms stay as they were
    assert bool(report.output_error) == (method != "magnitude")
    assert torch.isfinite(logits(pruned, sequences[:1])).all()


def test_calibrated_pruning_has_lower_output_error_than_magnitude(tiny, sequences, tmp_path):
    errors = {method: np.mean(list(prune_decoder(tiny, method=method, sequences=sequences, sparsity=0.5,
                                                 out_dir=tmp_path / method).output_error.values()))
              for method in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < errors["wanda"] <= errors["magnitude"], errors


def test_sparsegpt_at_zero_sparsity_keeps_the_model(tiny, sequences, tmp_path):
    prune_decoder(tiny, method="sparsegpt", sparsity=0.0, sequences=sequences, out_dir=tmp_path / "same")
    same = ModelDir(tmp_path / "same")
    for name in tiny.tensor_names():
        assert np.array_equal(same.array(name), tiny.array(name))


def test_global_magnitude_pruning_reaches_the_total_exactly(tiny, tmp_path):
    report = prune_decoder(tiny, method="magnitude", sparsity=0.3, scope="global", sequences=None,
                           out_dir=tmp_path / "global")
    total = sum(int(np.prod(tiny.shape(name))) for name in report.sparsity)
    assert round(report.overall_sparsity * total) == round(0.3 * total)
    assert len({round(s, 4) for s in report.sparsity.values()}) > 1      # layers differ; the total is exact


def test_bad_requests_are_refused(tiny, random_decoder, tmp_path_factory, tmp_path, sequences):
    with pytest.raises(InvalidArgument) as error:
        prune_decoder(tiny, method="wanda", sequences=None, out_dir=tmp_path / "x")
    assert error.value.field == "calibration"
    with pytest.raises(InvalidArgument):
        prune_decoder(tiny, method="sparsegpt", n=2, m=3, sequences=sequences, out_dir=tmp_path / "x")
    with pytest.raises(InvalidArgument):
        prune_decoder(tiny, method="wanda", scope="global", sequences=sequences, out_dir=tmp_path / "x")
    gemma = ModelDir(random_decoder(DecoderConfig(**TINY, architecture="gemma3", head_dim=16),
                                    tmp_path_factory.mktemp("no-tokenizer")))
    with pytest.raises(FailedPrecondition):
        prune_decoder(gemma, method="sparsegpt", sequences=sequences, out_dir=tmp_path / "x")


@pytest.mark.parametrize("calibrated", [False, True])
def test_removing_neurons_equals_zeroing_them(tiny, sequences, tmp_path, calibrated):
    report = prune_decoder_neurons(tiny, fraction=0.25, sequences=sequences if calibrated else None,
                                   out_dir=tmp_path / "narrow")
    narrow = ModelDir(tmp_path / "narrow")
    assert narrow.config.intermediate_size == report.intermediate_size_after == 96
    assert narrow.config.parameter_count() == report.parameters_after < report.parameters_before
    zeroed = {}
    for i in range(tiny.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate, kept_gate = tiny.array(p + "gate_proj.weight"), narrow.array(p + "gate_proj.weight")
        kept = [int(np.flatnonzero((gate == row).all(1))[0]) for row in kept_gate]   # rows are unique
        assert kept == sorted(kept) and np.array_equal(narrow.array(p + "down_proj.weight"),
                                                       tiny.array(p + "down_proj.weight")[:, kept])
        down = tiny.array(p + "down_proj.weight").copy()
        down[:, np.setdiff1d(np.arange(gate.shape[0]), kept)] = 0
        zeroed[p + "down_proj.weight"] = torch.from_numpy(down)

    def read(name: str) -> torch.Tensor:
        return zeroed[name] if name in zeroed else tiny.tensor(name)
    with torch.no_grad():
        full = build_reference(tiny.config, read)(sequences[:2])
    assert torch.allclose(logits(narrow, sequences[:2]), full, atol=1e-5)
