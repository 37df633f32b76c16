"""GPTQ: the fast kernel (Cholesky, lazy batches, static groups) against its slow twin, its effect on the
layer output error, every grid it targets (GGUF blocks included), the seed's worked example, and bad input."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from services.compressor.quant.gptq import gptq, relative_output_error
from services.compressor.quant.reference import gptq_reference
from services.compressor.quant.rtn import quantize
from shared.errors import FailedPrecondition, InvalidArgument
from shared.quant.grids import GGUF_GRIDS, GptqOptions, Granularity, Grid
from shared.quant.qtensor import GgufTensor


def _problem(rows=64, columns=256, seed=0):
    """A weight and the Hessian of correlated inputs with uneven channel energy (what makes GPTQ pay)."""
    rng = np.random.default_rng(seed)
    mix = np.eye(columns, dtype=np.float32) + 2 * rng.standard_normal((columns, columns)).astype(np.float32) / np.sqrt(columns)
    X = (rng.standard_normal((4 * columns, columns)).astype(np.float32) @ mix) * rng.gamma(1.0, 1.0, columns).astype(np.float32)
    X[:, 7] = 0.0                                                      # a dead input channel
    H = X.T @ X / len(X)
    W = rng.standard_normal((rows, columns)).astype(np.float32) * 0.05
    return W, H.astype(np.float32)


GRIDS = [Grid(4, Granularity.PER_GROUP, 32, True), Grid(3, Granularity.PER_GROUP, 64, False),
         Grid(4, Granularity.PER_CHANNEL, 0, True), Grid(8, Granularity.PER_TENSOR, 0, False),
         GGUF_GRIDS["q4_0"], GGUF_GRIDS["q5_1"], GGUF_GRIDS["q8_0"]]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.name)
@pytest.mark.parametrize("act_order", [False, True])
def test_fast_gptq_agrees_with_the_slow_twin(grid, act_order):
    W, H = _problem()
    fast = gptq(torch.from_numpy(W), torch.from_numpy(H), grid, GptqOptions(act_order=act_order, block_size=32),
                weighted_scales=False)                      # the paper's min/max group scales, as the twin
    codes, Q = gptq_reference(W, H, grid, 0.01, act_order)
    dequantized = fast.dequantized.numpy()
    # Same algorithm, different float association (float32 Cholesky vs float64 inverse): a code may flip
    # only where a value sits on a rounding boundary.
    assert np.mean(np.isclose(dequantized, Q, atol=1e-6)) > 0.99
    assert abs(relative_output_error(torch.from_numpy(W), fast.dequantized, torch.from_numpy(H))
               - relative_output_error(torch.from_numpy(W), torch.from_numpy(Q), torch.from_numpy(H))) < 1e-3
    # What is stored decodes to exactly what GPTQ compensated for.
    np.testing.assert_array_equal(fast.tensor.dequantize(), dequantized)


@pytest.mark.parametrize("grid", [Grid(4, Granularity.PER_GROUP, 64, True), GGUF_GRIDS["q4_0"],
                                  Grid(3, Granularity.PER_GROUP, 64, True)], ids=lambda g: g.name)
def test_gptq_halves_output_error_of_rtn_on_correlated_inputs(grid):
    W, H = _problem(rows=128, columns=256, seed=1)
    rtn_error = relative_output_error(torch.from_numpy(W), torch.from_numpy(quantize(W, grid).dequantize()),
                                      torch.from_numpy(H))
    result = gptq(torch.from_numpy(W), torch.from_numpy(H), grid)
    assert result.output_error < 0.6 * rtn_error


@pytest.mark.parametrize("bits", [3, 4])
def test_importance_weighted_group_scales_lower_the_output_error(bits):
    """Generic grids fit each group's scale with the diag(H)-weighted search by default."""
    W, H = _problem(rows=128, columns=256, seed=2)
    grid = Grid(bits, Granularity.PER_GROUP, 64, True)
    plain = gptq(torch.from_numpy(W), torch.from_numpy(H), grid, weighted_scales=False)
    weighted = gptq(torch.from_numpy(W), torch.from_numpy(H), grid)
    assert weighted.output_error < plain.output_error
    np.testing.assert_array_equal(weighted.tensor.dequantize(), weighted.dequantized.numpy())


