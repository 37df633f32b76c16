"""Mixed precision: per-layer bit-widths that minimise the calibration-weighted error under a size budget.

Sensitivity of linear weight l at grid option o is the output error its rounding causes on the
calibration inputs, ε_l(o) = tr(ΔW H ΔWᵀ) with H = E[x xᵀ] from the calibrator (or Σ ΔW²·E[x²]
when only the importance matrix is stored), measured with the recipe's rounding (importance-weighted
for imatrix/GPTQ recipes; GPTQ itself would lower every option's error roughly alike). The
allocation solves

    min Σ_l ε_l(o_l)   s.t.   Σ_l n_l · bits(o_l) ≤ budget · Σ_l n_l

greedily, the multiple-choice-knapsack way: start every layer at its cheapest option, then keep
taking the upgrade with the largest error drop per added bit that still fits.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from services.compressor.quant.rtn import quantize
from shared.errors import FailedPrecondition
from shared.models.bundle import ModelDir
from shared.quant.grids import Grid, Method, QuantizationConfig
from shared.quant.rules import fits
from shared.quant.grids import GGUF_GRIDS


@dataclasses.dataclass
class Allocation:
    grids: dict[str, Grid]                        # weight -> chosen grid
    sensitivity: dict[str, dict[str, float]]      # weight -> option -> ε
    bits_per_weight: float                        # achieved average over the allocated weights
    budget: float

    def to_dict(self) -> dict:
        return {"budget_bits_per_weight": self.budget, "bits_per_weight": round(self.bits_per_weight, 4),
                "allocation": {name: grid.name for name, grid in self.grids.items()},
                "sensitivity": {name: {k: float(f"{v:.6g}") for k, v in opts.items()}
                                for name, opts in self.sensitivity.items()}}


def option_grid(recipe: QuantizationConfig, option: str, columns: int) -> Grid:
    if recipe.gguf_type:
        return GGUF_GRIDS[fits(option, columns)]
    return recipe.option_grid(option)


def output_error(W: np.ndarray, Q: np.ndarray, hessian: np.ndarray | None, importance: np.ndarray) -> float:
    delta = (W - Q).astype(np.float64)
    if hessian is not None:
        return float(np.einsum("ij,jk,ik->", delta, hessian.astype(np.float64), delta))
    return float((delta * delta * importance.astype(np.float64)).sum())


def allocate(model: ModelDir, names: list[str], recipe: QuantizationConfig, stats) -> Allocation:
    """Chooses a grid for each weight in `names` (the recipe's quantized linears)."""
    mixed = recipe.mixed
    shapes = model.config.tensor_shapes()
    sensitivity: dict[str, dict[str, float]] = {}
    options: dict[str, list[tuple[float, float, Grid]]] = {}     # name -> [(bits, ε, grid)] by bits
    weighted = recipe.method in (Method.IMATRIX, Method.GPTQ)
    for name in names:
        W = model.array(name)
        columns = shapes[name][1]
        importance = stats.importance(name)
        hessian = stats.hessian(name) if stats.has_hessian(name) else None
        table = []
        for option in mixed.options:
            grid = option_grid(recipe, option, columns)
            grid.check_shape(*W.shape, tensor=name)
            Q = quantize(W, grid, importance if weighted else None).dequantize()
            table.append((grid.bits_per_weight(columns), output_error(W, Q, hessian, importance), grid))
        table.sort(key=lambda entry: entry[0])
        options[name] = table
        sensitivity[name] = {entry[2].name: entry[1] for entry in table}
    sizes = {name: int(np.prod(shapes[name])) for name in names}
    total = sum(sizes.values())
    budget_bits = mixed.max_bits_per_weight * total
    choice = {name: 0 for name in names}
    used = sum(options[name][0][0] * sizes[name] for name in names)
    if used > budget_bits + 1e-6:
        raise FailedPrecondition(f"mixed_precision.max_bits_per_weight {mixed.max_bits_per_weight} is below the "
                                 f"cheapest option's {used / total:.3f} bits per weight",
                                 field="quantization.mixed_precision.max_bits_per_weight")
    while True:
        best, best_gain = None, 0.0
        for name in names:
            i = choice[name]
            if i + 1 >= len(options[name]):
                continue
            bits0, err0, _ = options[name][i]
            for j in range(i + 1, len(options[name])):            # the best later option, not just the next
                bits1, err1, _ = options[name][j]
                cost = (bits1 - bits0) * sizes[name]
                if cost <= 0 or used + cost > budget_bits + 1e-6:
                    continue
                gain = (err0 - err1) / cost
                if gain > best_gain:
                    best, best_gain = (name, j, cost), gain
        if best is None:
            break
        name, j, cost = best
        choice[name] = j
        used += cost
    grids = {name: options[name][choice[name]][2] for name in names}
    return Allocation(grids, sensitivity, used / total, mixed.max_bits_per_weight)
