"""RTN throughput against memory-copy bandwidth, and against llama.cpp's quantizer, on the same tensors.

    .venv/bin/python bench/rtn_throughput.py [--repeat N]

The tensors are a synthetic llama checkpoint (bench/large_model.py's generator and weight statistics:
hidden 2048, intermediate 5632, 2 layers, vocab 49152, untied head; ~0.6 GB fp16), so every number
here is on the same weights:
- memcpy: numpy copying each float32 tensor into a preallocated one (np.copyto), in RAM — the
  bandwidth floor any one-pass kernel is measured against.
- RTN kernel: services/compressor/quant/rtn.quantize of each float32 tensor onto Q4_0 and Q8_0, one
  thread, in RAM (no I/O, no measuring), as GB/s of float32 input and as a multiple of memcpy's time.
- compress(): the whole streaming path (read fp16 → quantize on WORKERS threads → SNR → write), RTN
  onto Q4_0 with llama.cpp's per-tensor types (the head gets Q6_K), warm page cache.
- llama.cpp: llama_cpp.llama_model_quantize from the same model as an F16 and as an F32 GGUF
  (written by our exporter) to Q4_0 (same per-tensor types), with 1 thread and with every core.
Each timed step runs `--repeat` times (the median is reported); quantize runs each in a child
process. Results: bench/results/rtn_throughput.json.
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
sys.path[:0] = [str(ROOT), str(ROOT / "gen"), str(ROOT / "bench")]

from clients.agent.profile import cpu_model  # noqa: E402  (after the path set-up)

import numpy as np  # noqa: E402

SHA = "0" * 64
Q4_0_FTYPE = 2                      # LLAMA_FTYPE_MOSTLY_Q4_0


def config():
    from shared.models.decoder_config import DecoderConfig
    return DecoderConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                       num_attention_heads=32, num_key_value_heads=4, rope_theta=500000.0,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def median_seconds(run, repeat: int) -> float:
    """After one untimed warm-up run (first-touch page faults of fresh buffers are not copying)."""
    run()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def child(argv: list[str]) -> float:
    """Runs this script's child mode; returns its wall seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", *argv], check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_child(mode: str, args: list[str]) -> None:
    if mode == "llama.cpp":
        import llama_cpp
        source, out, threads = args
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = Q4_0_FTYPE, int(threads)
        assert llama_cpp.llama_model_quantize(source.encode(), out.encode(), params) == 0
    elif mode == "compress":
        from services.compressor.compress import compress
        from shared.models.bundle import ModelDir
        from shared.quant.grids import Method, QuantizationConfig
        model_dir, out = args
        compress(ModelDir(Path(model_dir)), SHA, QuantizationConfig(Method.RTN, gguf_type="q4_0"), Path(out),
                 device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions per step (the median is reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rtn_throughput.json")
    args = parser.parse_args()
    import large_model
    from services.compressor.quant.rtn import quantize
    from services.exporter.base import ExportInput, ExportOptions
    from services.exporter.formats.gguf import GgufExporter
    from shared.models.bundle import ModelDir
    from shared.quant.grids import GGUF_GRIDS

    shape = config()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "results", suffix=".tmp") as scratch:
        work = Path(scratch)
        large_model.generate(work / "model", shape)
        model = ModelDir(work / "model")
        weights = {n: model.array(n) for n in model.tensor_names() if len(model.shape(n)) == 2}
        f32_bytes = sum(w.nbytes for w in weights.values())
        count = f32_bytes // 4
        copies = {n: np.empty_like(w) for n, w in weights.items()}
        memcpy_s = median_seconds(lambda: [np.copyto(copies[n], w) for n, w in weights.items()], args.repeat)
        del copies
        rows = [{"step": "memcpy (np.copyto, float32, in RAM)", "seconds": memcpy_s, "threads": 1}]
        for gguf_type in ("q4_0", "q8_0"):
            grid = GGUF_GRIDS[gguf_type]
            seconds = median_seconds(lambda: [quantize(w, grid) for w in weights.values()], args.repeat)
            rows.append({"step": f"RTN kernel -> {gguf_type} (float32 in RAM)", "seconds": seconds, "threads": 1})
        del weights
        compress_s = sorted(child(["compress", str(work / "model"), str(work / "c.safetensors")])
                            for _ in range(args.repeat))[args.repeat // 2]
        from services.compressor.streaming import WORKERS
        rows.append({"step": "ours: compress() fp16 -> q4_0 file (head q6_k)", "seconds": compress_s,
                     "threads": WORKERS})
        for float_type in ("f16", "f32"):
            source = work / f"model-{float_type}.gguf"
            GgufExporter().export(ExportInput(model, SHA, options=ExportOptions(float_type=float_type)), source)
            for threads in sorted({1, cores}):
                seconds = sorted(child(["llama.cpp", str(source), str(work / "llama.gguf"), str(threads)])
                                 for _ in range(args.repeat))[args.repeat // 2]
                rows.append({"step": f"llama.cpp: {float_type.upper()} gguf -> q4_0 (head q6_k)", "seconds": seconds,
                             "threads": threads})
            source.unlink()
    for row in rows:
        row["float32_gb_per_s"] = f32_bytes / row["seconds"] / 1e9
        row["mweights_per_s"] = count / row["seconds"] / 1e6
        row["x_memcpy_time"] = row["seconds"] / memcpy_s
    llama_best = min(r["seconds"] for r in rows if r["step"].startswith("llama.cpp: F16") and r["threads"] == cores)
    result = {"machine": {"cpu": cpu_model(), "cores": cores, "python": platform.python_version(), "numpy": np.__version__},
              "model": {"shape": {k: v for k, v in shape.to_hf().items()
                                  if isinstance(v, int) and not isinstance(v, bool)},
                        "weights_2d": int(count), "float32_bytes": int(f32_bytes)},
              "repeat": args.repeat, "rows": rows,
              "compress_over_llama_cpp_f16": compress_s / llama_best}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'step':<50}{'thr':>4}{'seconds':>9}{'GB/s f32':>10}{'Mw/s':>8}{'x memcpy':>10}")
    for r in rows:
        print(f"{r['step']:<50}{r['threads']:>4}{r['seconds']:>9.3f}{r['float32_gb_per_s']:>10.3f}"
              f"{r['mweights_per_s']:>8.1f}{r['x_memcpy_time']:>10.1f}")
    print(f"compress() / llama.cpp (F16 input, {cores} threads): {result['compress_over_llama_cpp_f16']:.2f}x the time")
    print(f"wrote {args.out}")



if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_child(sys.argv[2], sys.argv[3:])
    else:
        main()
