"""Wanda: |W|·‖X‖ scores compared within each output row, and its N:M variant."""
from __future__ import annotations

import pytest
import torch

from services.compressor.prune.wanda import wanda_mask, wanda_scores
from shared.errors import InvalidArgument


def test_each_row_loses_exactly_its_lowest_scores():
    torch.manual_seed(0)
    W, energy = torch.randn(5, 12), torch.rand(12) * 10
    keep = wanda_mask(W, energy, sparsity=0.5)
    assert (keep.sum(1) == 6).all()
    scores = wanda_scores(W, energy)
    for row in range(5):
        assert scores[row][~keep[row]].max() <= scores[row][keep[row]].min()


def test_a_loud_input_keeps_its_small_weights():
    W = torch.tensor([[0.1, 1.0, 1.0, 1.0]])
    keep = wanda_mask(W, torch.tensor([10_000.0, 1.0, 1.0, 1.0]), sparsity=0.25)
    assert keep.tolist() == [[True, False, True, True]]


def test_n_m_variant_and_shape_checks():
    torch.manual_seed(1)
    W, energy = torch.randn(4, 16), torch.rand(16)
    keep = wanda_mask(W, energy, n=2, m=4)
    assert (keep.reshape(4, 4, 4).sum(-1) == 2).all()
    with pytest.raises(InvalidArgument):
        wanda_mask(W, torch.rand(15), sparsity=0.5)
    with pytest.raises(InvalidArgument) as error:
        wanda_mask(torch.randn(4, 10), torch.rand(10), n=2, m=4)
    assert error.value.field == "prune.m"
