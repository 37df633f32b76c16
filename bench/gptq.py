"""GPTQ speed: per layer against its FLOP floor and this machine's matmul rate, and for the whole model.

    .venv/bin/python bench/gptq.py [--repeat 3] [--threads 1] [--skip-model]

(a) One layer, `gptq(W, H, grid, options)` on the CPU, for weights (out × in):
- 576×576 and 1536×576: SmolLM2 block 0's q_proj and gate_proj (real weights), each with its real
  Hessian H = XᵀX/N of the normed inputs it sees (input_layernorm resp. post_attention_layernorm
  outputs of the float block 0) on the first 16 × 512 tokens of the calibration text;
- 4096×4096: synthetic (no such layer in SmolLM2): W ~ N(0, 0.02²), H = D(VVᵀ/256 + 0.1·I)D with
  V (4096, 256) Gaussian and D = diag of Gamma(1, 1) channel energies — correlated inputs with uneven
  energy, positive definite.
Grids: int4 symmetric groups of 128 (64 for the 576-wide rows: 128 does not divide 576), Q4_0, and
Q4_K where the row allows (its 256-wide super-blocks: 4096 only); act-order on and off. The reference
twin (`reference.gptq_reference`, float64, explicit inverse, no batching) runs on the 576×576 layer
for the speedup ratio.

FLOP count (B = block_size = 128 columns per lazy batch):
- factorisation, 4/3·in³: Cholesky of H (in³/3), cholesky_inverse (triangular inverse in³/3 plus
  the product L⁻ᵀL⁻¹ in³/3), Cholesky of H⁻¹ (in³/3);
- error propagation, out·in²: each of the in²/2 column pairs j < l costs one multiply-add (2 FLOPs)
  per row; out·in·(in − B) of it runs as lazy rank-B matmuls, out·in·B as in-batch rank-1 updates.
  (2·out·in² would count the whole square; the update is triangular.)
- the relative output error gptq() returns, 4·out·in²: (W − Q)·H and W·H, two (out, in)·(in, in)
  matmuls — four times the propagation, and part of every call.
"floor" is (all of it) / (torch.matmul of 4096×4096 float32 on the same threads), the time if
every FLOP ran at matmul speed; "of peak" is achieved/peak. Codec fits (numpy) are timed apart.

(b) Whole model: `compress()` of SmolLM2 with QuantizationConfig(GPTQ, type q4_0), sequential
calibration on 32 × 512 tokens (built as bench/quality.py builds `seqs`), on the CPU, in a child
process that reports its own wall time and peak RSS (VmHWM) and the seconds of each block.

Every measurement runs in a child process with OMP_NUM_THREADS and torch threads set to --threads
(default 1: numbers stay comparable while other processes share the machine); the load average is
recorded before and after. Results: bench/results/gptq.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from clients.agent.profile import cpu_model  # noqa: E402  (after the path set-up)
SHA = "0" * 64
LAYER_TOKENS = (16, 512)                 # calibration samples × tokens for the per-layer Hessians
MODEL_TOKENS = (32, 512)                 # for the whole-model run (bench/quality.py's default)
CALIBRATION_CHARS = 400_000              # a prefix of calib.txt: far more tokens than either needs


def child(argv: list[str], threads: int) -> dict:
    """Runs this script's child mode with `threads` threads; returns its JSON (last stdout line)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", *argv, str(threads)], stdout=subprocess.PIPE,
                          text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"child {argv} failed with {done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["child_wall_s"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------------- flops

def flops(out: int, columns: int) -> dict[str, float]:
    return {"factorisation": 4 / 3 * columns ** 3, "propagation": float(out) * columns ** 2,
            "output_error": 4.0 * out * columns ** 2}


def derive(row: dict, peak: float) -> None:
    """Achieved rates: all counted FLOPs over the call's seconds, and the algorithm's FLOPs over the
    seconds left once the output-error metric (timed alone) is taken out."""
    count = row["flops"]
    row["gflops_per_s"] = sum(count.values()) / row["seconds"] / 1e9
    row["of_peak"] = row["gflops_per_s"] / peak
    algorithm = count["factorisation"] + count["propagation"]
    row["algorithm_gflops_per_s"] = algorithm / max(row["seconds"] - row["output_error_s"], 1e-9) / 1e9
    row["algorithm_of_peak"] = row["algorithm_gflops_per_s"] / peak


def matmul_gflops(repeat: int) -> float:
    import torch
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    torch.matmul(a, b)                                               # warm-up
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * 4096 ** 3 / best / 1e9


# ------------------------------------------------------------------------------------- layers

def calibration_sequences(model, shape: tuple[int, int]):
    import torch
    from services.calibrator.stats import CalibrationConfig, sequences
    from shared.models.tokenizer import TextTokenizer
    tokenizer = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    text = (ROOT / ".edgeforge-assets" / "data" / "calib.txt").read_text()[:CALIBRATION_CHARS]
    config = CalibrationConfig(*shape).validated()
    return torch.tensor(sequences(tokenizer.encode(text), tokenizer.bos_id, config))


