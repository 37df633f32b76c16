"""llama.cpp's K-quant super-block codecs: Q2_K, Q3_K, Q4_K, Q5_K and Q6_K.

A super-block is 256 consecutive weights of a row, split into sub-blocks of 16 (Q2_K, Q3_K, Q6_K)
or 32 (Q4_K, Q5_K) weights. Each sub-block has its own (scale, offset); those are themselves
quantized — 4-bit (Q2_K), 6-bit (Q3_K, Q4_K, Q5_K) or int8 (Q6_K) multiples of one float16 `d`
(and `dmin` for the affine types) per super-block. In the codec's terms (`shared/quant/codecs.py`),
ŵ = q·scale − offset in sub-block k, with scale and offset computed from the *stored* values the
way llama.cpp's dequantizers do:

    Q2_K  scale = d·(sc & 0xF)          offset = dmin·(sc >> 4)        q ∈ [0, 3]
    Q3_K  scale = d·(sc − 32)            offset = 4·scale               q ∈ [0, 7]
    Q4_K  scale = d·sc                   offset = dmin·m                q ∈ [0, 15]
    Q5_K  scale = d·sc                   offset = dmin·m                q ∈ [0, 31]
    Q6_K  scale = d·sc (sc int8)         offset = 32·scale              q ∈ [0, 63]

The symmetric types (Q3_K, Q6_K) dequantize as (q − zero)·scale, exactly as llama.cpp and gguf-py do.

Reference rounding (`rtn` without weights) is llama.cpp's `quantize_row_qN_K_ref` (ggml-quants.c):
`make_qkx2_quants` per sub-block for Q2_K/Q4_K/Q5_K, `make_q3_quants` for Q3_K, `make_qx_quants` for
Q6_K, then the sub-scales quantized against the largest one, then every code recomputed from the
stored d·sc and dmin·m (`nearest_int((x + dm)/d)`). With importance weights it is llama.cpp's
imatrix path (`quantize_row_qN_K_impl`): weights qw·sqrt(σ² + x²), `make_qkx3_quants` per sub-block
and `make_qp_quants` for the sub-scales (Q2_K, Q4_K, Q5_K), `make_qx_quants` weighted (Q3_K, Q6_K).

Bit-exactness. llama.cpp's quantizers are sequential float32 C code, compiled for x86-64 without
FMA contraction (the ggml-base library of the llama-cpp-python wheel uses SSE2 only), so every sum
here is accumulated in the C loop's order in float32 (`_seq`), every product is formed in the C
expression's order, and `nearest_int` reproduces the float magic-number trick bit for bit (round
half to even, and the same wrap-around outside its ±2²² range). The result is byte-identical to
llama.cpp for all five types, with and without an importance matrix (tests/shared/quant/
test_kquants.py checks both against the library itself and against `llama_model_quantize`).
A build of llama.cpp with FMA contraction enabled (e.g. aarch64 with -ffp-contract=fast) rounds
some intermediate sums differently and would differ in a small fraction of blocks.

Known deviation (one corner case): llama.cpp stores an out-of-range sub-scale through C integer
truncation (a negative least-squares sub-block scale wraps to a large uint8). We reproduce that
everywhere except Q4_K's imatrix path, where C then packs the wrapped byte's stray high bits into
the neighbouring 6-bit fields; we store 63 instead (what Q5_K's imatrix path does). It needs a
negative fitted sub-block scale, which real weights do not produce.

Speed: everything is vectorised over all sub-blocks at once; the Python loops run over the 16/32
weights of a sub-block and the search steps only.
"""
from __future__ import annotations

import numpy as np

from shared.quant.codecs import Codec, Fit
from shared.quant.grids import Grid

QK_K = 256
F = np.float32
GROUP_MAX_EPS = F(1e-15)
CHUNK = 1024                     # super-blocks per pass: keeps the (sub, M) temporaries in cache