def test_gguf_blocks_decode_in_gguf_py():
    W, H = _problem(rows=16, columns=128)
    result = gptq(torch.from_numpy(W), torch.from_numpy(H), GGUF_GRIDS["q4_0"])
    assert isinstance(result.tensor, GgufTensor) and result.tensor.data.shape == (16, 4 * 18)
    decoded = gguf.quants.dequantize(result.tensor.data, gguf.GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(decoded, result.dequantized.numpy())


def test_act_order_keeps_natural_storage_order():
    """Static groups: each group's scales come from the original weights of that group, whatever the order."""
    W, H = _problem(rows=8, columns=128, seed=3)
    grid = Grid(4, Granularity.PER_GROUP, 32, True)
    ordered = gptq(torch.from_numpy(W), torch.from_numpy(H), grid, GptqOptions(act_order=True), weighted_scales=False)
    W[:, 7] = 0.0                                      # the dead channel's weights are dropped first
    np.testing.assert_array_equal(ordered.tensor.scales, quantize(W, grid).scales)


def test_seed_worked_example_first_column():
    """Seed ch. 9: scale 0.1, 4-bit; column 0 = [0.7, 0.2, -0.6] quantizes exactly, column 1's 0.8 clamps
    to 0.7 and its error moves into column 2 through H⁻¹ (the seed's 0.3 ratio is hypothetical; here
    it is whatever the Hessian gives, and the compensation is checked against the formula)."""
    W = np.array([[0.7, -0.3, 0.5], [0.2, 0.8, -0.4], [-0.6, 0.1, 0.9]], dtype=np.float64)
    H = np.array([[2.0, 0.3, 0.1], [0.3, 1.5, 0.6], [0.1, 0.6, 1.0]])
    codes, Q = gptq_reference(W, H, Grid(4, Granularity.PER_CHANNEL), damp_percent=1e-9)
    assert np.allclose(Q[:, 0], W[:, 0], atol=0.06)                      # per-row scales here, not 0.1
    Hinv = np.linalg.inv(H)
    err = (W[1, 0] - Q[1, 0]) / Hinv[0, 0]
    expected = W[1, 1] - err * Hinv[0, 1]                                 # the update the seed describes
    assert Q[1, 1] == pytest.approx(np.clip(expected, -8 * (0.8 / 7), 7 * (0.8 / 7)), abs=0.8 / 7)


def test_hessian_that_is_not_positive_definite_is_a_precise_error():
    W = np.ones((4, 32), np.float32)
    H = -np.eye(32, dtype=np.float32)                                    # negative definite
    with pytest.raises(FailedPrecondition) as info:
        gptq(torch.from_numpy(W), torch.from_numpy(H), GGUF_GRIDS["q4_0"], name="model.layers.3.mlp.up_proj.weight")
    assert "model.layers.3.mlp.up_proj.weight" in info.value.message and "damp_percent" in info.value.message
    assert info.value.field == "quantization.gptq.damp_percent"


def test_bad_hessians_and_shapes():
    W = np.ones((4, 64), np.float32)
    with pytest.raises(InvalidArgument, match="expected \\(64, 64\\)"):
        gptq(torch.from_numpy(W), torch.eye(32), GGUF_GRIDS["q4_0"])
    H = torch.eye(64)
    H[3, 3] = float("nan")
    with pytest.raises(FailedPrecondition, match="NaN"):
        gptq(torch.from_numpy(W), H, GGUF_GRIDS["q4_0"])
    with pytest.raises(InvalidArgument, match="do not divide"):
        gptq(torch.from_numpy(np.ones((4, 48), np.float32)), torch.eye(48), GGUF_GRIDS["q4_0"])


def test_dead_inputs_get_zero_weight():
    W, H = _problem(rows=8, columns=64)
    result = gptq(torch.from_numpy(W), torch.from_numpy(H), Grid(8, Granularity.PER_CHANNEL))
    assert np.all(result.dequantized.numpy()[:, 7] == 0)                  # channel 7 never fires
