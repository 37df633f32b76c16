"""Quantization-aware training with the straight-through estimator (Bengio et al. 2013; Jacob et al.
2018), at the compressor's own grids.

Every nn.Linear and nn.Conv2d weight (rows = output channels, columns = in·kh·kw) is parametrized:
the forward pass sees

    ŵ = dq(w) + (w − w.detach())

where dq is the repository's RTN (`services.compressor.quant.rtn.quantize`, then `.dequantize()`: the
codes and float16 scales the exporter writes, dequantized as a reader does). The second term is exactly
zero in value and the identity in the backward pass, so the forward weight is dq(w) bit for bit and
∂L/∂w = ∂L/∂ŵ (STE). Written as w + (dq(w) − w).detach() the forward value would carry float rounding.

With `activations`, each layer's input is fake-quantized to uint8 per tensor — the exporter's static
QDQ scheme (`activation_qparams`: range widened to contain 0, scale = (high − low)/255) — over an
exponential moving average of the training batches' min and max; gradients pass inside the range.

`finalize_qat` writes dq(w) into the weights, applying dq again until the value stops changing, so
that quantizing a finalized weight at the same grid gives back exactly the same floats: the exporter's
RTN reproduces QAT's weights bit for bit. For symmetric MINMAX grids one pass is already a fixed point:
the extreme weight lands on ±qmax·s16 (s16 the stored float16 scale), whose product with an integer
≤ 255 is exact in float32, so the refit scale is qmax·s16/qmax = s16 exactly and every weight's code
is an exact integer again; GGUF Q4_0/Q8_0 likewise. Asymmetric groups can need two or three passes (a
float16 scale rounded up can pull the top weight's code down by one, narrowing the range). MSE and
percentile scales search or clip anew on every pass and need not settle: prepare_qat refuses them,
and a grid that does not settle within FIXED_POINT_PASSES passes is refused by name.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from services.compressor.prune.masks import prunable_weights
from services.compressor.quant.rtn import quantize
from shared.errors import FailedPrecondition, InvalidArgument
from shared.quant.grids import Grid, ScaleRule

FIXED_POINT_PASSES = 4
RANGE_MOMENTUM = 0.9                 # weight of the running range against each new batch's
STATE = "_edgeforge_qat"             # the model attribute that holds a prepared model's QatState


def on_grid(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """dq(w): the weight after the compressor's RTN and dequantization, same shape, dtype and device.
    Computed in NumPy on the CPU (the codecs' own code), whatever the weight's device."""
    rows = weight.shape[0]
    flat = weight.detach().reshape(rows, -1).float().cpu().numpy()        # (out, in·kh·kw)
    values = np.asarray(quantize(flat, grid).dequantize(), dtype=np.float32)
    return torch.from_numpy(values).reshape(weight.shape).to(device=weight.device, dtype=weight.dtype)


class WeightFakeQuant(nn.Module):
    """The parametrization: w -> dq(w) forward, identity backward."""

    def __init__(self, grid: Grid):
        super().__init__()
        self.grid = grid

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return on_grid(weight, self.grid) + (weight - weight.detach())


@dataclasses.dataclass
class InputRange:
    """Running (min, max) of one layer's input, the EMA of each training batch's."""
    low: float | None = None
    high: float | None = None

    def update(self, x: torch.Tensor) -> None:
        low, high = float(x.min()), float(x.max())
        if self.low is None:
            self.low, self.high = low, high
        else:
            self.low = RANGE_MOMENTUM * self.low + (1 - RANGE_MOMENTUM) * low
            self.high = RANGE_MOMENTUM * self.high + (1 - RANGE_MOMENTUM) * high

    def qparams(self) -> tuple[float, int]:
        """(scale, zero point) of uint8 over the range widened to contain 0, as the exporter computes them."""
        low, high = min(self.low, 0.0), max(self.high, 0.0)
        scale = float(np.float32((high - low) / 255.0))
        if not np.isfinite(scale) or scale <= 0.0:
            return 1.0, 0
        return scale, int(np.clip(round(-low / scale), 0, 255))


def input_hook(observed: InputRange):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if module.training:
            observed.update(x.detach())
        if observed.low is None:                   # evaluated before any training step: nothing to go by
            return args
        scale, zero = observed.qparams()
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255),) + args[1:]
    return hook


@dataclasses.dataclass
class QatState:
    grid: Grid
    layers: dict[str, nn.Module]                   # module name -> the Linear/Conv2d whose weight is parametrized
    ranges: dict[str, InputRange]                  # module name -> its input range (activations only)
    hooks: list                                    # torch RemovableHandles of the input hooks


def weight_name(module: str) -> str:
    return f"{module}.weight" if module else "weight"


def prepare_qat(model: nn.Module, grid: Grid, *, activations: bool = False, skip: tuple[str, ...] = ()) -> nn.Module:
    """Makes `model` (in place, returned) train with fake-quantized weights on `grid` — every nn.Linear
    and nn.Conv2d except those named in `skip` (and a linear tied to an embedding) — and, with
    `activations`, fake-quantized uint8 inputs to those layers. Train it with `loop.train`, then call
    `finalize_qat`. A layer whose columns the grid's blocks do not divide is InvalidArgument naming it."""
    if getattr(model, STATE, None) is not None:
        raise FailedPrecondition("the model is already prepared for QAT; finalize_qat it first", field="qat")
    if grid.rule in (ScaleRule.MSE, ScaleRule.PERCENTILE):
        raise InvalidArgument(f"QAT needs a grid whose RTN reproduces its own output; scale {grid.rule.value} "
                              "searches or clips the range again on every pass and does not settle; use minmax "
                              "or a GGUF type", reason="UNSUPPORTED_OP", field="qat.grid")
    weights = prunable_weights(model, skip)
    owners = [name.rpartition(".")[0] for name in weights]                # "fc.weight" -> "fc"; a bare layer: ""
    layers = {owner: model.get_submodule(owner) for owner in owners}
    for name, layer in layers.items():
        grid.check_shape(layer.weight.shape[0], layer.weight[0].numel(), tensor=weight_name(name))
    ranges: dict[str, InputRange] = {}
    hooks = []
    for name, layer in layers.items():
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant(grid))
        if activations:
            ranges[name] = InputRange()
            hooks.append(layer.register_forward_pre_hook(input_hook(ranges[name])))
    setattr(model, STATE, QatState(grid, layers, ranges, hooks))
    return model


