"""Our int8 ONNX beside onnxruntime's own dynamic int8 quantization, on SmolLM2-135M, one run.

    .venv/bin/python bench/onnx_int8.py [--threads N] [--windows 4] [--window-tokens 256] [--repeat 5]

Rows (every file is a decoder graph written by services/exporter/formats/onnx.py, or derived from one):
- fp32: our float32 export of the model (the baseline of every ratio).
- ours int8: the compressor's RTN int8 per-channel symmetric codes, carried by DequantizeLinear →
  MatMul (float activations as written). onnxruntime 1.32 fuses that pair into MatMulNBits and, by
  default (session.qdq_matmulnbits_accuracy_level 4), computes it with int8-quantized activations;
  the row is measured twice: as onnxruntime runs it by default, and with accuracy level 0 (float
  activations: exactly the computation the file describes).
- ours int8 W8A8 (static QDQ): the same codes, plus every linear's input quantized to uint8 with the
  calibrator's (min, max) (--calibration-samples × 256 tokens of calib.txt).
- ort quantize_dynamic: onnxruntime.quantization.quantize_dynamic of our fp32 file, int8 per-channel
  weights for the linears' MatMuls only (the attention MatMuls of two activations are left float, as
  in our files), activations quantized dynamically per call — onnxruntime's recipe for transformers;
  with its defaults, and with reduce_range (7-bit weights), its documented remedy for the int16
  saturation of uint8×int8 kernels on CPUs without VNNI.
Embeddings and the tied head stay float32 in every row (quantize_dynamic's preprocessing turns the
tied head's Gemm into a MatMul over a transposed float32 copy of the embedding table: +113 MB).

Measured: file size; then per row in a fresh child process session load time, peak RSS (that
child's VmHWM after loading, a 128-token prefill and 16 decode steps: the serving footprint,
Python and numpy included), perplexity over --windows windows of eval.txt (services/exporter/
quality.py: BOS + window−1 tokens, each token scored once), top-1 agreement and mean |Δlogit|
against the fp32 row's logits on the same windows; then, in one child holding every session, latency
of a 128-token prefill and of the 16 decode steps after it through the KV cache, rows interleaved
--repeat times after a warm-up round (so load from other processes falls on every row alike), median
of each. Results: bench/results/onnx_int8.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import numpy as np  # noqa: E402  (after the path set-up)

MODEL = ROOT / ".edgeforge-assets" / "models" / "smollm2-fp32"
DATA = ROOT / ".edgeforge-assets" / "data"
SHA = "0" * 64
FLOAT_ACTIVATIONS = {"session.qdq_matmulnbits_accuracy_level": "0"}
# row -> (file, onnxruntime session config, label)
ROWS = {"fp32": ("fp32.onnx", {}, "fp32 (ours)"),
        "ours-int8": ("int8.onnx", {}, "ours int8 weight-only, ort default (int8 activations)"),
        "ours-int8-float-act": ("int8.onnx", FLOAT_ACTIVATIONS, "ours int8 weight-only, accuracy level 0"),
        "ours-int8-qdq": ("int8-qdq.onnx", {}, "ours int8 W8A8 static QDQ"),
        "ort-dynamic-int8": ("ort-dynamic-int8.onnx", {}, "ort quantize_dynamic int8"),
        "ort-dynamic-int8-rr": ("ort-dynamic-int8-rr.onnx", {}, "ort quantize_dynamic int8, reduce_range")}
PREFILL_TOKENS, DECODE_STEPS = 128, 16


def prepare(work: Path, samples: int) -> dict:
    """Writes every row's file; returns seconds per step."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from services.calibrator.stats import CalibrationConfig, calibrate, write_stats
    from services.compressor.compress import compress
    from services.exporter.base import ActivationRanges, ExportInput, ExportOptions
    from services.exporter.formats.onnx import OnnxExporter
    from shared.models.bundle import ModelDir
    from shared.quant.compressed import CompressedModel
    from shared.quant.grids import Granularity, Method, QuantizationConfig
    model, seconds = ModelDir(MODEL), {}

    def timed(name, run):
        started = time.perf_counter()
        run()
        seconds[name] = round(time.perf_counter() - started, 1)
    timed("export fp32", lambda: OnnxExporter().export(ExportInput(model, SHA), work / ROWS["fp32"][0]))
    int8 = QuantizationConfig(Method.RTN, bits=8, granularity=Granularity.PER_CHANNEL)
    timed("compress int8 (RTN)", lambda: compress(model, SHA, int8, work / "int8.safetensors"))
    compressed = CompressedModel(work / "int8.safetensors")
    timed("export ours int8", lambda: OnnxExporter().export(ExportInput(model, SHA, compressed),
                                                             work / ROWS["ours-int8"][0]))
    text = (DATA / "calib.txt").read_text()
    timed("calibrate", lambda: write_stats(
        work / "stats.safetensors",
        calibrate(model, text, CalibrationConfig(samples=samples, sequence_length=256, hessians="none")),
        {"model": SHA, "dataset": "calib.txt"}))
    ranges = ActivationRanges.from_stats(work / "stats.safetensors", "calib.txt")
    timed("export ours int8 QDQ", lambda: OnnxExporter().export(
        ExportInput(model, SHA, compressed, ExportOptions(int8_activations=True), ranges),
        work / ROWS["ours-int8-qdq"][0]))

    def dynamic(row: str, reduce_range: bool):
        import onnx
        graph = onnx.load(str(work / ROWS["fp32"][0]), load_external_data=False).graph
        weights = {t.name for t in graph.initializer}
        linears = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        quantize_dynamic(str(work / ROWS["fp32"][0]), str(work / ROWS[row][0]), per_channel=True,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_quantize=linears)
    timed("ort quantize_dynamic", lambda: dynamic("ort-dynamic-int8", False))
    timed("ort quantize_dynamic reduce_range", lambda: dynamic("ort-dynamic-int8-rr", True))
    return seconds