SUB = {"q2_k": 16, "q3_k": 16, "q4_k": 32, "q5_k": 32, "q6_k": 16}
ZERO = {"q3_k": 4, "q6_k": 32}   # symmetric types: the code of 0


# ------------------------------------------------------------------------------ C arithmetic

def nearest_int(v) -> np.ndarray:
    """llama.cpp's nearest_int: float32 v + 1.5·2²³, low mantissa bits − 2²² (round half to even;
    outside ±2²² the same wrapped value C's bit trick yields). -> int32."""
    with np.errstate(over="ignore", invalid="ignore"):
        i = np.add(v, F(12582912.0), dtype=F).view(np.int32)
    np.bitwise_and(i, 0x007FFFFF, out=i)
    np.subtract(i, 0x00400000, out=i)
    return i


def _seq(t: np.ndarray) -> np.ndarray:
    """Σ over axis 0 in order, in float32, starting from 0 — C's `float s = 0; for (…) s += t[i];`."""
    acc = t[0] + F(0)
    for row in t[1:]:
        acc += row
    return acc


def _f16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 (round to nearest even) and back: (float16 stored, its float32 value)."""
    with np.errstate(over="ignore"):
        h = np.asarray(v, dtype=F).astype(np.float16)
    return h, h.astype(F)


def _u8(v: np.ndarray) -> np.ndarray:
    """C's conversion of an int to uint8_t."""
    return (np.asarray(v, dtype=np.int64) & 0xFF).astype(np.int64)


def _i8(v: np.ndarray) -> np.ndarray:
    """C's conversion of an int to int8_t (two's complement wrap)."""
    return ((np.asarray(v, dtype=np.int64) + 128) & 0xFF) - 128


def _running_max(v: np.ndarray) -> np.ndarray:
    """max(0, v…) per row as C's `float m = 0; if (v > m) m = v;` forms it (+0, never −0, when none is > 0)."""
    m = v.max(axis=1)
    return np.where(m > 0, m, F(0)).astype(F)


def _subs(a: np.ndarray, sub: int) -> np.ndarray:
    """(N, 256) -> (sub, N·256/sub): element i of sub-block m at [i, m], sub-blocks in row order."""
    return np.ascontiguousarray(a.reshape(-1, sub).T)


