"""RTN quantization: the vectorised kernels (rtn.py) against their slow twin (reference.py), against
gguf-py's own numpy quantizers, against the seed's worked examples, and the grid/config rules."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from services.compressor.quant import reference, rtn
from shared.errors import InvalidArgument
from shared.quant.grids import GGUF_GRIDS, Granularity, Grid, Method, QuantizationConfig, ScaleRule
from shared.quant.codecs import codec_for, roundf
from shared.quant.qtensor import GgufTensor, QuantizedTensor, pack_codes, packed_shape, unpack_codes

MINMAX_GRIDS = [
    Grid(8, Granularity.PER_TENSOR, 0, True),
    Grid(8, Granularity.PER_TENSOR, 0, False),
    Grid(8, Granularity.PER_CHANNEL, 0, True),
    Grid(8, Granularity.PER_CHANNEL, 0, False),
    *[Grid(4, Granularity.PER_GROUP, g, sym) for g in (32, 64, 128) for sym in (True, False)],
]
LEGACY_GGUF = [GGUF_GRIDS[t] for t in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")]
ALL_GRIDS = MINMAX_GRIDS


def _weights(seed: int, rows: int = 8, columns: int = 256) -> np.ndarray:
    """Gaussian weights with a few large outliers, an all-positive row and an all-zero group."""
    rng = np.random.default_rng(seed)
    W = rng.normal(0.0, 0.05, size=(rows, columns)).astype(np.float32)
    for r, c in zip(rng.integers(0, rows, 6), rng.integers(0, columns, 6)):
        W[r, c] = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 3.0)
    W[1] = np.abs(W[1])                      # skewed row: zero point at the bottom
    W[2, :32] = 0.0                          # a zero group: scale 0 must not divide by zero
    return W


def _signed(codes: np.ndarray, bits: int) -> list:
    return (codes.astype(int) - (1 << (bits - 1))).tolist()


# ------------------------------------------------------------------ fast == reference, exactly
@pytest.mark.parametrize("grid", ALL_GRIDS, ids=lambda g: g.name)
@pytest.mark.parametrize("seed, ties", [(0, False), (1, False), (2, True)])
def test_fast_quantize_matches_reference_exactly(grid, seed, ties):
    W = _weights(seed)
    if ties:
        W = np.round(W * 64) / 64                                          # many exact .5 ratios
    fast = rtn.quantize(W, grid)
    codes, scales, zeros = reference.quantize(W, grid)
    assert fast.codes.dtype == np.uint8 and fast.scales.dtype == np.float16
    np.testing.assert_array_equal(fast.codes.astype(np.int64), codes)
    np.testing.assert_array_equal(fast.scales.astype(np.float64), scales)
    np.testing.assert_array_equal(fast.zero_points().astype(np.int64), zeros)
    if grid.symmetric:
        assert fast.zeros is None
    assert fast.scales.shape == scales.shape


@pytest.mark.parametrize("grid", [MINMAX_GRIDS[3], MINMAX_GRIDS[5]], ids=lambda g: g.name)
def test_row_chunking_does_not_change_results(grid):
    """More rows than ROW_CHUNK: each row's result equals quantizing that row on its own."""
    W = _weights(7, rows=rtn.ROW_CHUNK + 5, columns=64)
    whole = rtn.quantize(W, grid)
    for r in (0, rtn.ROW_CHUNK - 1, rtn.ROW_CHUNK, rtn.ROW_CHUNK + 4):
        alone = rtn.quantize(W[r:r + 1], grid)
        np.testing.assert_array_equal(whole.codes[r], alone.codes[0])
        np.testing.assert_array_equal(whole.scales[r], alone.scales[0])
        np.testing.assert_array_equal(whole.zero_points()[r], alone.zero_points()[0])


