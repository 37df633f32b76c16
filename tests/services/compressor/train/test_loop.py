"""The training loop: config validation, batches, repeatability, and masks that keep pruned weights at zero."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from services.compressor.train.loop import TrainingConfig, batch_indices, masked_parameters, train
from shared.errors import InvalidArgument


def regression(seed: int = 0, examples: int = 256) -> tuple[tuple[torch.Tensor, torch.Tensor], nn.Module]:
    """y = x·Aᵀ for a fixed A, and an MLP to learn it."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(examples, 8, generator=generator)
    y = x @ torch.randn(3, 8, generator=generator).T
    torch.manual_seed(seed)
    return (x, y), nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def mse(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


@pytest.mark.parametrize("config, field", [
    (TrainingConfig(steps=0), "training.steps"),
    (TrainingConfig(batch_size=0), "training.batch_size"),
    (TrainingConfig(learning_rate=0.0), "training.learning_rate"),
    (TrainingConfig(learning_rate=2.0), "training.learning_rate"),
    (TrainingConfig(seed=-1), "training.seed"),
])
def test_config_is_validated_naming_the_field(config, field):
    with pytest.raises(InvalidArgument) as raised:
        config.validated()
    assert raised.value.field == field and field in raised.value.message
    with pytest.raises(InvalidArgument) as raised:
        config.validated("distill.training")
    assert raised.value.field == "distill." + field


def test_batches_cover_every_example_once_per_pass():
    seen = torch.cat(list(batch_indices(10, TrainingConfig(steps=3, batch_size=4))))
    assert sorted(seen.tolist()) == list(range(10))                 # 4 + 4 + 2: one whole pass
    batches = list(batch_indices(10, TrainingConfig(steps=7, batch_size=4, seed=3)))
    assert len(batches) == 7 and [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]


def test_training_reduces_the_loss_and_repeats_exactly():
    data, model = regression()
    _, twin = regression()
    config = TrainingConfig(steps=150, batch_size=32, learning_rate=1e-2)
    report = train(model, data, mse, config, device="cpu")
    train(twin, data, mse, config, device="cpu")
    assert report.steps == 150 and len(report.losses) == 150 and report.device == "cpu"
    assert sum(report.losses[-10:]) < 0.2 * sum(report.losses[:10])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert model.training and next(model.parameters()).device.type == "cpu"


def test_masked_weights_stay_exactly_zero_and_the_rest_train():
    data, model = regression()
    generator = torch.Generator().manual_seed(1)
    masks = {"0.weight": torch.rand(16, 8, generator=generator) > 0.5,
             "2.weight": torch.rand(3, 16, generator=generator) > 0.7}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, data, mse, TrainingConfig(steps=40, batch_size=32, learning_rate=1e-2), masks=masks, device="cpu")
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (parameters[name][~mask] == 0).all()
        assert (parameters[name][mask] != before[name][mask]).all()


def test_masks_must_name_parameters_of_the_right_shape():
    _, model = regression()
    with pytest.raises(InvalidArgument, match="names no module"):
        masked_parameters(model, {"9.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(InvalidArgument, match="names no parameter"):
        masked_parameters(model, {"0.scale": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(InvalidArgument, match=r"mask '0.weight' is \(8, 16\), the parameter \(16, 8\)"):
        masked_parameters(model, {"0.weight": torch.ones(8, 16, dtype=torch.bool)})


def test_data_must_be_tensors_of_one_length():
    _, model = regression()
    with pytest.raises(InvalidArgument, match=r"lengths \[4, 5\]"):
        train(model, (torch.zeros(4, 8), torch.zeros(5, 3)), mse, TrainingConfig(steps=1), device="cpu")
