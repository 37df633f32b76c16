"""QAT: the fake-quantized forward is the compressor's RTN bit for bit, the backward is the STE, and
finalized weights are a fixed point of the exporter's RTN at the same grid (quantize → dequantize gives
back exactly the same floats)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from services.compressor.quant.rtn import quantize
from services.compressor.train.loop import TrainingConfig, train
from services.compressor.train.qat import InputRange, finalize_qat, on_grid, prepare_qat
from services.exporter.formats.onnx_weights import activation_qparams
from shared.errors import FailedPrecondition, InvalidArgument
from shared.quant.grids import GGUF_GRIDS, Granularity, Grid, ScaleRule

GRIDS = [Grid(4, Granularity.PER_CHANNEL), Grid(4, Granularity.PER_TENSOR), Grid(4, Granularity.PER_CHANNEL, 0, False),
         Grid(4, Granularity.PER_GROUP, 32, True), Grid(4, Granularity.PER_GROUP, 32, False), Grid(8, Granularity.PER_CHANNEL),
         GGUF_GRIDS["q4_0"], GGUF_GRIDS["q8_0"], GGUF_GRIDS["q4_1"]]


def convnet(seed: int = 0) -> nn.Module:
    """Every weight has a multiple of 32 columns (conv: 8·2·2), so GGUF blocks and groups of 32 fit."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(8, 16, 2), nn.ReLU(), nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 4))


def classification(seed: int = 0, examples: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(examples, 8, 5, 5, generator=generator)
    return x, (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()


def cross_entropy(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def rtn_round_trip(weight: torch.Tensor, grid: Grid) -> np.ndarray:
    """What the exporter's reader sees: RTN codes and scales at `grid`, dequantized."""
    return quantize(weight.detach().reshape(weight.shape[0], -1).numpy(), grid).dequantize()


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.name)
def test_finalized_weights_are_reproduced_exactly_by_rtn(grid):
    model = prepare_qat(convnet(), grid)
    report = train(model, classification(), cross_entropy, TrainingConfig(steps=25, batch_size=32, learning_rate=1e-2),
                   device="cpu")
    assert report.steps == 25
    finalize_qat(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert set(model.state_dict()) == set(convnet().state_dict())
    for index in (0, 3, 5):
        weight = model[index].weight.detach()
        assert np.array_equal(rtn_round_trip(weight, grid), weight.reshape(weight.shape[0], -1).numpy())
    assert not torch.equal(model[3].weight, convnet()[3].weight)


def test_forward_uses_the_rtn_weights_bit_for_bit():
    grid = Grid(4, Granularity.PER_CHANNEL)
    float_model = convnet()
    model = prepare_qat(convnet(), grid)
    x = classification()[0][:4]
    with torch.no_grad():
        for index in (0, 3, 5):
            expected = rtn_round_trip(float_model[index].weight, grid).reshape(float_model[index].weight.shape)
            assert np.array_equal(model[index].weight.numpy(), expected)
            float_model[index].weight.copy_(torch.from_numpy(expected))
        assert torch.equal(model(x), float_model(x))
    assert torch.equal(on_grid(float_model[3].weight, grid), float_model[3].weight)


def test_the_gradient_passes_straight_through():
    """The seed's STE worked example (chapter 6) with a grid of the repository: w = 0.37 beside 12.7 under
    int8 per tensor gives scale 12.7/127 = 0.1, stored as float16 0.0999755859375, so FakeQuant(0.37) =
    4 · 0.0999755859375. With ∂L/∂ŵ = −0.05 the STE gives ∂L/∂w = −0.05, and an SGD step at lr 0.005 moves
    w to 0.37 − 0.005 · (−0.05) = 0.37025, up towards the level 0.4. (The seed writes 0.37 + 0.005 · (−0.05)
    = 0.36975 and says the weight moves down: a sign slip; a negative gradient raises the weight.)"""
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.37, 12.7]]))
    prepare_qat(layer, Grid(8, Granularity.PER_TENSOR))
    assert layer.weight[0, 0].item() == 4 * 0.0999755859375
    (layer.weight * torch.tensor([[-0.05, 0.0]])).sum().backward()
    latent = layer.parametrizations.weight.original
    assert latent.grad[0].tolist() == pytest.approx([-0.05, 0.0])
    torch.optim.SGD([latent], lr=0.005).step()
    assert latent[0, 0].item() == pytest.approx(0.37025, abs=1e-7)


def test_pruned_weights_stay_zero_through_qat():
    grid = Grid(4, Granularity.PER_CHANNEL, 0, False)
    model = convnet()
    generator = torch.Generator().manual_seed(2)
    masks = {"3.weight": torch.rand(32, 256, generator=generator) > 0.5}
    with torch.no_grad():
        model[3].weight.mul_(masks["3.weight"])
    prepare_qat(model, grid)
    train(model, classification(), cross_entropy, TrainingConfig(steps=10, batch_size=32, learning_rate=1e-2),
          masks=masks, device="cpu")
    finalize_qat(model)
    assert (model[3].weight[~masks["3.weight"]] == 0).all()
    assert np.array_equal(rtn_round_trip(model[3].weight, grid), model[3].weight.detach().numpy())


def test_activations_are_fake_quantized_with_the_exporters_uint8_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 4))
    prepare_qat(model, Grid(8, Granularity.PER_CHANNEL), activations=True)
    x = torch.randn(64, 32) * 3
    train(model, (x, torch.zeros(64, 4)), lambda m, b: F.mse_loss(m(b[0]), b[1]),
          TrainingConfig(steps=4, batch_size=16), device="cpu")
    observed = model.get_submodule("0")
    with torch.no_grad():
        seen = model.eval()(x)
        weight, bias = observed.weight.clone(), observed.bias.clone()       # dq(w) while prepared
    ranges = finalize_qat(model)
    low, high = ranges["0"]
    assert low < 0 < high
    scale, zero = activation_qparams(low, high)
    fake = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero), 0, 255)
    assert torch.equal(seen, F.linear(fake, weight, bias))
    assert not torch.equal(fake, x)
    for low, high in [(-1.5, 2.25), (0.5, 3.0), (-4.0, -1.0), (0.0, 0.0)]:
        scale, zero = activation_qparams(low, high)
        assert InputRange(low, high).qparams() == (float(scale), int(zero))


def test_unsupported_grids_and_shapes_are_refused_by_name():
    with pytest.raises(InvalidArgument, match="scale mse") as raised:
        prepare_qat(convnet(), Grid(4, Granularity.PER_CHANNEL, rule=ScaleRule.MSE))
    assert raised.value.field == "qat.grid"
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(InvalidArgument, match="group_size 32 do not divide the 9 input columns of 0.weight"):
        prepare_qat(model, Grid(4, Granularity.PER_GROUP, 32))
    prepare_qat(model, Grid(4, Granularity.PER_GROUP, 32), skip=("0",))
    assert not parametrize.is_parametrized(model[0]) and parametrize.is_parametrized(model[2])


def test_prepare_and_finalize_must_pair_up():
    model = prepare_qat(convnet(), GGUF_GRIDS["q8_0"])
    with pytest.raises(FailedPrecondition, match="already prepared"):
        prepare_qat(model, GGUF_GRIDS["q8_0"])
    assert finalize_qat(model) == {}
    with pytest.raises(FailedPrecondition, match="not prepared"):
        finalize_qat(model)