def real_layers(model) -> list[tuple[str, object, object]]:
    """Block 0's q_proj and gate_proj with the Hessians of the inputs they see in the float model."""
    from services.compressor.layerwise import HessianAccumulator
    from shared.models import blockwise
    config = model.config
    seqs = calibration_sequences(model, LAYER_TOKENS)
    cos, sin = blockwise.rotary(config, seqs.shape[1])
    hidden = blockwise.embed(model, seqs)
    block = blockwise.load_block(config, 0, model.tensor)
    names = ["self_attn.q_proj", "mlp.gate_proj"]
    accumulators = {n: HessianAccumulator(config.hidden_size, "cpu") for n in names}
    with blockwise.InputCapture(block, names, lambda n, x: accumulators[n].add(x)):
        blockwise.run_block(block, hidden, cos, sin)
    modules = dict(block.named_modules())
    return [(f"model.layers.0.{n}.weight", modules[n].weight.data.clone(), accumulators[n].hessian()) for n in names]


def synthetic_layer(rows: int, columns: int, seed: int = 0):
    import torch
    generator = torch.Generator().manual_seed(seed)
    W = 0.02 * torch.randn(rows, columns, generator=generator)
    V = torch.randn(columns, 256, generator=generator)
    D = torch.distributions.Gamma(1.0, 1.0).sample((columns,))
    H = (V @ V.T / 256 + 0.1 * torch.eye(columns)) * D[:, None] * D[None, :]
    return "synthetic", W, H