def eval_windows(windows: int, window_tokens: int) -> list[list[int]]:
    from services.exporter.quality import windows as make_windows
    from shared.models.bundle import ModelDir
    from shared.models.tokenizer import TextTokenizer
    model = ModelDir(MODEL)
    tokenizer = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    tokens = tokenizer.encode((DATA / "eval.txt").read_text())
    return make_windows(tokens, tokenizer.bos_id, window_tokens, windows * (window_tokens - 1))


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class AgainstFp32:
    """A LogitsRuntime that hands each window's logits on (to quality.perplexity) after comparing them
    with the fp32 row's logits of the same window (which the fp32 row stores)."""

    def __init__(self, runtime, work: Path, row: str):
        self.name, self._runtime, self._work, self._row = runtime.name, runtime, work, row
        self.windows = self.agree = self.positions = 0
        self.abs_diff = 0.0

    def logits(self, tokens: list[int]) -> np.ndarray:
        logits = self._runtime.logits(tokens)                                 # (T, vocab)
        path = self._work / f"fp32-logits-{self.windows}.npy"
        if self._row == "fp32":
            np.save(path, logits)
        reference = np.load(path)
        self.agree += int((logits.argmax(-1) == reference.argmax(-1)).sum())
        self.abs_diff += float(np.abs(logits - reference).sum(dtype=np.float64)) / logits.shape[1]
        self.positions += len(tokens)
        self.windows += 1
        return logits


def measure_quality(work: Path, row: str, windows: int, window_tokens: int, threads: int) -> dict:
    """One row in this (child) process: load, one prefill + decode (peak RSS serving), then quality."""
    from services.exporter.quality import perplexity
    from services.exporter.runtimes import OnnxRuntime
    file, config, _ = ROWS[row]
    started = time.perf_counter()
    runtime = OnnxRuntime(work / file, threads, config)
    load_s = time.perf_counter() - started
    logits, cache = runtime.step(eval_windows(1, PREFILL_TOKENS + 1)[0][:PREFILL_TOKENS])
    for _ in range(DECODE_STEPS):
        logits, cache = runtime.step([int(logits[-1].argmax())], cache)
    serving_rss = peak_rss_bytes()                       # before the evaluation's own numpy buffers
    compared = AgainstFp32(runtime, work, row)
    result = perplexity(compared, eval_windows(windows, window_tokens))
    return {"row": row, "file": file, "session_config": config, "size_bytes": (work / file).stat().st_size,
            "load_s": round(load_s, 2), "perplexity": round(result.value, 4), "perplexity_tokens": result.tokens,
            "top1_agreement_vs_fp32": round(compared.agree / compared.positions, 4),
            "mean_abs_logit_diff_vs_fp32": round(compared.abs_diff / compared.positions, 5),
            "peak_rss_bytes": serving_rss, "peak_rss_with_evaluation_bytes": peak_rss_bytes(),
            "runtime": runtime.name}


