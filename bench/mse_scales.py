"""Is the MSE-optimal symmetric scale "typically 0.7-0.9× the max/Q scale"? The seed's claim, checked
on SmolLM2's real weights.

    .venv/bin/python bench/mse_scales.py [--bits 3,4,8] [--max-weights 4000000] [--threads 1]

Seed ch. 9, "Derivation Challenge": for w ∈ Rⁿ and codes q ∈ {−Q, …, Q}, Q = 2^(b−1) − 1, the scale s*
minimising Σ(w − clip(round(w/s), −Q, Q)·s)² "is typically 0.7-0.9× the max/Q scale", found by trying
s ∈ [max/(1.2Q), max/Q] in 100 steps (our `codecs.MSE_FACTORS`). That range is factors [0.833, 1]: it
cannot return anything in [0.7, 0.833), two thirds of the interval the claim names. So the search here is
wider: factor f = s/(max|w|/Q) on 0.3, 0.301, …, 1.0 (701 steps) together with the seed's own 100
factors, and every row reports s*/(max/Q) over both ranges.

Weights: every linear weight of the 30 blocks, and the embedding matrix (tied to the output head). They
were dequantized from the packaged GGUF — linears from Q4_1 (asymmetric, groups of 32: at most 16
distinct values per 32 weights), the embedding from Q8_0 (symmetric, groups of 32) — so statistics per
group of 32 would measure that grid, not the trained weights. Rows here are per channel (a whole
input row), per group of 64, and per group of 128 where the row allows (only down_proj's 1536-wide
rows; 576 is not a multiple of 128). Within each (source, granularity), rows are sampled uniformly from
every tensor (`--max-weights` per row of the table; the same rows for every bit width).

Exact errors at every factor without trying each one: with u = |w|·Q/max (so u ∈ [0, Q]), the code of
u at factor f is c(f) = min(Q, ⌊u/f + ½⌋) = #{k ≤ Q : f ≤ u/(k − ½)}, so c steps down by one at each
threshold t_k = u/(k − ½). Then Σ(u − f·c)² = Σu² − 2f·Σu·c + f²·Σc², and Σu·c, Σc² (with
c² = Σ_{k≤c}(2k − 1)) are reverse cumulative sums of histograms of the thresholds over the factor grid:
n·Q scatter-adds per group instead of n·(factors) roundings. (At a threshold both codes give the same
error, so the result is exact on the grid whatever side ties fall.) At 8 bits (Q = 127) n·Q events cost
more than rounding at every factor, so there the errors are computed directly. Both agree with a
float64 brute force to ~1e-7 relative. Results: bench/results/mse_scales.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from clients.agent.profile import cpu_model  # noqa: E402  (after the path set-up)

import numpy as np  # noqa: E402

from shared.quant.codecs import MSE_FACTORS  # noqa: E402

WIDE = np.linspace(0.3, 1.0, 701)                                  # the wide search, step 0.001
SEED = MSE_FACTORS.astype(np.float64)                              # the seed's [1/1.2, 1], 100 steps
FACTORS = np.union1d(WIDE, SEED)                                   # ascending; 1.0 is the last
SEED_LOW = float(SEED[0])                                          # 1/1.2 in float32
CLAIM = (0.7, 0.9)
PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
EVENTS_PER_CHUNK = 1 << 21                                         # bounds the (groups, n·Q) work arrays


@dataclasses.dataclass
class GroupResults:
    """Per group: the best factor over the wide and the seed's range, and the squared errors (weight units)."""
    best_wide: np.ndarray
    best_seed: np.ndarray
    error_wide: np.ndarray
    error_seed: np.ndarray
    error_minmax: np.ndarray
    projection: np.ndarray            # the tensor kind each group came from ("q_proj", …, "embed_tokens")


def factor_errors(x, Q: int, factors):
    """x (G, n) float32 torch -> (Σ(w − clip(round(w/s))·s)² at s = f·max|w|/Q for every f, (G, F) float64;
    max|w| (G,)). Groups whose max is 0 must be removed by the caller."""
    import torch
    groups, n = x.shape
    amax = x.abs().amax(-1)
    u = x.abs() * (Q / amax)[:, None]                                         # (G, n) in [0, Q]
    k = torch.arange(1, Q + 1, dtype=torch.float32)
    thresholds = u[:, :, None] / (k - 0.5)                                    # (G, n, Q): c drops below k past it
    bins = torch.searchsorted(factors.float(), thresholds.reshape(groups, -1), right=True)   # #{f_j ≤ t}
    count = len(factors)
    hist_uc = torch.zeros(groups, count + 1, dtype=torch.float64)
    hist_uc.scatter_add_(1, bins, u[:, :, None].expand(groups, n, Q).reshape(groups, -1).double())
    hist_cc = torch.zeros(groups, count + 1, dtype=torch.float64)
    hist_cc.scatter_add_(1, bins, (2 * k - 1).double().expand(groups, n, Q).reshape(groups, -1))
    # factor j counts the events with bin > j: the total minus the cumulative sum up to j
    sum_uc = hist_uc.sum(1, keepdim=True) - hist_uc.cumsum(1)[:, :count]     # Σ u·c(f_j)
    sum_cc = hist_cc.sum(1, keepdim=True) - hist_cc.cumsum(1)[:, :count]     # Σ c(f_j)²
    f = factors[None, :]
    energy = u.double().pow(2).sum(-1, keepdim=True)
    errors = energy - 2 * f * sum_uc + f * f * sum_cc                        # normalised units (u)
    return errors * (amax.double() / Q).pow(2)[:, None], amax


