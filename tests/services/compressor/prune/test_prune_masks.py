"""Keep-masks: exact counts, deterministic ties, N:M patterns, and applying them to a module."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from services.compressor.prune.masks import apply_masks, magnitude_masks, n_m_mask, prunable_weights, sparsity_of
from shared.errors import InvalidArgument


def test_per_layer_masks_prune_exactly_the_smallest_of_each_tensor():
    torch.manual_seed(0)
    weights = {"a": torch.randn(7, 9), "b": torch.randn(3, 5, 2)}
    masks = magnitude_masks(weights, 0.4)
    for name, w in weights.items():
        pruned = (~masks[name]).sum().item()
        assert pruned == round(0.4 * w.numel())
        assert w.abs()[~masks[name]].max() <= w.abs()[masks[name]].min()


def test_ties_break_in_index_order_and_zero_sparsity_keeps_everything():
    w = {"t": torch.tensor([[1.0, -1.0, 1.0, 2.0], [1.0, 0.5, 1.0, 3.0]])}
    keep = magnitude_masks(w, 0.5)["t"]
    assert keep.tolist() == [[False, False, False, True], [True, False, True, True]]   # 0.5, then the first 1s
    assert magnitude_masks(w, 0.0)["t"].all()


def test_global_scope_uses_one_threshold_over_all_tensors():
    weights = {"small": torch.full((4, 4), 0.01) + torch.arange(16.0).reshape(4, 4) * 1e-4,
               "large": torch.randn(4, 4).abs() + 1.0}
    masks = magnitude_masks(weights, 0.5, scope="global")
    assert (~masks["small"]).all() and masks["large"].all()           # the 16 smallest are all in "small"
    assert sum(int((~m).sum()) for m in masks.values()) == 16


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_n_m_keeps_the_n_largest_of_every_m_consecutive_inputs(n, m):
    torch.manual_seed(1)
    scores = torch.randn(6, 16)
    keep = n_m_mask(scores, n, m)
    groups, kept = scores.reshape(6, -1, m), keep.reshape(6, -1, m)
    assert (kept.sum(-1) == n).all()
    smallest_kept = torch.where(kept, groups, torch.inf).amin(-1)
    largest_dropped = torch.where(kept, -torch.inf, groups).amax(-1)
    assert (smallest_kept >= largest_dropped).all()


def test_bad_patterns_name_their_field():
    with pytest.raises(InvalidArgument) as error:
        n_m_mask(torch.randn(2, 6), 2, 4)
    assert error.value.field == "prune.m"
    with pytest.raises(InvalidArgument) as error:
        n_m_mask(torch.randn(2, 8), 4, 4)
    assert error.value.field == "prune.n"
    with pytest.raises(InvalidArgument) as error:
        magnitude_masks({"a": torch.randn(2, 2)}, 1.0)
    assert error.value.field == "prune.sparsity"
    with pytest.raises(InvalidArgument):
        magnitude_masks({"a": torch.randn(2, 2)}, 0.5, scope="per_row")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.LayerNorm(8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.lm_head = nn.Linear(8, 10, bias=False)
        self.tied = nn.Linear(8, 10, bias=False)
        self.tied.weight = self.embed.weight


def test_prunable_weights_are_linear_and_conv_weights_only():
    model = Tiny()
    assert list(prunable_weights(model)) == ["conv.weight", "body.0.weight", "body.2.weight", "lm_head.weight"]
    assert list(prunable_weights(model, skip=["lm_head", "body"])) == ["conv.weight"]


def test_apply_masks_zeroes_in_place_and_rejects_unknown_names():
    model = Tiny()
    weights = prunable_weights(model, skip=["lm_head"])
    masks = magnitude_masks(weights, 0.5)
    apply_masks(model, masks)
    for name, mask in masks.items():
        assert sparsity_of(mask) == pytest.approx(0.5, abs=0.02)
        assert (dict(model.named_parameters())[name][~mask] == 0).all()
    with pytest.raises(InvalidArgument):
        apply_masks(model, {"nothing.weight": torch.ones(1, dtype=torch.bool)})
