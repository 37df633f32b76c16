"""SparseGPT against its slow twin, and against magnitude and Wanda on correlated inputs."""
from __future__ import annotations

import pytest
import torch

from services.compressor.prune.masks import magnitude_masks, n_m_mask
from services.compressor.prune.reference import sparsegpt_reference
from services.compressor.prune.sparsegpt import sparsegpt
from services.compressor.prune.wanda import wanda_mask
from services.compressor.quant.gptq import relative_output_error
from shared.errors import InvalidArgument


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """(tokens, features): correlated features (a random mixing), a few of them 20× louder — the
    outlier features of LLM activations that make magnitude pruning fail."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, features, generator=g) @ (torch.eye(features) + 0.3 * torch.randn(features, features,
                                                                                              generator=g))
    X[:, torch.randperm(features, generator=g)[:features // 16]] *= 20.0
    return X


@pytest.fixture(scope="module")
def layer():
    X = correlated_inputs(2048, 128)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    return W, X.T @ X / len(X), X.pow(2).sum(0)


@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(n=2, m=4), dict(sparsity=0.3)])
def test_matches_the_slow_reference(layer, pattern):
    W, H, _ = layer
    W, H = W[:16, :48], H[:48, :48]
    fast = sparsegpt(W, H, block_size=16, **pattern)
    slow_weight, slow_keep = sparsegpt_reference(W, H, block_size=16, **pattern)
    assert torch.equal(fast.mask, slow_keep)
    assert torch.allclose(fast.weight, slow_weight, atol=1e-4 * W.abs().max())


def test_exact_sparsity_and_zeros_where_pruned(layer):
    W, H, _ = layer
    result = sparsegpt(W, H, sparsity=0.5)
    assert int((~result.mask).sum()) == W.numel() // 2
    assert (result.weight[~result.mask] == 0).all()
    nm = sparsegpt(W, H, n=2, m=4)
    assert (nm.mask.reshape(64, -1, 4).sum(-1) == 2).all() and (nm.weight[~nm.mask] == 0).all()


@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(n=2, m=4)])
def test_sparsegpt_beats_wanda_which_beats_magnitude(layer, pattern):
    W, H, input_sq_sum = layer
    if "m" in pattern:
        magnitude = n_m_mask(W.abs(), 2, 4)
    else:
        magnitude = magnitude_masks({"w": W}, 0.5)["w"]
    errors = {"magnitude": relative_output_error(W, W * magnitude, H),
              "wanda": relative_output_error(W, W * wanda_mask(W, input_sq_sum, **pattern), H),
              "sparsegpt": sparsegpt(W, H, **pattern).output_error}
    assert errors["sparsegpt"] < 0.8 * errors["wanda"] and errors["wanda"] < 0.5 * errors["magnitude"], errors


def test_dead_inputs_are_pruned_first_and_bad_arguments_rejected(layer):
    W, H, _ = layer
    H = H.clone()
    H[:, :8] = 0
    H[:8, :] = 0
    result = sparsegpt(W, H, sparsity=0.05)
    assert result.mask[:, 8:].all() and (result.weight[:, :8] == 0).all()   # 410 to prune, 512 free ones
    with pytest.raises(InvalidArgument):
        sparsegpt(W, H, n=2, m=4, block_size=126)
    with pytest.raises(InvalidArgument):
        sparsegpt(W, H[:10, :10])