class TimedCodec:
    """Wraps a codec and adds up the seconds its fit() takes (numpy, outside torch)."""

    def __init__(self, codec):
        self._codec, self.fit_s = codec, 0.0

    def fit(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self._codec.fit(*args, **kwargs)
        finally:
            self.fit_s += time.perf_counter() - started

    def __getattr__(self, name):
        return getattr(self._codec, name)


def time_gptq(W, H, grid, act_order: bool, repeat: int) -> dict:
    """Median seconds over `repeat` calls, with the codec-fit seconds of that call."""
    import services.compressor.quant.gptq as module
    from shared.quant.grids import GptqOptions
    original = module.codec_for
    timed: list[TimedCodec] = []

    def timed_codec_for(g, columns):
        timed.append(TimedCodec(original(g, columns)))
        return timed[-1]
    runs = []
    try:
        module.codec_for = timed_codec_for
        for _ in range(repeat):
            timed.clear()
            started = time.perf_counter()
            result = module.gptq(W, H, grid, GptqOptions(act_order=act_order))
            runs.append((time.perf_counter() - started, sum(t.fit_s for t in timed)))
    finally:
        module.codec_for = original
    started = time.perf_counter()
    module.relative_output_error(W, result.dequantized, H)
    error_s = time.perf_counter() - started
    seconds, fit_s = sorted(runs)[len(runs) // 2]
    return {"seconds": seconds, "fit_s": fit_s, "output_error_s": error_s, "runs_s": [r[0] for r in runs],
            "output_error": result.output_error}


def run_layers(repeat: int) -> dict:
    import numpy as np
    import torch
    from services.compressor.quant.reference import gptq_reference
    from shared.models.bundle import ModelDir
    from shared.quant.grids import GGUF_GRIDS, Granularity, Grid
    model = ModelDir(ROOT / ".edgeforge-assets" / "models" / "smollm2-fp32")
    peak = matmul_gflops(3)
    started = time.perf_counter()
    layers = real_layers(model)
    hessian_s = time.perf_counter() - started
    layers.append(synthetic_layer(4096, 4096))
    rows = []
    for name, W, H in layers:
        out, columns = W.shape
        grids = [Grid(4, Granularity.PER_GROUP, 128 if columns % 128 == 0 else 64, True), GGUF_GRIDS["q4_0"]]
        if columns % 256 == 0:
            grids.append(GGUF_GRIDS["q4_k"])
        count = flops(out, columns)
        for grid in grids:
            for act_order in (False, True):
                timing = time_gptq(W, H, grid, act_order, repeat if columns < 4096 else max(1, repeat // 3))
                row = {"layer": name, "shape": [out, columns], "grid": grid.name, "act_order": act_order, **timing,
                       "flops": count, "floor_s": sum(count.values()) / (peak * 1e9)}
                derive(row, peak)
                if columns == 576 and out == 576:
                    started = time.perf_counter()
                    gptq_reference(W.numpy(), H.numpy(), grid, 0.01, act_order)
                    row["reference_s"] = time.perf_counter() - started
                    row["speedup_vs_reference"] = row["reference_s"] / row["seconds"]
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("shape", "grid", "act_order", "seconds")}), file=sys.stderr,
                      flush=True)
    return {"matmul_gflops_per_s": peak, "hessian_s": hessian_s, "layer_tokens": list(LAYER_TOKENS),
            "torch_threads": torch.get_num_threads(), "numpy": np.__version__, "torch": torch.__version__,
            "rows": rows}


# ------------------------------------------------------------------------------------- model

def run_model() -> dict:
    import torch
    from services.compressor.compress import Calibration, compress
    from shared.models.bundle import ModelDir
    from shared.quant.grids import Method, QuantizationConfig
    model = ModelDir(ROOT / ".edgeforge-assets" / "models" / "smollm2-fp32")
    seqs = calibration_sequences(model, MODEL_TOKENS)
    marks: list[float] = []
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "results", prefix=".gptq-") as scratch:
        started = time.perf_counter()
        result = compress(model, SHA, QuantizationConfig(Method.GPTQ, gguf_type="q4_0"),
                          Path(scratch) / "compressed.safetensors", calibration=Calibration(sequences=seqs),
                          device="cpu", progress=lambda message: marks.append(time.perf_counter()))
        seconds = time.perf_counter() - started
    blocks = [b - a for a, b in zip(marks, marks[1:])]                 # block k starts when block k−1 ends
    return {"seconds": seconds, "blocks": len(marks), "block_s": blocks,
            "median_block_s": sorted(blocks)[len(blocks) // 2] if blocks else None,
            "before_first_block_s": marks[0] - started if marks else None,
            "after_last_block_start_s": seconds - (marks[-1] - started) if marks else None,
            "bits_per_weight": result.bits_per_weight, "tokens": list(MODEL_TOKENS),
            "torch_threads": torch.get_num_threads()}


def run_child(mode: str, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from clients.agent.measure import peak_rss_bytes
    result = run_layers(int(os.environ.get("GPTQ_BENCH_REPEAT", "3"))) if mode == "layers" else run_model()
    return {**result, "peak_rss_bytes": peak_rss_bytes()}


# ------------------------------------------------------------------------------------- report

def print_tables(layers: dict, model: dict | None) -> None:
    peak = layers["matmul_gflops_per_s"]
    print(f"matmul 4096×4096 float32: {peak:.1f} GFLOP/s on {layers['torch_threads']} thread(s)")
    print(f"{'layer (out×in)':<16}{'grid':<15}{'act':>4}{'s':>7}{'fit s':>7}{'err s':>7}{'GFLOP':>8}{'alg':>7}"
          f"{'GFLOP/s':>9}{'of peak':>8}{'alg/s':>7}{'of peak':>8}{'floor s':>8}{'ref s':>7}{'speedup':>8}")
    for r in layers["rows"]:
        f = r["flops"]
        print(f"{'×'.join(map(str, r['shape'])):<16}{r['grid']:<15}{'on' if r['act_order'] else 'off':>4}"
              f"{r['seconds']:>7.2f}{r['fit_s']:>7.2f}{r['output_error_s']:>7.2f}{sum(f.values()) / 1e9:>8.2f}"
              f"{(f['factorisation'] + f['propagation']) / 1e9:>7.2f}{r['gflops_per_s']:>9.2f}"
              f"{100 * r['of_peak']:>7.1f}%{r['algorithm_gflops_per_s']:>7.2f}{100 * r['algorithm_of_peak']:>7.1f}%"
              f"{r['floor_s']:>8.3f}"
              + (f"{r['reference_s']:>7.1f}{r['speedup_vs_reference']:>7.0f}×" if "reference_s" in r else ""))
    print("GFLOP: factorisation + propagation + output-error FLOPs; alg: the first two. GFLOP/s: all of them over s; "
          "alg/s: alg over (s − err s). floor: GFLOP at matmul speed. fit s: codec fits (numpy), inside s; err s: "
          "gptq()'s output-error metric timed alone.")
    if model:
        print(f"whole model (SmolLM2, q4_0, {model['tokens'][0]}×{model['tokens'][1]} tokens): "
              f"{model['seconds']:.0f} s in compress(), child wall {model['child_wall_s']:.0f} s, "
              f"{model['median_block_s']:.1f} s per block (median of {len(model['block_s'])}), "
              f"peak RSS {model['peak_rss_bytes'] / 2**20:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed GPTQ calls per small layer (median); "
                                                              "4096×4096 gets a third of it, at least one")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads in the children")
    parser.add_argument("--skip-model", action="store_true", help="only the per-layer part (a)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gptq.json")
    args = parser.parse_args()
    from shared.assets import prepare
    prepare(ROOT / ".edgeforge-assets")
    os.environ["GPTQ_BENCH_REPEAT"] = str(args.repeat)
    load = {"before": os.getloadavg()}
    layers = child(["layers"], args.threads)
    load["after_layers"] = os.getloadavg()
    model = None if args.skip_model else child(["model"], args.threads)
    load["after_model"] = os.getloadavg()
    result = {"machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                          "threads": args.threads, "load_average": load},
              "model": "SmolLM2-135M-Instruct, float32 from the packaged Q4_1 GGUF", "repeat": args.repeat,
              "layers": layers, "whole_model": model}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(layers, model)
    print(f"load average (1 min): {load['before'][0]:.2f} before, {load['after_layers'][0]:.2f} after (a), "
          f"{load['after_model'][0]:.2f} after (b); wrote {args.out}")



if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(run_child(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
