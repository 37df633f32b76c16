"""Codecs: how a grid turns a run of input columns into codes and scales, and into stored bytes.

Every grid here is the affine family ŵ = q·scale − offset, q ∈ [0, 2^bits − 1], with one (scale,
offset) per *sub-block* of `sub` consecutive columns, fitted a *block* of `block` columns at a time
(a GGUF block or super-block, a group, or a whole row). That single shape is what lets every
algorithm target every grid:

- RTN:     `codec.rtn(x)` — the grid's reference rounding (llama.cpp's own for GGUF types).
- imatrix: `codec.fit(x, weights)` — a scale search weighted by per-column importance, then nearest.
- GPTQ:    `codec.fit(...)` at each block start, then `codec.nearest(column, fit, k)` column by column.
- AWQ:     RTN/imatrix of the scaled weights.

Fits store exactly what the format stores (float16 d/m, 6-bit sub-scales, integer zero points), and
`scale`/`offset` are computed from those stored values, so the codes chosen against a fit dequantize
to exactly what a reader of the file computes. K-quant codecs live in `kquants.py`.
"""
from __future__ import annotations

import abc
import dataclasses

import numpy as np

from shared.quant.grids import Granularity, Grid, ScaleRule

MSE_FACTORS = np.linspace(1 / 1.2, 1.0, 100, dtype=np.float32)    # seed ch. 9: s ∈ [max/(1.2Q), max/Q]
IMATRIX_FACTORS = np.linspace(0.5, 1.0, 51, dtype=np.float32)      # importance search: wider, with LS refit


@dataclasses.dataclass
class Fit:
    """One block's quantization parameters for every row: ŵ = q·scale[:, k] − offset[:, k] in sub-block k."""
    scale: np.ndarray                      # (rows, subs) float32, from the stored values
    offset: np.ndarray                     # (rows, subs) float32
    stored: dict[str, np.ndarray]          # what the format stores, each with leading dim rows


class Codec(abc.ABC):
    """Base: nearest-code rounding and dequantization shared by every grid."""
    grid: Grid
    block: int
    sub: int

    @property
    def qmax(self) -> int:
        return (1 << self.grid.bits) - 1

    @abc.abstractmethod
    def fit(self, x: np.ndarray, weights: np.ndarray | None = None) -> Fit:
        """x: (rows, block) float32; weights: per-column importance, (block,) or (rows, block)."""

    def rtn(self, x: np.ndarray, weights: np.ndarray | None = None) -> tuple[Fit, np.ndarray]:
        """Reference rounding of a block: (fit, codes (rows, block) uint8)."""
        fit = self.fit(x, weights)
        return fit, self.nearest(x, fit)

    def nearest(self, x: np.ndarray, fit: Fit, sub_index: int | None = None) -> np.ndarray:
        """Nearest codes for x under `fit`. x is (rows, block), or one column (rows,) of sub-block `sub_index`."""
        if sub_index is None:
            rows = x.shape[0]
            s = np.repeat(fit.scale, self.sub, axis=1).reshape(rows, -1)
            o = np.repeat(fit.offset, self.sub, axis=1).reshape(rows, -1)
        else:
            s, o = fit.scale[:, sub_index], fit.offset[:, sub_index]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s != 0, np.rint((x + o) / s), self.empty_code(fit, s, o))   # Q4_0's d may be < 0
        return np.clip(q, 0, self.qmax).astype(np.uint8)

    def empty_code(self, fit: Fit, s, o):
        """Code for a sub-block whose scale is 0 (all weights equal): the one nearest ŵ = −offset."""
        return 0

    def dequantize(self, codes: np.ndarray, fit: Fit) -> np.ndarray:
        rows = codes.shape[0]
        s = np.repeat(fit.scale, self.sub, axis=1).reshape(rows, -1)
        o = np.repeat(fit.offset, self.sub, axis=1).reshape(rows, -1)
        return codes.astype(np.float32) * s - o

    def encode(self, fit: Fit, codes: np.ndarray) -> np.ndarray:
        """GGUF codecs: one block's bytes (rows, bytes_per_block). Generic grids have no block bytes: their
        codes, scales and zero points are stored as arrays (`qtensor.assemble`)."""
        raise TypeError(f"grid {self.grid.name} has no GGUF block encoding; use shared.quant.qtensor.assemble")