def measure_latency(work: Path, repeat: int, threads: int) -> dict:
    """Every row's session in this one process; prefill + decode, rows interleaved `repeat` times."""
    from services.exporter.runtimes import OnnxRuntime
    runtimes = {row: OnnxRuntime(work / file, threads, config) for row, (file, config, _) in ROWS.items()}
    prompt = eval_windows(1, PREFILL_TOKENS + 1)[0][:PREFILL_TOKENS]
    prefill = {row: [] for row in ROWS}
    decode = {row: [] for row in ROWS}
    for _ in range(repeat + 1):                                          # the first round warms up
        for row, runtime in runtimes.items():
            started = time.perf_counter()
            logits, cache = runtime.step(prompt)
            prefill[row].append(time.perf_counter() - started)
            for _ in range(DECODE_STEPS):
                token = int(logits[-1].argmax())
                started = time.perf_counter()
                logits, cache = runtime.step([token], cache)
                decode[row].append(time.perf_counter() - started)
    return {row: {"prefill_128_ms": round(1000 * float(np.median(prefill[row][1:])), 1),
                  "decode_ms_per_token": round(1000 * float(np.median(decode[row][DECODE_STEPS:])), 2)}
            for row in ROWS}


def table(rows: list[dict]) -> str:
    by_row = {r["row"]: r for r in rows}
    base = by_row["fp32"]
    lines = ["| file | size MB | ×fp32 | load s | prefill 128 ms | ×fp32 | decode ms/tok | ×fp32 | ppl "
             "| top-1 vs fp32 | mean abs Δlogit | peak RSS MB | ×fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {ROWS[r['row']][2]} | {r['size_bytes'] / 1e6:.0f} | {r['size_bytes'] / base['size_bytes']:.2f} "
            f"| {r['load_s']:.1f} | {r['prefill_128_ms']:.0f} | {r['prefill_128_ms'] / base['prefill_128_ms']:.2f} "
            f"| {r['decode_ms_per_token']:.1f} | {r['decode_ms_per_token'] / base['decode_ms_per_token']:.2f} "
            f"| {r['perplexity']:.3f} | {r['top1_agreement_vs_fp32']:.4f} | {r['mean_abs_logit_diff_vs_fp32']:.4f} "
            f"| {r['peak_rss_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f} |")
    theirs = by_row["ort-dynamic-int8-rr"]
    for name in ("ours-int8", "ours-int8-float-act"):
        ours = by_row[name]
        lines.append(f"\n{ROWS[name][2]} ÷ {ROWS[theirs['row']][2]}: "
                     f"size {ours['size_bytes'] / theirs['size_bytes']:.2f}, "
                     f"prefill {ours['prefill_128_ms'] / theirs['prefill_128_ms']:.2f}, decode "
                     f"{ours['decode_ms_per_token'] / theirs['decode_ms_per_token']:.2f}, peak RSS "
                     f"{ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}; perplexity {ours['perplexity']:.3f} vs "
                     f"{theirs['perplexity']:.3f} (fp32 {base['perplexity']:.3f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (and OMP_NUM_THREADS)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeforge-bench-onnx-int8"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)           # child mode: a row's quality, or "latency"
    parser.add_argument("--skip-prepare", action="store_true", help="reuse the files in --work")
    args = parser.parse_args()
    if args.measure == "latency":
        print(json.dumps(measure_latency(args.work, args.repeat, args.threads)))
        return
    if args.measure:
        print(json.dumps(measure_quality(args.work, args.measure, args.windows, args.window_tokens, args.threads)))
        return
    if not (MODEL / "model.safetensors").is_file():
        sys.exit(f"{MODEL} is missing; run `make assets`")
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    prepare_s = {} if args.skip_prepare else prepare(args.work, args.calibration_samples)
    load_average = os.getloadavg()

    def child(what: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--measure", what, "--work", str(args.work),
                              "--threads", str(args.threads), "--windows", str(args.windows),
                              "--window-tokens", str(args.window_tokens), "--repeat", str(args.repeat)],
                             check=True, capture_output=True, text=True, env=env)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{what}: {result}", file=sys.stderr)
        return result
    rows = [child(row) for row in ROWS]                                 # fp32 first: it stores the reference logits
    latency = child("latency")
    for row in rows:
        row.update(latency[row["row"]])
    import onnxruntime
    from clients.agent.profile import cpu_model
    result = {"model": "SmolLM2-135M (float32 bundle)", "threads": args.threads, "cpu": cpu_model(),
              "machine": platform.machine(), "onnxruntime": onnxruntime.__version__,
              "load_average_before_measuring": load_average,
              "windows": args.windows, "window_tokens": args.window_tokens, "repeat": args.repeat,
              "prefill_tokens": PREFILL_TOKENS, "decode_steps_per_prefill": DECODE_STEPS,
              "calibration_samples": args.calibration_samples, "prepare_seconds": prepare_s, "rows": rows}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "onnx_int8.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
