"""Mixed precision on the tiny llama with real calibration statistics: the allocation stays within the
budget, spends it where the calibration-weighted error drops most per bit, is recorded in the compressed
file, and an impossible budget is a precise error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.calibrator.stats import CalibrationConfig, CalibrationStats, calibrate, write_stats
from services.compressor.compress import Calibration, compress
from services.compressor.mixed import allocate
from shared.errors import FailedPrecondition
from shared.models.bundle import ModelDir
from shared.models.decoder_config import is_linear_weight
from shared.quant.compressed import CompressedModel
from shared.quant.grids import Granularity, Method, MixedPrecision, QuantizationConfig

SHA = "b" * 64


@pytest.fixture(scope="module")
def tiny_stats(tiny_model_dir, assets, tmp_path_factory):
    model = ModelDir(tiny_model_dir)
    path = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    text = (Path(assets) / "data" / "calib.txt").read_text()[:20_000]
    write_stats(path, calibrate(model, text, CalibrationConfig(4, 64, hessians="all")), {"model": SHA, "dataset": "x"})
    return model, CalibrationStats.open(path)


def _linears(model):
    return [n for n in model.tensor_names() if is_linear_weight(n)]


@pytest.mark.parametrize("budget", [4.8, 6.0, 7.5])
def test_allocation_respects_the_budget_and_buys_the_steepest_drops(tiny_stats, budget):
    model, stats = tiny_stats
    recipe = QuantizationConfig(Method.RTN, gguf_type="q4_0", mixed=MixedPrecision(("q4_0", "q5_0", "q8_0"), budget))
    allocation = allocate(model, _linears(model), recipe, stats)
    assert allocation.bits_per_weight <= budget + 1e-9
    assert allocation.bits_per_weight > budget - 4.0                       # the budget is used, not ignored
    chosen = {name: grid.name for name, grid in allocation.grids.items()}
    assert set(chosen.values()) <= {"q4_0", "q5_0", "q8_0"}
    for name, options in allocation.sensitivity.items():                 # more bits never cost error here
        assert options["q8_0"] <= options["q5_0"] <= options["q4_0"]


def test_more_budget_never_raises_the_total_error(tiny_stats):
    model, stats = tiny_stats
    totals = []
    for budget in (4.6, 5.5, 6.5, 8.5):
        recipe = QuantizationConfig(Method.RTN, gguf_type="q4_0", mixed=MixedPrecision(("q4_0", "q5_0", "q8_0"), budget))
        allocation = allocate(model, _linears(model), recipe, stats)
        totals.append(sum(allocation.sensitivity[n][g.name] for n, g in allocation.grids.items()))
    assert totals == sorted(totals, reverse=True) and totals[-1] < totals[0]


def test_allocation_is_recorded_with_the_artifact(tiny_stats, tmp_path):
    model, stats = tiny_stats
    recipe = QuantizationConfig(Method.IMATRIX, bits=4, granularity=Granularity.PER_GROUP, group_size=32,
                                mixed=MixedPrecision(("3", "4", "8"), 5.0))
    out = tmp_path / "c.safetensors"
    result = compress(model, SHA, recipe, out, calibration=Calibration(stats=stats))
    stored = CompressedModel(out)
    recorded = stored.metadata["mixed_precision"]
    assert recorded["budget_bits_per_weight"] == 5.0 and recorded["bits_per_weight"] <= 5.0
    grids = {p.name: p.grid.name for p in stored.plans if p.grid is not None}
    assert grids == recorded["allocation"]
    assert {t.name: t.grid for t in result.tensors} == grids
    assert json.dumps(recorded)                                            # plain JSON, readable by any tool


def test_budget_below_the_cheapest_option_is_a_precise_error(tiny_stats):
    model, stats = tiny_stats
    recipe = QuantizationConfig(Method.RTN, gguf_type="q4_0", mixed=MixedPrecision(("q4_0", "q8_0"), 3.0))
    with pytest.raises(FailedPrecondition) as info:
        allocate(model, _linears(model), recipe, stats)
    assert info.value.field == "quantization.mixed_precision.max_bits_per_weight" and "4.500" in info.value.message