# ---------------------------------------------------------------------------------------- searches

def weighted_error(x, xhat, w):
    d = x - xhat
    return (d * d * w).sum(axis=-1) if w is not None else (d * d).sum(axis=-1)


def search_symmetric(x: np.ndarray, w: np.ndarray | None, base: np.ndarray, lo: int, hi: int,
                     factors: np.ndarray, refit: bool) -> np.ndarray:
    """Best scale per row for codes in [lo, hi] (signed), trying base·f for f in factors.

    x: (N, n); base: (N,) starting scale (may be negative, as Q4_0's max/−8 is); w: weights or None.
    With `refit`, each candidate's codes get their weighted least-squares scale Σwxq/Σwq² (llama.cpp's
    make_qx_quants); otherwise the candidate scale is scored as is (the seed's grid search).
    """
    best = base.astype(np.float32).copy()
    best_err = np.full(x.shape[0], np.inf, dtype=np.float64)
    ww = np.ones_like(x) if w is None else np.broadcast_to(w, x.shape)
    for f in factors:
        s = (base * f).astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.where(s != 0, np.rint(x / s), 0), lo, hi)
        if refit:
            den = (ww * q * q).sum(-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.where(den > 0, (ww * x * q).sum(-1) / den, 0).astype(np.float32)[:, None]
        err = weighted_error(x, q * s, ww)
        better = err < best_err
        best = np.where(better, s[:, 0], best)
        best_err = np.where(better, err, best_err)
    return best


def search_affine(x: np.ndarray, w: np.ndarray | None, top: int, factors: np.ndarray, refit: bool,
                  keep_zero: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best (scale, low) per row for ŵ = q·scale + low, q ∈ [0, top], shrinking [min, max] by factors.

    With `refit`, (scale, low) are re-solved by weighted least squares for each candidate's codes.
    keep_zero: generic grids, whose zero point is an integer code — the range always contains 0 and
    every candidate is scored after snapping low to −zero·scale, as it will be stored.
    """
    mn, mx = x.min(-1), x.max(-1)
    if keep_zero:
        mn, mx = np.minimum(mn, 0), np.maximum(mx, 0)
    ww = np.ones_like(x) if w is None else np.broadcast_to(w, x.shape)
    best_s = ((mx - mn) / top).astype(np.float32)
    best_lo = mn.astype(np.float32)
    best_err = np.full(x.shape[0], np.inf, dtype=np.float64)

    def codes(s, lo):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.clip(np.where(s[:, None] > 0, np.rint((x - lo[:, None]) / s[:, None]), 0), 0, top)

    for f in factors:
        lo, hi = mn * f, mx * f
        s = ((hi - lo) / top).astype(np.float32)
        q = codes(s, lo)
        if refit:                                                    # min Σw(x − q·s − lo)²
            sw, swq, swqq = ww.sum(-1), (ww * q).sum(-1), (ww * q * q).sum(-1)
            swx, swqx = (ww * x).sum(-1), (ww * q * x).sum(-1)
            det = sw * swqq - swq * swq
            with np.errstate(divide="ignore", invalid="ignore"):
                s_new = np.where(det > 0, (sw * swqx - swq * swx) / det, s)
                lo_new = np.where(det > 0, (swqq * swx - swq * swqx) / det, lo)
            ok = s_new > 0
            s, lo = np.where(ok, s_new, s).astype(np.float32), np.where(ok, lo_new, lo).astype(np.float32)
            q = codes(s, lo)
        if keep_zero:
            with np.errstate(divide="ignore", invalid="ignore"):
                zero = np.where(s > 0, np.clip(np.rint(-lo / s), 0, top), 0)
            lo = (-zero * s).astype(np.float32)
            q = codes(s, lo)
        err = weighted_error(x, q * s[:, None] + lo[:, None], ww)
        better = err < best_err
        best_s, best_lo = np.where(better, s, best_s), np.where(better, lo, best_lo)
        best_err = np.where(better, err, best_err)
    return best_s, best_lo


# ------------------------------------------------------------------------------------ generic grids

class GenericCodec(Codec):
    """Integer grid with float16 scales (and uint8 zero points when asymmetric), any bits 2–8."""

    def __init__(self, grid: Grid, columns: int):
        self.grid = grid
        self.block = columns if grid.granularity is not Granularity.PER_GROUP else grid.group_size
        self.sub = self.block

    def _range_source(self, x: np.ndarray) -> np.ndarray:
        """Per-tensor grids fit one scale over every row: flatten, fit, broadcast."""
        return x.reshape(1, -1) if self.grid.granularity is Granularity.PER_TENSOR else x

    def fit(self, x: np.ndarray, weights: np.ndarray | None = None) -> Fit:
        rows = x.shape[0]
        src = self._range_source(x.astype(np.float32))
        w = None
        if weights is not None:
            w = np.broadcast_to(weights, x.shape).astype(np.float32)
            w = w.reshape(src.shape)
        rule, bits = self.grid.rule, self.grid.bits
        searched = rule is ScaleRule.MSE or w is not None
        factors = MSE_FACTORS if rule is ScaleRule.MSE else IMATRIX_FACTORS
        if self.grid.symmetric:
            qpos = (1 << (bits - 1)) - 1
            amax = np.abs(src).max(-1)
            if rule is ScaleRule.PERCENTILE:
                amax = np.percentile(np.abs(src), self.grid.percentile, axis=-1).astype(np.float32)
            scale = amax / np.float32(qpos)
            if searched:
                scale = np.abs(search_symmetric(src, w, scale, -qpos - 1, qpos, factors, refit=w is not None))
            s16 = scale.astype(np.float16)
            s = np.broadcast_to(s16.astype(np.float32)[:, None], (rows, 1)).copy()
            zero = np.float32(1 << (bits - 1))
            return Fit(s, s * zero, {"scale": np.broadcast_to(s16[:, None], (rows, 1)).copy()})
        top = (1 << bits) - 1
        if searched:
            scale, low = search_affine(src, w, top, factors, refit=w is not None, keep_zero=True)
        else:
            low, high = np.minimum(src.min(-1), 0), np.maximum(src.max(-1), 0)
            if rule is ScaleRule.PERCENTILE:
                p = self.grid.percentile
                low = np.minimum(np.percentile(src, 100 - p, axis=-1), 0)
                high = np.maximum(np.percentile(src, p, axis=-1), 0)
            scale = ((high - low) / np.float32(top)).astype(np.float32)
        s16 = scale.astype(np.float16)
        s = s16.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.where(s > 0, np.clip(np.rint(-low / s), 0, top), 0).astype(np.uint8)
        s_rows = np.broadcast_to(s[:, None], (rows, 1)).copy()
        z_rows = np.broadcast_to(zero[:, None], (rows, 1)).copy()
        return Fit(s_rows, s_rows * z_rows.astype(np.float32),
                   {"scale": np.broadcast_to(s16[:, None], (rows, 1)).copy(), "zero": z_rows})

    def empty_code(self, fit, s, o):
        return (1 << (self.grid.bits - 1)) if self.grid.symmetric else 0     # scale 0: every code gives ŵ = 0


# ---------------------------------------------------------------------------- legacy GGUF blocks

def roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), formed in float64 so |x| just below k + 0.5 stays exact."""
    x64 = x.astype(np.float64)
    return np.copysign(np.floor(np.abs(x64) + 0.5), x64)


def _f16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 stored, its float32 value)."""
    v16 = values.astype(np.float16)
    return v16, v16.astype(np.float32)


class LegacyCodec(Codec):
    """Q8_0, Q4_0, Q5_0 (d·(q − z)) and Q4_1, Q5_1 (d·q + m): 32-weight blocks, float16 d (and m)."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.block = self.sub = 32
        self.affine = grid.gguf_type in ("q4_1", "q5_1")
        self.zero = {"q8_0": 128, "q4_0": 8, "q5_0": 16}.get(grid.gguf_type, 0)

    def _fit_from(self, d: np.ndarray, m: np.ndarray | None) -> Fit:
        d16, df = _f16(d)
        if m is None:
            return Fit(df[:, None], (df * np.float32(self.zero))[:, None], {"d": d16})
        m16, mf = _f16(m)
        return Fit(df[:, None], (-mf)[:, None], {"d": d16, "m": m16})

    def fit(self, x: np.ndarray, weights: np.ndarray | None = None) -> Fit:
        x = x.astype(np.float32)
        if self.affine:
            if weights is None:
                mn, mx = x.min(-1), x.max(-1)
                return self._fit_from((mx - mn) / np.float32(self.qmax), mn)
            s, lo = search_affine(x, np.broadcast_to(weights, x.shape), self.qmax, IMATRIX_FACTORS, refit=True,
                                  keep_zero=False)
            return self._fit_from(s, lo)
        index = np.abs(x).argmax(-1)[:, None]
        signed_max = np.take_along_axis(x, index, -1)[:, 0]
        if self.grid.gguf_type == "q8_0":
            d = np.abs(signed_max) / np.float32(127)
            lo, hi = -127, 127
        else:
            d = signed_max / np.float32(-self.zero)                      # the extreme maps to −zero exactly
            lo, hi = -self.zero, self.qmax - self.zero
        if weights is not None:
            d = search_symmetric(x, np.broadcast_to(weights, x.shape), d, lo, hi, IMATRIX_FACTORS, refit=True)
        return self._fit_from(d, None)

    def empty_code(self, fit, s, o):
        return self.zero

    def rtn(self, x: np.ndarray, weights: np.ndarray | None = None) -> tuple[Fit, np.ndarray]:
        """llama.cpp's quantize_row_*_ref, float32 arithmetic (imatrix: weighted fit + nearest)."""
        if weights is not None:
            return super().rtn(x, weights)
        x = x.astype(np.float32)
        kind = self.grid.gguf_type
        if self.affine:
            mn, mx = x.min(-1), x.max(-1)
            d = ((mx - mn) / np.float32(self.qmax)).astype(np.float32)
            with np.errstate(divide="ignore"):
                inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
            v = ((x - mn[:, None]) * inv[:, None]).astype(np.float32) + np.float32(0.5)
            q = np.minimum(np.trunc(v), self.qmax)
            return self._fit_from(d, mn), q.astype(np.uint8)
        if kind == "q8_0":
            d = (np.abs(x).max(-1) / np.float32(127)).astype(np.float32)
            with np.errstate(divide="ignore"):
                inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
            q = roundf((x * inv[:, None]).astype(np.float32)) + 128
            return self._fit_from(d, None), q.astype(np.uint8)
        index = np.abs(x).argmax(-1)[:, None]
        d = (np.take_along_axis(x, index, -1)[:, 0] / np.float32(-self.zero)).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        v = (x * inv[:, None]).astype(np.float32) + np.float32(self.zero + 0.5)
        return self._fit_from(d, None), np.minimum(np.trunc(v), self.qmax).astype(np.uint8)

    def encode(self, fit: Fit, codes: np.ndarray) -> np.ndarray:
        rows = codes.shape[0]
        parts = [fit.stored["d"].reshape(rows, 1).view(np.uint8)]
        if self.affine:
            parts.append(fit.stored["m"].reshape(rows, 1).view(np.uint8))
        if self.grid.gguf_type == "q8_0":
            parts.append((codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
            return np.concatenate(parts, axis=1)
        low, high = codes[:, :16] & 0x0F, codes[:, 16:] & 0x0F
        if self.grid.bits == 5:                                             # 5th bits: one uint32, bit j = code j
            bits = (codes >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)
            parts.append(np.bitwise_or.reduce(bits, axis=1).astype("<u4").reshape(rows, 1).view(np.uint8))
        parts.append((low | (high << 4)).astype(np.uint8))
        return np.concatenate(parts, axis=1)


def codec_for(grid: Grid, columns: int) -> Codec:
    if not grid.gguf_type:
        return GenericCodec(grid, columns)
    if grid.gguf_type.endswith("_k"):
        from shared.quant.kquants import kquant_codec
        return kquant_codec(grid)
    return LegacyCodec(grid)
