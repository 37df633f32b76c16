"""Quality of every quantization method on the real model, measured by llama.cpp, in one table.

    .venv/bin/python bench/quality.py [--samples 32] [--sequence-length 512] [--eval-tokens 4096]
                                      [--only q4_0,int4-g64-sym] [--methods rtn,gptq] [--fresh]

Model: SmolLM2-135M-Instruct, dequantized from the packaged GGUF to float32 (the reference). Its
linears were stored as Q4_1 (asymmetric, group 32), so asymmetric group-32 RTN would reconstruct
them exactly; every grid here is different on purpose: symmetric groups of 64, 3 bits, Q4_0, Q4_K.
(The issue names group 128, which does not divide SmolLM2's 576-wide rows; 64 is the nearest that
does.) Calibration: the first samples × sequence_length tokens of the Wikipedia calibration text;
evaluation: perplexity by llama.cpp on the held-out Wikipedia text, [BOS] + 511-token windows over the
first eval-tokens tokens, the same windows for every row.

Every row is a GGUF file evaluated by llama.cpp: GGUF types are exported as they ship; generic grids
(int4/int3 groups, not llama.cpp types) are dequantized and written as F32 GGUF ("fake quant"), which
measures exactly the rounding. llama.cpp's own Q4_0 and Q4_K_M of the same model (llama_model_quantize
from the same float32 weights as an F32 GGUF, no imatrix) are the peers. Results accumulate in bench/results/quality.json so an
interrupted run resumes; --fresh starts over.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from clients.agent.profile import cpu_model  # noqa: E402  (after the path set-up)
SHA = "0" * 64
GRIDS = {
    "q4_0": {"gguf_type": "q4_0"},
    "q4_k_m": {"gguf_type": "q4_k_m"},
    "int4-g64-sym": {"bits": 4, "group_size": 64},
    "int3-g64-sym": {"bits": 3, "group_size": 64},
    "q4_k": {"gguf_type": "q4_k"},
}
METHODS = ("rtn", "gptq", "awq+gptq", "imatrix", "awq")
LLAMA_CPP_FTYPES = {"q4_0": 2, "q4_k_m": 15}


def recipe_steps(grid: str, method: str):
    from shared.quant.grids import Granularity, Method, QuantizationConfig
    base = dict(GRIDS[grid])
    if "bits" in base:
        base["granularity"] = Granularity.PER_GROUP

    def step(name: str) -> QuantizationConfig:
        return QuantizationConfig(Method(name), **base).validated()
    names = method.split("+")
    return [step(name) for name in names]


def export_gguf(model, compressed_path: Path | None, out: Path, float_type: str = "f32") -> None:
    """GGUF types ship as they are; generic grids are dequantized into an F32 GGUF (fake quant)."""
    from services.exporter.base import ExportInput, ExportOptions
    from services.exporter.formats.gguf import GgufExporter
    from shared.models.bundle import ModelDir, write_model_dir
    from shared.quant.compressed import CompressedModel
    if compressed_path is None:
        GgufExporter().export(ExportInput(model, SHA, options=ExportOptions(float_type=float_type)), out)
        return
    compressed = CompressedModel(compressed_path)
    if all(p.grid is None or p.grid.gguf_type for p in compressed.plans):
        GgufExporter().export(ExportInput(model, SHA, compressed), out)
        return
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        directory = Path(scratch) / "dequantized"
        write_model_dir(directory, model.config, ((name, compressed.dequantized(name)) for name in model.tensor_names()),
                        model.tokenizer_path.read_text(), model.tokenizer_config())
        GgufExporter().export(ExportInput(ModelDir(directory), SHA), out)


def perplexity(path: Path, token_windows: list[list[int]]) -> float:
    from services.exporter.quality import perplexity as measure
    from services.exporter.runtimes import LlamaCppRuntime
    runtime = LlamaCppRuntime(path, len(token_windows[0]))
    try:
        return measure(runtime, token_windows).value
    finally:
        runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--only", default=",".join(GRIDS), help="grids to run, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results in --out")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    args = parser.parse_args()

    import torch
    from services.calibrator.stats import CalibrationConfig, CalibrationStats, calibrate, sequences, write_stats
    from services.compressor.compress import Calibration, compress
    from services.exporter.quality import windows
    from shared.assets import prepare
    from shared.models.bundle import ModelDir
    from shared.models.tokenizer import TextTokenizer

    assets = ROOT / ".edgeforge-assets"
    prepare(assets)
    model = ModelDir(assets / "models" / "smollm2-fp32")
    tokenizer = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    calibration_text = (assets / "data" / "calib.txt").read_text()
    eval_windows = windows(tokenizer.encode((assets / "data" / "eval.txt").read_text()), tokenizer.bos_id, 512,
                           args.eval_tokens)
    config = CalibrationConfig(args.samples, args.sequence_length).validated()
    settings = {"samples": args.samples, "sequence_length": args.sequence_length, "eval_tokens": args.eval_tokens}
    results = {}
    if args.out.is_file() and not args.fresh:
        previous = json.loads(args.out.read_text())
        if previous.get("settings") == settings:
            results = previous.get("results", {})

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                        "torch_threads": torch.get_num_threads()},
            "model": "SmolLM2-135M-Instruct, float32 from the packaged Q4_1 GGUF", "settings": settings,
            "results": results}, indent=2) + "\n")

    work = Path(tempfile.mkdtemp(dir=ROOT / "bench" / "results", prefix=".quality-"))
    try:
        stats = None
        if "imatrix" in args.methods.split(","):         # only importance-weighted RTN reads the statistics
            stats_path = work / "stats.safetensors"
            started = time.perf_counter()
            write_stats(stats_path, calibrate(model, calibration_text, config),
                        {"model": SHA, "dataset": "calib.txt", "samples": args.samples,
                         "sequence_length": args.sequence_length})
            print(f"calibration: {time.perf_counter() - started:.1f}s", flush=True)
            stats = CalibrationStats.open(stats_path)
        seqs = torch.tensor(sequences(tokenizer.encode(calibration_text[:4_000_000]), tokenizer.bos_id, config))
        if "reference" not in results:
            path = work / "reference.gguf"
            export_gguf(model, None, path)
            results["reference"] = {"perplexity": perplexity(path, eval_windows), "bytes": path.stat().st_size}
            save()
        f32 = work / "reference.gguf"                # llama.cpp quantizes the same float32 weights we do
        for grid, ftype in LLAMA_CPP_FTYPES.items():
            key = f"llama.cpp/{grid}"
            if key in results or grid not in args.only.split(","):
                continue
            import llama_cpp
            if not f32.exists():
                export_gguf(model, None, f32)
            out = work / f"llama-cpp-{grid}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = ftype, len(os.sched_getaffinity(0))
            assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) == 0
            results[key] = {"perplexity": perplexity(out, eval_windows), "bytes": out.stat().st_size}
            print(key, results[key], flush=True)
            save()
        for grid in args.only.split(","):
            for method in args.methods.split(","):
                key = f"{grid}/{method}"
                if key in results:
                    continue
                steps = recipe_steps(grid, method)
                compressed = work / f"{grid}-{method}.safetensors"
                started = time.perf_counter()
                result = compress(model, SHA, steps[-1], compressed, pre_steps=tuple(steps[:-1]),
                                  calibration=Calibration(stats=stats, sequences=seqs))
                seconds = time.perf_counter() - started
                out = work / f"{grid}-{method}.gguf"
                export_gguf(model, compressed, out)
                results[key] = {"perplexity": perplexity(out, eval_windows), "bytes": out.stat().st_size,
                                "bits_per_weight": result.bits_per_weight, "compress_seconds": seconds}
                print(key, results[key], flush=True)
                compressed.unlink()
                out.unlink()
                save()
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)


def gap_closed(results: dict, grid: str, method: str) -> float | None:
    """Share of RTN's perplexity gap to the reference that `method` closes."""
    reference = results["reference"]["perplexity"]
    rtn, other = results.get(f"{grid}/rtn"), results.get(f"{grid}/{method}")
    if rtn is None or other is None or rtn["perplexity"] <= reference:
        return None
    return (rtn["perplexity"] - other["perplexity"]) / (rtn["perplexity"] - reference)


def print_table(results: dict) -> None:
    reference = results["reference"]["perplexity"]
    print(f"reference float32: perplexity {reference:.3f}")
    print(f"{'grid':<14}{'method':<10}{'perplexity':>11}{'Δ%':>8}{'gap closed':>12}{'MB':>8}{'seconds':>9}")
    for key, row in results.items():
        if key == "reference":
            continue
        grid, method = key.split("/", 1)
        closed = gap_closed(results, grid, method) if not grid.startswith("llama") else None
        print(f"{grid:<14}{method:<10}{row['perplexity']:>11.3f}{100 * (row['perplexity'] / reference - 1):>7.1f}%"
              f"{'' if closed is None else f'{100 * closed:.0f}%':>12}{row['bytes'] / 1e6:>8.1f}"
              f"{row.get('compress_seconds', 0):>9.0f}")



if __name__ == "__main__":
    main()