def snap(weight: torch.Tensor, grid: Grid, name: str) -> torch.Tensor:
    """dq applied until it is a fixed point: dq(result) == result exactly."""
    value = on_grid(weight, grid)
    for _ in range(FIXED_POINT_PASSES):
        again = on_grid(value, grid)
        if torch.equal(again, value):
            return value
        value = again
    raise FailedPrecondition(f"{name}: RTN at {grid.name} does not reproduce its own output within "
                             f"{FIXED_POINT_PASSES} passes, so QAT weights could not lie exactly on the grid; "
                             "use a minmax grid", field="qat.grid")


def finalize_qat(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Writes the on-grid values into the weights, removes the parametrizations and input hooks, and
    returns the learned input ranges {module name: (min, max)} (empty without activations)."""
    state: QatState | None = getattr(model, STATE, None)
    if state is None:
        raise FailedPrecondition("the model was not prepared with prepare_qat", field="qat")
    for name, layer in state.layers.items():
        value = snap(layer.parametrizations.weight.original.detach(), state.grid, weight_name(name))
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        with torch.no_grad():
            layer.weight.copy_(value)
    for handle in state.hooks:
        handle.remove()
    delattr(model, STATE)
    return {name: (r.low, r.high) for name, r in state.ranges.items() if r.low is not None}