def factor_errors_direct(x, Q: int, factors):
    """factor_errors by rounding at every factor: cheaper when Q is large (8 bits)."""
    import torch
    amax = x.abs().amax(-1)
    u = x.abs() * (Q / amax)[:, None]
    work = torch.empty_like(u)
    errors = torch.empty(x.shape[0], len(factors), dtype=torch.float64)
    for j, f in enumerate(factors.tolist()):
        torch.mul(u, 1.0 / f, out=work)
        work.add_(0.5).floor_().clamp_max_(Q).mul_(-f).add_(u)              # u − f·c(f)
        errors[:, j] = work.pow_(2).sum(-1, dtype=torch.float64)
    return errors * (amax.double() / Q).pow(2)[:, None], amax


def analyse(groups_array: np.ndarray, Q: int) -> tuple[np.ndarray, ...]:
    """(G, n) float32 -> best wide factor, best seed factor, and errors at each and at min/max (f = 1)."""
    import torch
    factors = torch.from_numpy(FACTORS)
    seed_columns = torch.from_numpy(np.flatnonzero(np.isin(FACTORS, SEED)))
    x = torch.from_numpy(groups_array)
    x = x[x.abs().amax(-1) > 0]
    outputs = [[] for _ in range(5)]
    direct = Q > 15
    step = max(1, EVENTS_PER_CHUNK // (x.shape[1] * (1 if direct else Q)))
    for start in range(0, x.shape[0], step):
        errors, _ = (factor_errors_direct if direct else factor_errors)(x[start:start + step], Q, factors)
        wide_error, wide_index = errors.min(1)
        seed_errors = errors.index_select(1, seed_columns)
        seed_error, seed_index = seed_errors.min(1)
        for out, value in zip(outputs, (factors[wide_index], factors[seed_columns[seed_index]], wide_error,
                                        seed_error, errors[:, -1])):
            out.append(value.numpy())
    return tuple(np.concatenate(o) for o in outputs)


def sampled_rows(name: str, rows: int, fraction: float) -> np.ndarray:
    """The same rows of a tensor for every bit width: seeded by the tensor's name."""
    if fraction >= 1:
        return np.arange(rows)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return np.sort(rng.choice(rows, size=max(1, round(rows * fraction)), replace=False))


def collect(model, names: list[str], group: int | None, max_weights: int) -> tuple[list, dict]:
    """[(projection, (G, n) groups)] over `names`, rows sampled to about max_weights in all."""
    total = sum(int(np.prod(model.shape(n))) for n in names)
    fraction = min(1.0, max_weights / total)
    parts, weights = [], 0
    for name in names:
        W = model.array(name)
        rows = W[sampled_rows(name, W.shape[0], fraction)]
        width = group or W.shape[1]
        parts.append((name.split(".")[-2], np.ascontiguousarray(rows.reshape(-1, width))))
        weights += rows.size
    return parts, {"tensors": len(names), "weights_total": total, "weights_sampled": weights,
                   "fraction": fraction}


def summarise(result: GroupResults) -> dict:
    ratio = result.best_wide
    minmax = result.error_minmax.sum()
    return {
        "groups": int(len(ratio)),
        "percentiles": {f"p{p}": float(np.percentile(ratio, p)) for p in PERCENTILES},
        "mean": float(ratio.mean()),
        "fraction_in_claim": float(np.mean((ratio >= CLAIM[0]) & (ratio <= CLAIM[1]))),
        "fraction_below_seed_range": float(np.mean(ratio < SEED_LOW - 1e-9)),
        "fraction_seed_search_at_its_lower_bound": float(np.mean(result.best_seed <= SEED_LOW + 1e-9)),
        "fraction_minmax_optimal": float(np.mean(ratio == 1.0)),
        "fraction_at_wide_lower_bound": float(np.mean(ratio <= WIDE[0] + 1e-9)),
        "mse_reduction_wide": float(1 - result.error_wide.sum() / minmax) if minmax > 0 else 0.0,
        "mse_reduction_seed_range": float(1 - result.error_seed.sum() / minmax) if minmax > 0 else 0.0,
        "median_group_mse_reduction_wide": float(np.median(1 - result.error_wide / np.maximum(result.error_minmax,
                                                                                                1e-300))),
        "by_projection": {p: {"groups": int(np.sum(result.projection == p)),
                              "median": float(np.median(ratio[result.projection == p])),
                              "fraction_in_claim": float(np.mean((ratio[result.projection == p] >= CLAIM[0])
                                                                 & (ratio[result.projection == p] <= CLAIM[1])))}
                          for p in dict.fromkeys(result.projection.tolist())},
    }


def run(model, bits_list: list[int], max_weights: dict[int, int]) -> list[dict]:
    from shared.models.decoder_config import is_linear_weight
    config = model.config
    linears = [n for n in config.tensor_shapes() if is_linear_weight(n)]
    sources = {"block linears": linears, "embedding": ["model.embed_tokens.weight"]}
    rows = []
    for source, names in sources.items():
        for granularity, group in (("per-channel", None), ("g64", 64), ("g128", 128)):
            eligible = [n for n in names if group is None or model.shape(n)[1] % group == 0]
            if not eligible:
                continue
            for bits in bits_list:
                started = time.perf_counter()
                parts, sample = collect(model, eligible, group, max_weights[bits])
                Q = (1 << (bits - 1)) - 1
                results = [analyse(groups, Q) for _, groups in parts]
                merged = GroupResults(*(np.concatenate([r[i] for r in results]) for i in range(5)),
                                      np.concatenate([np.full(len(r[0]), p) for (p, _), r in zip(parts, results)]))
                row = {"source": source, "granularity": granularity, "bits": bits, "Q": Q,
                       "group_width": group or model.shape(eligible[0])[1], "sample": sample,
                       "tensors": sorted({n.split(".")[-2] for n in eligible}), **summarise(merged),
                       "seconds": time.perf_counter() - started}
                rows.append(row)
                print_row(row, header=len(rows) == 1)
    return rows


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'source':<14}{'gran':<12}{'bits':>4}{'groups':>8}{'p10':>7}{'p25':>7}{'p50':>7}{'p75':>7}{'p90':>7}"
              f"{'in .7-.9':>9}{'<1/1.2':>8}{'seed@lo':>8}{'=1.0':>7}{'ΔMSE wide':>10}{'ΔMSE seed':>10}{'s':>6}")
    p = r["percentiles"]
    print(f"{r['source']:<14}{r['granularity'] + ('*' if r['granularity'] == 'g128' else ''):<12}{r['bits']:>4}"
          f"{r['groups']:>8}{p['p10']:>7.3f}{p['p25']:>7.3f}{p['p50']:>7.3f}{p['p75']:>7.3f}{p['p90']:>7.3f}"
          f"{100 * r['fraction_in_claim']:>8.1f}%{100 * r['fraction_below_seed_range']:>7.1f}%"
          f"{100 * r['fraction_seed_search_at_its_lower_bound']:>7.1f}%{100 * r['fraction_minmax_optimal']:>6.1f}%"
          f"{-100 * r['mse_reduction_wide']:>9.1f}%{-100 * r['mse_reduction_seed_range']:>9.1f}%"
          f"{r['seconds']:>6.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="3,4,8")
    parser.add_argument("--max-weights", type=int, default=4_000_000,
                        help="weights sampled per table row at 3-4 bits (8 bits: a quarter; n·Q events each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable under contention)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mse_scales.json")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    from shared.assets import prepare
    from shared.models.bundle import ModelDir
    assets = ROOT / ".edgeforge-assets"
    prepare(assets)
    model = ModelDir(assets / "models" / "smollm2-fp32")
    bits_list = [int(b) for b in args.bits.split(",")]
    max_weights = {b: args.max_weights if b <= 4 else args.max_weights // 4 for b in bits_list}
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = run(model, bits_list, max_weights)
    seconds = time.perf_counter() - started
    print("columns: s*/(max/Q) percentiles over groups; share of groups with s* in [0.7, 0.9]; below the seed's "
          "range (< 1/1.2); where the seed's search returns its lowest factor 1/1.2; where min/max is already "
          "optimal; total squared weight error vs min/max with the wide and the seed's search. "
          "*g128: down_proj only (576 is not a multiple of 128).")
    print(f"{seconds:.0f} s, {args.threads} thread(s), load average {load_before[0]:.2f} → {os.getloadavg()[0]:.2f}")
    result = {"machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                          "torch_threads": torch.get_num_threads(), "load_average_before": load_before,
                          "load_average_after": os.getloadavg()},
              "model": "SmolLM2-135M-Instruct, float32 from the packaged GGUF (linears Q4_1 g32, embedding Q8_0 g32)",
              "claim": "seed ch. 9: the MSE-optimal symmetric scale is typically 0.7-0.9x max/Q",
              "codes": "q in {-Q..Q}, Q = 2^(bits-1) - 1 (the seed's definition)",
              "factors": {"wide": [WIDE[0], WIDE[-1], len(WIDE)], "seed": [SEED_LOW, float(SEED[-1]), len(SEED)]},
              "max_weights_per_row": {str(b): w for b, w in max_weights.items()}, "seconds": seconds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")



if __name__ == "__main__":
    main()
