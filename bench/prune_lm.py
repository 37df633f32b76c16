"""Pruning SmolLM2-135M: perplexity of one-shot methods, and what structured pruning buys.

    .venv/bin/python bench/prune_lm.py [--samples 32] [--sequence-length 512] [--eval-tokens 4096]
                                       [--threads 1] [--generate 128] [--runs 5] [--fresh]

Model: SmolLM2-135M-Instruct as float32 (the reference ModelDir of shared/assets.py). Calibration:
the first samples × sequence_length tokens of the Wikipedia calibration text (as bench/quality.py
builds them); evaluation: perplexity by the torch reference runtime (services/exporter/runtimes.py)
on the held-out Wikipedia text, [BOS] + 511-token windows over the first eval-tokens tokens.

(a) Unstructured 50% and 2:4 sparsity of every block linear (q, k, v, o, gate, up, down; embeddings,
    norms and head dense) by magnitude, Wanda and SparseGPT (services/compressor/prune). Besides
    perplexity: the mean relative output error of the linears on the calibration inputs, and what
    the linears cost stored dense against the cheapest sparse layout (prune/sparse.py: bitmask or
    CSR) — the dense float file itself is exactly as large as before.
(b) Structured: 25% of the MLP neurons of every layer removed (activation-aware importance,
    prune_decoder_neurons): parameters, ModelDir bytes, GGUF f16 bytes (the GGUF exporter), and the
    speed of dense vs pruned GGUF in llama.cpp through the device agent's driver
    (clients/agent/drivers.py): prompt processing (pp) and generation (tg) tokens/s, the median of
    --runs alternating runs each, on --threads threads. No fine-tuning: the perplexity is one-shot.
Results accumulate in bench/results/prune_lm.json (an interrupted run resumes; --fresh starts over).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from clients.agent.profile import cpu_model  # noqa: E402  (after the path set-up)
SHA = "0" * 64
PATTERNS = {"50%": {"sparsity": 0.5}, "2:4": {"n": 2, "m": 4}}
METHODS = ("magnitude", "wanda", "sparsegpt")
NEURON_FRACTION = 0.25
CALIBRATION_CHARS = 400_000              # a prefix of calib.txt: far more tokens than 32 × 512 need


def perplexity(directory: Path, token_windows: list[list[int]]) -> float:
    from services.exporter.quality import perplexity as measure
    from services.exporter.runtimes import ReferenceRuntime
    runtime = ReferenceRuntime(directory)
    try:
        return measure(runtime, token_windows).value
    finally:
        runtime.close()


def storage(directory: Path, names: list[str]) -> dict:
    """Bytes of the pruned linears as float32 dense and in the cheapest sparse layout."""
    from services.compressor.prune.sparse import sparse_size
    from shared.models.bundle import ModelDir
    model = ModelDir(directory)
    sizes = [sparse_size(model.array(name)) for name in names]
    formats = sorted({size.format for size in sizes})
    return {"linear_dense_bytes": sum(s.dense_bytes for s in sizes),
            "linear_sparse_bytes": sum(s.stored_bytes for s in sizes), "sparse_formats": formats}


def export_gguf(directory: Path, out: Path) -> int:
    from services.exporter.base import ExportInput, ExportOptions
    from services.exporter.formats.gguf import GgufExporter
    from shared.models.bundle import ModelDir
    GgufExporter().export(ExportInput(ModelDir(directory), SHA, options=ExportOptions(float_type="f16")), out)
    return out.stat().st_size


def speeds(paths: dict[str, Path], threads: int, generate: int, runs: int) -> dict[str, dict]:
    """pp and tg tokens/s of each GGUF, runs alternating between the files so drift hits both alike."""
    from clients.agent.drivers import LlamaCppDriver
    from clients.agent.measure import token_sequence
    drivers = {key: LlamaCppDriver(path, 2 * generate + 8, threads) for key, path in paths.items()}
    try:
        tokens = token_sequence(next(iter(drivers.values())).vocab_size, generate)
        samples: dict[str, dict[str, list[float]]] = {key: {"pp": [], "tg": []} for key in drivers}
        for run in range(runs + 1):                           # the first round warms up
            for key, driver in drivers.items():
                pp_ms = driver.prompt(tokens)
                driver.prompt(tokens[:1])
                tg_ms = driver.generate(generate)
                if run:
                    samples[key]["pp"].append(generate / (pp_ms / 1e3))
                    samples[key]["tg"].append(generate / (tg_ms / 1e3))
    finally:
        for driver in drivers.values():
            driver.close()
    return {key: {f"{test}{generate}_tokens_per_s": statistics.median(values) for test, values in rates.items()}
            for key, rates in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads")
    parser.add_argument("--generate", type=int, default=128, help="tokens per pp and tg test")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results in --out")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prune_lm.json")
    args = parser.parse_args()

    import numpy as np
    import torch
    from services.calibrator.stats import CalibrationConfig, sequences
    from services.compressor.prune.decoder import prune_decoder, prune_decoder_neurons
    from services.exporter.quality import windows
    from shared.assets import prepare
    from shared.models.bundle import ModelDir
    from shared.models.decoder_config import is_linear_weight
    from shared.models.tokenizer import TextTokenizer

    torch.set_num_threads(args.threads)
    assets = ROOT / ".edgeforge-assets"
    prepare(assets)
    source = assets / "models" / "smollm2-fp32"
    model = ModelDir(source)
    tokenizer = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    eval_windows = windows(tokenizer.encode((assets / "data" / "eval.txt").read_text()), tokenizer.bos_id, 512,
                           args.eval_tokens)
    calibration = CalibrationConfig(args.samples, args.sequence_length).validated()
    text = (assets / "data" / "calib.txt").read_text()[:CALIBRATION_CHARS]
    seqs = torch.tensor(sequences(tokenizer.encode(text), tokenizer.bos_id, calibration))
    linears = [name for name in model.tensor_names() if is_linear_weight(name)]
    settings = {"samples": args.samples, "sequence_length": args.sequence_length, "eval_tokens": args.eval_tokens,
                "threads": args.threads, "generate": args.generate, "runs": args.runs}
    results: dict = {}
    if args.out.is_file() and not args.fresh:
        previous = json.loads(args.out.read_text())
        if previous.get("settings") == settings:
            results = previous.get("results", {})

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                        "torch": torch.__version__, "threads": args.threads},
            "model": "SmolLM2-135M-Instruct, float32 from the packaged Q4_1 GGUF", "settings": settings,
            "results": results}, indent=2) + "\n")

    work = Path(tempfile.mkdtemp(dir=ROOT / "bench" / "results", prefix=".prune-lm-"))
    try:
        if "dense" not in results:
            results["dense"] = {"perplexity": perplexity(source, eval_windows), **storage(source, linears)}
            save()
        for pattern, arguments in PATTERNS.items():
            for method in METHODS:
                key = f"{method}/{pattern}"
                if key in results:
                    continue
                out = work / key.replace("/", "-").replace("%", "").replace(":", "-")
                report = prune_decoder(model, method=method, sequences=seqs, out_dir=out, **arguments)
                results[key] = {"perplexity": perplexity(out, eval_windows), "seconds": report.seconds,
                                "sparsity": report.overall_sparsity,
                                "mean_output_error": float(np.mean(list(report.output_error.values()))),
                                **storage(out, linears)}
                print(key, results[key], flush=True)
                shutil.rmtree(out)
                save()
        key = f"neurons/{NEURON_FRACTION:.0%}"
        if key not in results:
            out = work / "neurons"
            report = prune_decoder_neurons(model, fraction=NEURON_FRACTION, sequences=seqs, out_dir=out)
            dense_gguf, pruned_gguf = work / "dense.gguf", work / "pruned.gguf"
            sizes = {"dense": export_gguf(source, dense_gguf), "pruned": export_gguf(out, pruned_gguf)}
            rates = speeds({"dense": dense_gguf, "pruned": pruned_gguf}, args.threads, args.generate, args.runs)
            results[key] = {
                "perplexity": perplexity(out, eval_windows), "seconds": report.seconds,
                "intermediate_size": [report.intermediate_size_before, report.intermediate_size_after],
                "parameters": [report.parameters_before, report.parameters_after],
                "model_dir_bytes": [sum(p.stat().st_size for p in d.iterdir()) for d in (source, out)],
                "gguf_f16_bytes": [sizes["dense"], sizes["pruned"]],
                "speed": rates,
                "tg_speedup": rates["pruned"][f"tg{args.generate}_tokens_per_s"]
                / rates["dense"][f"tg{args.generate}_tokens_per_s"],
                "pp_speedup": rates["pruned"][f"pp{args.generate}_tokens_per_s"]
                / rates["dense"][f"pp{args.generate}_tokens_per_s"]}
            print(key, results[key], flush=True)
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results, args.generate)


def print_table(results: dict, generate: int) -> None:
    dense = results["dense"]["perplexity"]
    print(f"dense float32: perplexity {dense:.2f}")
    print(f"{'method':<11}{'pattern':<9}{'perplexity':>11}{'×dense':>8}{'out err':>9}{'linears MB':>12}"
          f"{'sparse MB':>11}{'layout':>9}{'seconds':>9}")
    for key, row in results.items():
        if key == "dense" or key.startswith("neurons"):
            continue
        method, pattern = key.split("/")
        print(f"{method:<11}{pattern:<9}{row['perplexity']:>11.2f}{row['perplexity'] / dense:>8.2f}"
              f"{row['mean_output_error']:>9.4f}{row['linear_dense_bytes'] / 1e6:>12.1f}"
              f"{row['linear_sparse_bytes'] / 1e6:>11.1f}{'+'.join(row['sparse_formats']):>9}{row['seconds']:>9.0f}")
    for key, row in results.items():
        if not key.startswith("neurons"):
            continue
        (p0, p1), (m0, m1), (g0, g1) = row["parameters"], row["model_dir_bytes"], row["gguf_f16_bytes"]
        speed = row["speed"]
        print(f"\nstructured, {key.split('/')[1]} of MLP neurons removed (intermediate "
              f"{row['intermediate_size'][0]} -> {row['intermediate_size'][1]}), no fine-tuning:")
        print(f"  parameters {p0 / 1e6:.1f}M -> {p1 / 1e6:.1f}M ({p1 / p0:.3f}×); ModelDir {m0 / 1e6:.0f} -> "
              f"{m1 / 1e6:.0f} MB; GGUF f16 {g0 / 1e6:.1f} -> {g1 / 1e6:.1f} MB ({g1 / g0:.3f}×)")
        print(f"  perplexity {dense:.2f} -> {row['perplexity']:.2f}")
        for test in (f"pp{generate}", f"tg{generate}"):
            rate = f"{test}_tokens_per_s"
            print(f"  llama.cpp {test}: {speed['dense'][rate]:.1f} -> {speed['pruned'][rate]:.1f} tokens/s "
                  f"({speed['pruned'][rate] / speed['dense'][rate]:.2f}×)")


if __name__ == "__main__":
    main()
