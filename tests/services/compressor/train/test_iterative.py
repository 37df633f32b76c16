"""Iterative magnitude pruning: the schedule is reached exactly, masks nest, fine-tuning holds them."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from services.compressor.prune.masks import prunable_weights
from services.compressor.train.iterative import iterative_prune
from services.compressor.train.loop import TrainingConfig
from shared.errors import InvalidArgument

FINETUNE = TrainingConfig(steps=20, batch_size=32, learning_rate=1e-2)


def task(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=generator)
    y = (x[:, :3].sum(-1) > 0).long() + (x[:, 3] > 1).long()
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 3)), (x, y)


def cross_entropy(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def test_per_layer_schedule_is_reached_and_masks_nest():
    model, data = task()
    zeros_after = []

    def evaluate(m: nn.Module) -> float:
        zeros_after.append({name: (w == 0).clone() for name, w in prunable_weights(m).items()})
        return float((m(data[0]).argmax(-1) == data[1]).float().mean())

    results = iterative_prune(model, [0.5, 0.75, 0.9], FINETUNE, data, cross_entropy, evaluate=evaluate, device="cpu")
    assert [r.sparsity for r in results] == [0.5, 0.75, 0.9]
    for result, layer_zeros in zip(results, zeros_after):
        # per layer: round(s·400) and round(s·120) weights go from the two layers
        expected = (round(result.sparsity * 400) + round(result.sparsity * 120)) / 520
        assert result.achieved == pytest.approx(expected) and result.training.steps == 20
        assert result.quality is not None and 0.0 <= result.quality <= 1.0
        assert [int(z.sum()) for z in layer_zeros.values()] == [round(result.sparsity * 400),
                                                                 round(result.sparsity * 120)]
    for earlier, later in zip(zeros_after, zeros_after[1:]):
        assert all((later[name] | ~earlier[name]).all() for name in earlier)     # once pruned, pruned for good
    assert results[0].quality > 0.6


def test_global_scope_and_skip():
    model, data = task(1)
    results = iterative_prune(model, [0.6], FINETUNE, data, cross_entropy, scope="global", skip=("2",), device="cpu")
    assert results[0].achieved == pytest.approx(0.6)
    assert (model[2].weight != 0).all()


@pytest.mark.parametrize("schedule, message", [
    ([], "at least one sparsity"),
    ([0.5, 0.5], "increase strictly"),
    ([0.9, 0.5], "increase strictly"),
    ([0.5, 1.0], r"in \[0, 1\)"),
])
def test_schedule_is_validated(schedule, message):
    model, data = task()
    with pytest.raises(InvalidArgument, match=message) as raised:
        iterative_prune(model, schedule, FINETUNE, data, cross_entropy, device="cpu")
    assert raised.value.field.startswith("prune.")


def test_finetune_and_scope_are_validated():
    model, data = task()
    with pytest.raises(InvalidArgument) as raised:
        iterative_prune(model, [0.5], TrainingConfig(steps=0), data, cross_entropy, device="cpu")
    assert raised.value.field == "prune.finetune.steps"
    with pytest.raises(InvalidArgument, match="prune.scope"):
        iterative_prune(model, [0.5], FINETUNE, data, cross_entropy, scope="per_block", device="cpu")