def test_quantize_rejects_non_2d_and_indivisible_groups():
    with pytest.raises(ValueError, match="2-D"):
        rtn.quantize(np.zeros(64, np.float32), GGUF_GRIDS["q8_0"])
    with pytest.raises(InvalidArgument) as info:
        rtn.quantize(np.zeros((2, 576), np.float32), Grid(4, Granularity.PER_GROUP, 128))
    assert info.value.field == "quantization.group_size"


def test_roundf_rounds_halves_away_from_zero():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -1.4], dtype=np.float32)
    np.testing.assert_array_equal(roundf(x), [1, 2, 3, -1, -3, 0, -1])


# ------------------------------------------------------------------ bit-identical to gguf-py
@pytest.mark.parametrize("block_type", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
@pytest.mark.parametrize("seed", [0, 3])
def test_ggml_grids_bit_identical_to_gguf_py(block_type, seed):
    """gguf-py's numpy quantizers are bit-identical to llama.cpp's quantize_row_*_ref."""
    W = _weights(seed, rows=6, columns=128)
    W[4, 32:64] = np.linspace(-1.0, 1.0, 32, dtype=np.float32)     # exact ties at .5 after scaling
    W[5, 64:96] = -W[5, 64:96].max() * 2                              # max|v| repeated, negative
    ours = rtn.quantize(W, GGUF_GRIDS[block_type])
    theirs = gguf.quants.quantize(W, getattr(gguf.GGMLQuantizationType, block_type.upper()))
    assert isinstance(ours, GgufTensor) and ours.grid.gguf_type == block_type
    assert ours.data.dtype == np.uint8 and ours.data.shape == theirs.shape
    assert ours.data.tobytes() == theirs.tobytes()


@pytest.mark.parametrize("grid", LEGACY_GGUF, ids=lambda g: g.name)
def test_legacy_fit_encodes_what_it_dequantizes(grid):
    """A fit's (scale, offset) are computed from the stored float16 values: codes chosen against the fit
    decode, through gguf-py (= llama.cpp), to exactly codec.dequantize — what GPTQ relies on."""
    W = _weights(4, rows=5, columns=64).reshape(-1, 32)
    codec = codec_for(grid, 64)
    fit = codec.fit(W)
    codes = codec.nearest(W, fit)
    decoded = gguf.quants.dequantize(codec.encode(fit, codes), getattr(gguf.GGMLQuantizationType,
                                                                       grid.gguf_type.upper()))
    np.testing.assert_array_equal(decoded, codec.dequantize(codes, fit))


@pytest.mark.parametrize("grid", LEGACY_GGUF + MINMAX_GRIDS[4:], ids=lambda g: g.name)
def test_importance_weighting_lowers_weighted_error(grid):
    rng = np.random.default_rng(9)
    W = rng.standard_normal((64, 128)).astype(np.float32)
    importance = rng.gamma(0.5, 1.0, 128).astype(np.float32)          # a few channels dominate
    plain = rtn.quantize(W, grid).dequantize()
    weighted = rtn.quantize(W, grid, importance).dequantize()
    error = lambda Q: float((((W - Q) ** 2) * importance).sum())       # noqa: E731
    assert error(weighted) < 0.97 * error(plain)


def test_q4_0_uses_signed_value_of_largest_magnitude():
    block = np.zeros((1, 32), np.float32)
    block[0, 3], block[0, 9] = 0.5, -0.8                               # largest magnitude is negative
    fit, codes = codec_for(GGUF_GRIDS["q4_0"], 32).rtn(block)
    assert float(fit.stored["d"][0]) == pytest.approx(0.1, abs=1e-4)    # d = -0.8 / -8, as float16
    assert codes[0, 9] == 0 and codes[0, 3] == 13 and codes[0, 0] == 8
    np.testing.assert_allclose(rtn.quantize(block, GGUF_GRIDS["q4_0"]).dequantize()[0, [3, 9]], [0.5, -0.8],
                               atol=1e-3)


# ------------------------------------------------------------------ the seed's worked examples
def test_seed_chapter1_asymmetric_uint8_example():
    x = np.array([[0.5, 1.2, -0.3, 0.8]], dtype=np.float32)
    q = rtn.quantize(x, Grid(8, Granularity.PER_TENSOR, symmetric=False))
    assert q.codes.tolist() == [[136, 255, 0, 187]]
    assert float(q.scales[0, 0]) == pytest.approx(1.5 / 255, abs=1e-5)          # stored as float16
    assert q.zeros.tolist() == [[51]]
    np.testing.assert_allclose(q.dequantize(), x, atol=float(q.scales[0, 0]) / 2)


SEED_W = np.array([[0.01, -0.02, 0.015, -0.005], [1.5, -2.0, 0.8, -1.2]], dtype=np.float32)


def test_seed_chapter2_per_tensor_collapses_small_row():
    q = rtn.quantize(SEED_W, Grid(8, Granularity.PER_TENSOR))
    assert q.scales.shape == (1, 1)
    assert float(q.scales[0, 0]) == pytest.approx(2.0 / 127, abs=1e-5)
    assert _signed(q.codes, 8)[0] == [1, -1, 1, 0]                     # "terrible!", as the seed says
    assert _signed(q.codes, 8)[1] == [95, -127, 51, -76]


def test_seed_chapter2_per_channel_keeps_small_row():
    q = rtn.quantize(SEED_W, Grid(8, Granularity.PER_CHANNEL))
    np.testing.assert_allclose(q.scales.astype(np.float64)[:, 0], [0.02 / 127, 2.0 / 127], rtol=1e-3)
    # 0.01 / (0.02/127) is 63.5 exactly: float64 gives 63.50000000000001 -> 64 (the seed's answer), but
    # the seed's own float32 code computes 63.499996 -> 63. Ours divides by the float16-stored scale
    # 0.000157475 (< 0.02/127), giving 63.502 -> 64, so we agree with the seed's printed [64, ...].
    assert _signed(q.codes, 8)[0] == [64, -127, 95, -32]
    assert _signed(q.codes, 8)[1] == [95, -127, 51, -76]
    assert np.abs(q.dequantize()[0] - SEED_W[0]).max() < np.abs(
        rtn.quantize(SEED_W, Grid(8, Granularity.PER_TENSOR)).dequantize()[0] - SEED_W[0]).max() / 50


def test_seed_chapter2_per_group_example():
    row = np.array([[0.1, 0.2, 0.15, 0.12, 2.0, -1.8, 1.5, -2.1]], dtype=np.float32)
    q = rtn.quantize(row, Grid(4, Granularity.PER_GROUP, 4, True))
    np.testing.assert_allclose(q.scales.astype(np.float64)[0], [0.2 / 7, 2.1 / 7], rtol=1e-3)
    # The seed says group 1 quantizes to 3, 7, 5, 4. But 0.1 / (0.2/7) is exactly 3.5, a tie that both
    # round-half-even and round-half-away give as 4; only truncation gives 3, so that is a slip in the
    # seed. Ours: the float16 scale 0.028564 is below 0.2/7, so 0.1/scale = 3.5009 -> 4, no tie at all.
    assert _signed(q.codes, 4)[0] == [4, 7, 5, 4, 7, -6, 5, -7]
    # The single-scale alternative the seed warns about: group 1 collapses to 0 or 1 (0.15/0.3 is a
    # tie; the float16 scale 0.30005 puts it just below, at 0.49992 -> 0).
    coarse = rtn.quantize(row, Grid(4, Granularity.PER_CHANNEL))
    assert _signed(coarse.codes, 4)[0][:4] == [0, 1, 0, 0]


# ------------------------------------------------------------------ dequantization error
@pytest.mark.parametrize("grid", ALL_GRIDS, ids=lambda g: g.name)
@pytest.mark.parametrize("seed", [11, 12])
def test_dequantize_error_at_most_half_a_step_in_range(grid, seed):
    W = _weights(seed).astype(np.float64)
    q = rtn.quantize(W.astype(np.float32), grid)
    W_hat = q.dequantize()
    assert W_hat.dtype == np.float32 and W_hat.shape == W.shape
    group = grid.group_columns(W.shape[1])
    scale = np.repeat(q.scales.astype(np.float64), group, axis=1) if q.scales.shape != (1, 1) \
        else np.full(W.shape, float(q.scales[0, 0]))
    zero = np.repeat(q.zero_points().astype(np.float64), group, axis=1) if q.scales.shape != (1, 1) \
        else np.full(W.shape, float(q.zero_points()[0, 0]))
    # In range: between the dequantized values of the lowest and highest code. Outside it values clip:
    # asymmetric grids round the zero point (the top can fall short of max by up to scale/2) and q4_0
    # reaches only 7|d| on the side opposite its max.
    ends = np.stack([(0 - zero) * scale, ((1 << grid.bits) - 1 - zero) * scale])
    inside = (W >= ends.min(axis=0)) & (W <= ends.max(axis=0))
    assert inside.mean() > 0.9                                        # the bound covers most weights
    step = np.abs(scale)
    # MINMAX grids round against the float16 scale they store: half a step, up to float32 arithmetic.
    # GGML grids round against llama.cpp's float32 d but store it as float16 (relative error <= 2^-11),
    # so a code k can drift by k * |d| * 2^-11 on top, with |k| <= 128.
    slack = 128 * step * 2.0 ** -11 if grid.rule is ScaleRule.GGML else 1e-6 * step
    error = np.abs(W_hat - W)
    assert np.all(error[inside] <= (step / 2 + slack)[inside] + 1e-9)
    assert np.all(error[~inside] <= 1.5 * step[~inside])             # clipped values lose at most a step


def _snr_db(W: np.ndarray, W_hat: np.ndarray) -> float:
    return 10 * np.log10(np.sum(W.astype(np.float64) ** 2) / np.sum((W - W_hat).astype(np.float64) ** 2))


def test_snr_on_gaussian_weights():
    W = np.random.default_rng(5).normal(0, 0.02, size=(64, 512)).astype(np.float32)
    snr_int8 = _snr_db(W, rtn.quantize(W, Grid(8, Granularity.PER_CHANNEL)).dequantize())
    snr_int4 = _snr_db(W, rtn.quantize(W, Grid(4, Granularity.PER_GROUP, 32)).dequantize())
    snr_tensor4 = _snr_db(W, rtn.quantize(W, Grid(4, Granularity.PER_TENSOR)).dequantize())
    assert snr_int8 > 35
    assert snr_int4 > 15
    assert snr_int8 > snr_int4 > snr_tensor4            # finer grids and more bits both help


def test_dequantize_all_zero_tensor_is_zero():
    W = np.zeros((2, 128), np.float32)
    for grid in ALL_GRIDS:
        q = rtn.quantize(W, grid)
        assert np.all(q.scales == 0)
        np.testing.assert_array_equal(q.dequantize(), W)
    for grid in LEGACY_GGUF:
        np.testing.assert_array_equal(rtn.quantize(W, grid).dequantize(), W)


# ------------------------------------------------------------------ packing
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_unpack_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=(5, 64), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == packed_shape(5, 64, bits)
    np.testing.assert_array_equal(unpack_codes(packed, bits), codes)


def test_pack_4bit_nibble_order():
    codes = np.array([[0x1, 0xA, 0xF, 0x0]], dtype=np.uint8)
    assert pack_codes(codes, 4).tolist() == [[0xA1, 0x0F]]             # element 2i in the low nibble
    assert pack_codes(codes & 3, 2).tolist() == [[0x21, 0x03]]         # up to 4 bits share the nibble layout


def test_quantized_tensor_round_trips_through_packing():
    q = rtn.quantize(_weights(2), Grid(4, Granularity.PER_GROUP, 64, False))
    restored = QuantizedTensor(q.grid, unpack_codes(pack_codes(q.codes, 4), 4), q.scales, q.zeros)
    np.testing.assert_array_equal(restored.dequantize(), q.dequantize())


# ------------------------------------------------------------------ grids and config validation
@pytest.mark.parametrize("kwargs, field", [
    (dict(bits=0, granularity=Granularity.PER_CHANNEL), "quantization.bits"),
    (dict(bits=9, granularity=Granularity.PER_CHANNEL), "quantization.bits"),
    (dict(bits=1, granularity=Granularity.PER_CHANNEL), "quantization.bits"),
    (dict(bits=4, granularity=Granularity.PER_GROUP, group_size=1), "quantization.group_size"),
    (dict(bits=4, granularity=Granularity.PER_GROUP, group_size=-32), "quantization.group_size"),
    (dict(bits=4, granularity=Granularity.PER_CHANNEL, scale=ScaleRule.PERCENTILE, percentile=40.0),
     "quantization.percentile"),
    (dict(bits=4, granularity=Granularity.PER_CHANNEL, scale=ScaleRule.GGML), "quantization.scale"),
    (dict(bits=4, granularity=Granularity.PER_GROUP), "quantization.group_size"),
    (dict(bits=8, granularity=Granularity.PER_CHANNEL, group_size=32), "quantization.group_size"),
    (dict(bits=8), "quantization.granularity"),
    (dict(gguf_type="q7_0"), "quantization.type"),
    (dict(gguf_type="q4_k", scale=ScaleRule.MSE), "quantization.type"),
    (dict(gguf_type="q4_0", bits=4), "quantization.type"),
    (dict(gguf_type="f16"), "quantization.method"),                  # method defaults to rtn
    (dict(gguf_type="f32", method=Method.RTN), "quantization.method"),
    (dict(gguf_type="q8_0", method=Method.NONE), "quantization.method"),
    (dict(method=Method.NONE, bits=8), "quantization"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        QuantizationConfig(**kwargs).validated()
    assert info.value.field == field
    assert info.value.metadata["field"] == field
    assert info.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("config, grid", [
    (QuantizationConfig(Method.RTN, gguf_type="q8_0"), GGUF_GRIDS["q8_0"]),
    (QuantizationConfig(Method.RTN, gguf_type="q4_0"), GGUF_GRIDS["q4_0"]),
    (QuantizationConfig(Method.NONE, gguf_type="f16"), None),
    (QuantizationConfig(Method.NONE), None),
    (QuantizationConfig(Method.RTN, bits=4, granularity=Granularity.PER_GROUP, group_size=128, symmetric=False),
     Grid(4, Granularity.PER_GROUP, 128, False)),
    (QuantizationConfig(Method.RTN, bits=8, granularity=Granularity.PER_TENSOR), Grid(8, Granularity.PER_TENSOR)),
])
def test_valid_configs_and_their_grids(config, grid):
    assert config.validated() is config
    assert config.grid() == grid


def test_grid_names_and_shape_check():
    assert Grid(4, Granularity.PER_GROUP, 32, False).name == "int4/g32/asym"
    assert Grid(8, Granularity.PER_CHANNEL).name == "int8/per_channel/sym"
    assert GGUF_GRIDS["q4_0"].name == "q4_0" and GGUF_GRIDS["q4_0"].levels == 16
    Grid(4, Granularity.PER_GROUP, 64).check_shape(3, 576)                 # 576 = 9 * 64
    Grid(8, Granularity.PER_CHANNEL).check_shape(3, 577)                   # no groups, no constraint
    with pytest.raises(InvalidArgument) as info:
        Grid(4, Granularity.PER_GROUP, 128).check_shape(3, 576, "model.layers.0.mlp.down_proj.weight")
    assert info.value.field == "quantization.group_size"
    assert "576" in info.value.message and "down_proj" in info.value.message