def _unsubs(a: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(a.T).reshape(n, QK_K)


def _signed_absmax(v: np.ndarray, axis: int) -> np.ndarray:
    """The first element of largest |v| along `axis` (C: `if (fabsf(v) > amax) { amax = …; max = v; }`)."""
    index = np.expand_dims(np.abs(v).argmax(axis), axis)
    return np.take_along_axis(v, index, axis).squeeze(axis)


# --------------------------------------------------------------------------- sub-block searches
# Each works on (n, M): M independent runs of n values (sub-blocks, or a super-block's sub-scales).

def make_qkx(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
             use_mad: bool, x3: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants (x3=False) / make_qkx3_quants (x3=True): affine fit x ≈ scale·L − the_min,
    L ∈ [0, nmax], trying nstep+1 stretched ranges, each refitted by weighted least squares.
    Returns (scale (M,), the_min (M,), L (n, M) int)."""
    sum_w = _seq(w)
    sum_x = _seq(w * x)
    mx = x.max(0)
    mn = np.minimum(x.min(0), F(0))
    flat = (mx <= mn) if x3 else (mx == mn)
    mn0 = mn.copy()
    v, lf, t = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def error(scale, mn):                               # Σ w·|(scale·lf + mn) − x|^(1 or 2)
        np.multiply(lf, scale, out=t)
        np.add(t, mn, out=t)
        np.subtract(t, x, out=t)
        if use_mad:
            np.abs(t, out=t)
        else:
            np.multiply(t, t, out=t)
        np.multiply(t, w, out=t)
        return _seq(t)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F(nmax) / (mx - mn)
        scale = F(1) / iscale
        np.subtract(x, mn, out=v)
        v *= iscale
        L = np.clip(nearest_int(v), 0, nmax)
        lf[...] = L
        best = error(scale, mn)
        for step in range(nstep + 1):
            iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (mx - mn)
            np.subtract(x, mn, out=v)
            v *= iscale
            if x3:      # llama.cpp guards this one: v may be inf/nan when the best min sits near max
                positive = v > 0
                np.minimum(v, F(nmax), out=v)
                l = nearest_int(v)
                l *= positive
            else:
                l = nearest_int(v)
                np.clip(l, 0, nmax, out=l)
            lf[...] = l
            np.multiply(w, lf, out=t)
            sum_l = _seq(t)
            np.multiply(t, lf, out=v)
            sum_l2 = _seq(v)
            np.multiply(t, x, out=v)
            sum_xl = _seq(v)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0
            this_min = np.where(positive, F(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min)
            better = (D > 0) & (cur < best)
            np.copyto(L, l, where=better)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L = np.where(flat, 0, L)
    scale = np.where(flat, F(0), scale).astype(F)
    mn = np.where(flat, mn0, mn)
    return scale, (-mn).astype(F), L


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(rmse_type=1): symmetric fit x ≈ scale·(L − nmax), L ∈ [0, 2·nmax − 1],
    weights qw (or x²), 19 trial scales each refitted by least squares. -> (scale (M,), L (n, M))."""
    mx = _signed_absmax(x, 0)
    zero = np.abs(mx) < GROUP_MAX_EPS
    w = x * x if qw is None else qw
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        def trial(iscale):
            l = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
            lf = l.astype(F)
            return l, _seq(wx * lf), _seq(w * lf * lf)

        l, sumlx, suml2 = trial(F(-nmax) / mx)
        L = l + nmax
        scale = np.where(suml2 != 0, sumlx / suml2, F(0)).astype(F)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            l, sumlx, suml2 = trial(-(F(nmax) + F(0.1) * F(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better, l + nmax, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero, F(0), scale).astype(F), np.where(zero, 0, L)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(do_rmse=true): symmetric x²-weighted fit, then up to 5 passes of coordinate
    descent on the codes one at a time. -> (scale (M,), L (n, M) in [0, 2·nmax − 1])."""
    mx = _signed_absmax(x, 0)
    zero = np.abs(mx) < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L = np.clip(nearest_int((F(-nmax) / mx) * x), -nmax, nmax - 1)
        lf = L.astype(F)
        sumlx, suml2 = _seq(wx * lf), _seq(w * lf * lf)
        for _ in range(5):      # a pass that changes nothing leaves the state as it found it
            for i in range(x.shape[0]):
                wi, xi, li = w[i], x[i], L[i].astype(F)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - wi * li * li
                new = np.clip(nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
                nf = new.astype(F)
                slx = slx + wx[i] * nf
                sl2 = sl2 + wi * nf * nf
                take = ((sumlx - wx[i] * li) > 0) & (new != L[i]) & (sl2 > 0) & \
                       (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[i] = np.where(take, new, L[i])
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F(0))
    return np.where(zero, F(0), scale).astype(F), np.where(zero, 0, L + nmax)


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants: x ≥ 0 ≈ scale·L, L ∈ [0, nmax], qw-weighted (llama.cpp's sub-scale fit with
    an imatrix). -> (scale (M,), L (n, M) as stored in uint8)."""
    mx = np.maximum(x.max(0), F(0))
    zero = mx < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F(nmax) / mx
        L = _u8(nearest_int(iscale * x))
        diff = x - (F(1) / iscale) * L.astype(F)
        best = _seq(qw * diff * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (F(0.1) * F(step) + F(nmax)) / mx
            l = np.minimum(nmax, nearest_int(iscale_is * x))
            diff = x - (F(1) / iscale_is) * l.astype(F)
            mse = _seq(qw * diff * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale)
        l = np.minimum(nmax, nearest_int(iscale * x))
        L = _u8(l)
        lf = l.astype(F)
        wx = qw * x
        sumlx, suml2 = _seq(wx * lf), _seq(qw * lf * lf)
        for _ in range(5):
            for i in range(x.shape[0]):
                wi, li = qw[i], L[i].astype(F)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - wi * li * li
                new = np.minimum(nmax, nearest_int(x[i] * sl2 / slx))
                nf = new.astype(F)
                slx2 = slx + wx[i] * nf
                sl22 = sl2 + wi * nf * nf
                take = (slx > 0) & (sl2 > 0) & (new != L[i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[i] = np.where(take, _u8(new), L[i])
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F(0))
    return np.where(zero, F(0), scale).astype(F), np.where(zero, 0, L)


# ----------------------------------------------------------------------------------- the codecs

class KQuantCodec(Codec):
    """One K-quant type. `fit` returns what llama.cpp would store; `rtn` also returns its codes."""

    block = QK_K

    def __init__(self, grid: Grid):
        self.grid = grid
        self.kind = grid.gguf_type
        self.sub = SUB[self.kind]
        self.nsub = QK_K // self.sub
        self.zero = ZERO.get(self.kind, 0)

    # -- fitting

    def fit(self, x: np.ndarray, weights: np.ndarray | None = None) -> Fit:
        return self._search(x, weights)[0]

    def rtn(self, x: np.ndarray, weights: np.ndarray | None = None) -> tuple[Fit, np.ndarray]:
        """llama.cpp's quantize_row_*_ref (quantize_row_*_impl with weights), bit for bit."""
        fit, first = self._search(x, weights)
        return fit, self._codes(np.asarray(x, dtype=F), fit, first)

    def _search(self, x: np.ndarray, weights: np.ndarray | None) -> tuple[Fit, np.ndarray]:
        """(fit, the codes of the sub-block search): llama.cpp keeps the latter where d·sc is 0."""
        x = np.ascontiguousarray(x, dtype=F)
        if x.ndim != 2 or x.shape[1] != QK_K:
            raise ValueError(f"{self.kind} fits (N, {QK_K}) super-blocks, got {x.shape}")
        if weights is not None:
            weights = np.ascontiguousarray(np.broadcast_to(np.asarray(weights, dtype=F), x.shape))
        if len(x) == 0:                                         # no super-blocks: the empty fit
            fit, codes = self._search_chunk(np.zeros((1, QK_K), F), None)
            return Fit(fit.scale[:0], fit.offset[:0], {k: v[:0] for k, v in fit.stored.items()}), codes[:0]
        parts = [self._search_chunk(x[i:i + CHUNK], None if weights is None else weights[i:i + CHUNK])
                 for i in range(0, len(x), CHUNK)]
        if len(parts) == 1:
            return parts[0]
        fits, codes = zip(*parts)
        stored = {k: np.concatenate([f.stored[k] for f in fits]) for k in fits[0].stored}
        return (Fit(np.concatenate([f.scale for f in fits]), np.concatenate([f.offset for f in fits]), stored),
                np.concatenate(codes))

    def _search_chunk(self, x: np.ndarray, qw: np.ndarray | None) -> tuple[Fit, np.ndarray]:
        return getattr(self, "_search_" + self.kind)(x, qw)

    def _sigma2(self, x: np.ndarray, factor: int) -> np.ndarray:
        """factor·Σx²/256 over each super-block, summed in order (the imatrix paths' σ²)."""
        xt = np.ascontiguousarray(x.T)
        return (F(factor) * _seq(xt * xt)) / F(QK_K) if factor != 1 else _seq(xt * xt) / F(QK_K)

    def _importance(self, x: np.ndarray, qw: np.ndarray, factor: int) -> np.ndarray:
        """llama.cpp's per-weight importance qw·sqrt(σ² + x²), in the (sub, M) layout."""
        sigma2 = self._sigma2(x, factor)
        w = qw * np.sqrt(sigma2[:, None] + x * x)
        return _subs(w, self.sub)

    # Q2_K: 16 × 16, 2-bit codes, 4-bit scales and mins.
    def _search_q2_k(self, x, qw):
        n = len(x)
        xs = _subs(x, 16)
        if qw is None:
            scales, mins, L = make_qkx(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True, x3=False)
            scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
            max_scale, max_min = _running_max(scales), _running_max(mins)
            with np.errstate(divide="ignore", invalid="ignore"):
                ls = np.where(max_scale[:, None] > 0, _u8(nearest_int((F(15) / max_scale)[:, None] * scales)), 0)
                lm = nearest_int((F(15) / max_min)[:, None] * mins)
            byte = np.where(max_min[:, None] > 0, (ls | (lm << 4)) & 0xFF, ls)
            d = np.where(max_scale > 0, max_scale / F(15), F(0))
            dmin = np.where(max_min > 0, max_min / F(15), F(0))
        else:
            w = self._importance(x, qw, 1)
            sw = _seq(w).reshape(n, 16)
            scales, mins, L = make_qkx(xs, w, 3, -0.9, 0.05, 36, use_mad=False, x3=True)
            swt = np.ascontiguousarray(sw.T)
            d, ls = make_qp_quants(np.ascontiguousarray(scales.reshape(n, 16).T), 15, swt)
            dmin, lm = make_qp_quants(np.ascontiguousarray(mins.reshape(n, 16).T), 15, swt)
            byte = (ls.T | (lm.T << 4)) & 0xFF
        d16, df = _f16(d)
        m16, mf = _f16(dmin)
        sc, m = (byte & 0xF).astype(np.uint8), (byte >> 4).astype(np.uint8)
        fit = Fit(df[:, None] * sc.astype(F), mf[:, None] * m.astype(F),
                  {"d": d16, "dmin": m16, "scales": sc, "mins": m})
        return fit, _unsubs(L, n)

    # Q3_K: 16 × 16, 3-bit codes (q − 4), 6-bit signed scales (sc − 32).
    def _search_q3_k(self, x, qw):
        n = len(x)
        xs = _subs(x, 16)
        if qw is None:
            scales, L = make_q3_quants(xs, 4)
            scales = scales.reshape(n, 16)
            max_scale = _signed_absmax(scales, 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                iscale = F(-32) / max_scale
                l = np.clip(_i8(nearest_int(iscale[:, None] * scales)), -32, 31) + 32
                d = F(1) / iscale
            nonzero = max_scale != 0
            sc = np.where(nonzero[:, None], l, 0)
            d = np.where(nonzero, d, F(0))
        else:
            w = self._importance(x, qw, 2)
            sw = _seq(w).reshape(n, 16)
            scales, L = make_qx_quants(xs, 4, w)
            d, ls = make_qx_quants(np.ascontiguousarray(scales.reshape(n, 16).T), 32, np.ascontiguousarray(sw.T))
            sc = ls.T & 63
        d16, df = _f16(d)
        sc = sc.astype(np.uint8)
        scale = df[:, None] * (sc.astype(np.int64) - 32).astype(F)
        return Fit(scale, F(4) * scale, {"d": d16, "scales": sc}), _unsubs(L, n)

    # Q4_K, Q5_K: 8 × 32, 4/5-bit codes, 6-bit scales and mins.
    def _search_affine32(self, x, qw, nmax, rmin, rdelta, nstep):
        n = len(x)
        xs = _subs(x, 32)
        if qw is None:
            av_x = np.sqrt(_seq(xs * xs) / F(32))
            scales, mins, L = make_qkx(xs, av_x + np.abs(xs), nmax, rmin, rdelta, nstep, use_mad=False, x3=False)
            scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
            max_scale, max_min = _running_max(scales), _running_max(mins)
            with np.errstate(divide="ignore"):
                inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0))
                inv_min = np.where(max_min > 0, F(63) / max_min, F(0))
            sc = np.minimum(63, _u8(nearest_int(inv_scale[:, None] * scales)))
            m = np.minimum(63, _u8(nearest_int(inv_min[:, None] * mins)))
            d, dmin = max_scale / F(63), max_min / F(63)
        else:
            w = self._importance(x, qw, 2)
            sw = np.ascontiguousarray(_seq(w).reshape(n, 8).T)
            scales, mins, L = make_qkx(xs, w, nmax, -0.9, 0.05, 36, use_mad=False, x3=True)
            d, sc = make_qp_quants(np.ascontiguousarray(scales.reshape(n, 8).T), 63, sw)
            dmin, m = make_qp_quants(np.ascontiguousarray(mins.reshape(n, 8).T), 63, sw)
            sc, m = np.minimum(63, sc.T), np.minimum(63, m.T)          # Q5_K's MIN(63, ·); see the docstring
        d16, df = _f16(d)
        m16, mf = _f16(dmin)
        sc, m = sc.astype(np.uint8), m.astype(np.uint8)
        fit = Fit(df[:, None] * sc.astype(F), mf[:, None] * m.astype(F),
                  {"d": d16, "dmin": m16, "scales": sc, "mins": m})
        return fit, _unsubs(L, n)

    def _search_q4_k(self, x, qw):
        return self._search_affine32(x, qw, 15, -1.0, 0.1, 20)

    def _search_q5_k(self, x, qw):
        return self._search_affine32(x, qw, 31, -0.5, 0.1, 15)

    # Q6_K: 16 × 16, 6-bit codes (q − 32), int8 scales.
    def _search_q6_k(self, x, qw):
        n = len(x)
        scales, L = make_qx_quants(_subs(x, 16), 32, None if qw is None else _subs(qw, 16))
        scales = scales.reshape(n, 16)
        max_scale = _signed_absmax(scales, 1)
        empty = np.abs(max_scale) < GROUP_MAX_EPS                # llama.cpp zeroes the whole block
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F(-128) / max_scale
            sc = _i8(np.minimum(127, nearest_int(iscale[:, None] * scales)))
            d = F(1) / iscale
        sc = np.where(empty[:, None], 0, sc).astype(np.int8)
        d16, df = _f16(np.where(empty, F(0), d))
        scale = df[:, None] * sc.astype(F)
        codes = np.where(empty[:, None], 0, _unsubs(L, n))
        return Fit(scale, F(32) * scale, {"d": d16, "scales": sc}), codes

    # -- codes

    def _codes(self, x: np.ndarray, fit: Fit, fallback, sub_index: int | None = None) -> np.ndarray:
        """llama.cpp's second pass: codes from the stored d·sc (and dmin·m); `fallback` where d·sc = 0."""
        if sub_index is None:
            rows = x.shape[0]
            s = np.repeat(fit.scale, self.sub, axis=1).reshape(rows, QK_K)
            o = np.repeat(fit.offset, self.sub, axis=1).reshape(rows, QK_K)
        else:
            s, o = fit.scale[:, sub_index], fit.offset[:, sub_index]
        x = np.asarray(x, dtype=F)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if self.zero:
                q = np.clip(nearest_int(x / s), -self.zero, self.qmax - self.zero) + self.zero
            else:
                q = np.clip(nearest_int((x + o) / s), 0, self.qmax)
        return np.where(s != 0, q, fallback).astype(np.uint8)

    def nearest(self, x: np.ndarray, fit: Fit, sub_index: int | None = None) -> np.ndarray:
        return self._codes(x, fit, self.empty_code(fit, None, None), sub_index)

    def dequantize(self, codes: np.ndarray, fit: Fit) -> np.ndarray:
        """ŵ exactly as llama.cpp's dequantize_row_* (and gguf-py) compute it: d·sc·q − dmin·m, or
        (q − zero)·(d·sc) for the symmetric types."""
        rows = codes.shape[0]
        s = np.repeat(fit.scale, self.sub, axis=1).reshape(rows, QK_K)
        if self.zero:
            return (codes.astype(F) - F(self.zero)) * s
        return codes.astype(F) * s - np.repeat(fit.offset, self.sub, axis=1).reshape(rows, QK_K)

    # -- bytes (ggml-common.h)

    def encode(self, fit: Fit, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.uint8)
        st = fit.stored
        n = codes.shape[0]

        def h(v):                                                        # a float16 field's 2 bytes
            return np.asarray(v, dtype=np.float16).reshape(n, 1).view(np.uint8)

        if self.kind == "q2_k":
            scales = (st["scales"] | (st["mins"] << 4)).astype(np.uint8)
            return np.concatenate([scales, _pack2(codes), h(st["d"]), h(st["dmin"])], axis=1)
        if self.kind == "q3_k":
            bits = (codes >> 2) & 1                         # weight j's high bit -> bit j // 32 of hmask[j % 32]
            hmask = np.bitwise_or.reduce(bits.reshape(n, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None],
                                         axis=1).astype(np.uint8)
            return np.concatenate([hmask, _pack2(codes & 3), _pack_q3_scales(st["scales"]), h(st["d"])], axis=1)
        if self.kind == "q6_k":
            c = codes.reshape(n, 2, 4, 32)                               # 128-halves, 32-wide quarters
            lo, hi = c & 0x0F, c >> 4
            ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
            qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
            return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64),
                                   np.asarray(st["scales"], dtype=np.int8).view(np.uint8), h(st["d"])], axis=1)
        scales = _pack_k4_scales(st["scales"], st["mins"])
        c = codes.reshape(n, 4, 2, 32)                                   # 64-chunks: low nibble first 32
        qs = ((c[:, :, 0] & 0x0F) | ((c[:, :, 1] & 0x0F) << 4)).reshape(n, 128)
        if self.kind == "q4_k":
            return np.concatenate([h(st["d"]), h(st["dmin"]), scales, qs], axis=1)
        fifth = (c >> 4).reshape(n, 8, 32)                               # bit 2k (+1) of qh[j]: chunk k's j (32 + j)
        qh = np.bitwise_or.reduce(fifth << np.arange(8, dtype=np.uint8)[None, :, None], axis=1).astype(np.uint8)
        return np.concatenate([h(st["d"]), h(st["dmin"]), scales, qh, qs], axis=1)


def _pack2(codes: np.ndarray) -> np.ndarray:
    """2-bit codes -> qs[64]: per 128-half, byte l holds weights l, l+32, l+64, l+96 (low bits first)."""
    n = codes.shape[0]
    c = (codes & 3).reshape(n, 2, 4, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(n, 64).astype(np.uint8)


def _pack_q3_scales(sc: np.ndarray) -> np.ndarray:
    """16 6-bit scales -> 12 bytes: low nibbles of 0–7 / 8–15 in bytes 0–7, high 2 bits in bytes 8–11."""
    sc = np.asarray(sc, dtype=np.uint8)
    low = (sc[:, :8] & 0xF) | ((sc[:, 8:] & 0xF) << 4)
    top = (sc >> 4).reshape(-1, 4, 4)                                    # [j // 4, j % 4]
    high = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return np.concatenate([low, high], axis=1).astype(np.uint8)


def _pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 6-bit scales and mins -> 12 bytes (get_scale_min_k4's layout)."""
    sc, m = np.asarray(sc, dtype=np.uint8), np.asarray(m, dtype=np.uint8)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return np.concatenate([first, second, third], axis=1).astype(np.uint8)


def kquant_codec(grid: Grid) -> KQuantCodec:
    if grid.gguf_type not in SUB:
        raise ValueError(f"{grid.gguf_type!r} is not a K-quant type ({', '.join(SUB)})")
    return KQuantCodec(grid)
