"""Export time and peak memory per format for SmolLM2, and GGUF K-quant export against llama.cpp's quantizer.

    .venv/bin/python bench/export.py [--assets .edgeforge-assets] [--variants gguf-q4_k_m,onnx-f32,...]

Every variant runs in its own child process under `/usr/bin/time -v`, so its peak memory is the
child's maximum RSS as the kernel counts it (mapped file pages included) and nothing one variant
allocated inflates the next. A variant's time is the child's wall time for what a user waits for:
for quantized variants, compress + export from the same float input.

The K-quant comparison is on the same input: SmolLM2 as float16 — an F16 safetensors bundle for
edgeforge (RTN onto Q4_K_M / Q6_K: compress() then the GGUF exporter) and an F16 GGUF of the same
values for llama.cpp (`llama_cpp.llama_model_quantize`, the quantizer `llama-quantize` runs, on every
core). Both outputs are compared tensor by tensor: equal bytes mean equal work done.
Results: bench/results/export.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from clients.agent.profile import cpu_model  # noqa: E402  (after the path set-up)

SHA = "0" * 64
# variant -> (format, quantization (llama.cpp type or generic grid), export options)
VARIANTS = {
    "gguf-f16": ("gguf", None, {"float_type": "f16"}),
    "gguf-q8_0": ("gguf", "q8_0", {}),
    "gguf-q4_k_m": ("gguf", "q4_k_m", {}),
    "gguf-q6_k": ("gguf", "q6_k", {}),
    "llama.cpp-q4_k_m": ("llama.cpp", "q4_k_m", {}),
    "llama.cpp-q6_k": ("llama.cpp", "q6_k", {}),
    "onnx-f32": ("onnx", None, {}),
    "onnx-f16": ("onnx", None, {"float_type": "f16"}),
    "onnx-int8": ("onnx", "int8-per_channel", {}),
    "onnx-int4-matmul_nbits": ("onnx", "int4-g32", {"onnx_weight_operator": "matmul_nbits"}),
    "tflite-f32": ("tflite", None, {}),
    "tflite-int8": ("tflite", "int8-per_channel", {}),
    "coreml-f16": ("coreml", None, {"float_type": "f16"}),
    "coreml-int4": ("coreml", "int4-g32", {}),
}
LLAMA_FTYPES = {"q4_k_m": 15, "q6_k": 18}           # LLAMA_FTYPE_MOSTLY_Q4_K_M, _Q6_K


def quantization(name: str | None):
    from shared.quant.grids import GGUF_TYPES, Granularity, Method, QuantizationConfig
    if name is None:
        return None
    if name in GGUF_TYPES:
        return QuantizationConfig(Method.RTN, gguf_type=name)
    if name == "int8-per_channel":
        return QuantizationConfig(Method.RTN, bits=8, granularity=Granularity.PER_CHANNEL)
    if name == "int4-g32":
        return QuantizationConfig(Method.RTN, bits=4, granularity=Granularity.PER_GROUP, group_size=32)
    raise ValueError(name)


def options(raw: dict):
    from services.exporter.base import ExportOptions, OnnxWeightOperator
    if "onnx_weight_operator" in raw:
        raw = {**raw, "onnx_weight_operator": OnnxWeightOperator(raw["onnx_weight_operator"])}
    return ExportOptions(**raw)


def run_child(variant: str, model_dir: Path, work: Path, f16_gguf: Path) -> dict:
    """One variant, in this (child) process; returns what it wrote."""
    export_format, quant, raw_options = VARIANTS[variant]
    out = work / variant
    if export_format == "llama.cpp":
        import llama_cpp
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = LLAMA_FTYPES[quant], len(os.sched_getaffinity(0))
        if llama_cpp.llama_model_quantize(str(f16_gguf).encode(), str(out).encode(), params) != 0:
            raise RuntimeError("llama_model_quantize failed")
        return {"path": str(out)}
    from services.compressor.compress import compress
    from services.exporter.base import ExportFormat, ExportInput
    from services.exporter.servicer import exporter_for
    from shared.models.bundle import ModelDir
    from shared.quant.compressed import CompressedModel
    model = ModelDir(model_dir)
    compressed = None
    if quant is not None:
        compress(model, SHA, quantization(quant), work / f"{variant}.compressed", device="cpu")
        compressed = CompressedModel(work / f"{variant}.compressed")
    exporter = exporter_for(ExportFormat(export_format))
    source = ExportInput(model, SHA, compressed, options(raw_options))
    exporter.check(source)
    exported = exporter.export(source, out.with_suffix(exporter.suffix))
    return {"path": str(exported.path)}


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(variant: str, model_dir: Path, work: Path, f16_gguf: Path) -> dict:
    """Runs the variant in a child under /usr/bin/time -v: wall seconds, peak RSS, output size."""
    command = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", variant, "--model", str(model_dir),
               "--work", str(work), "--f16-gguf", str(f16_gguf)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode != 0:
        tail = " | ".join(line for line in done.stderr.splitlines()[-40:] if "Error" in line or "error" in line)
        return {"variant": variant, "error": tail[-400:] or f"exit {done.returncode}"}
    written = json.loads(done.stdout.strip().splitlines()[-1])
    return {"variant": variant, "seconds": seconds, "peak_rss_mib": int(peak.group(1)) / 1024,
            "size_bytes": size_of(Path(written["path"])), "path": written["path"]}


def gguf_tensor_bytes(path: Path) -> dict[str, bytes]:
    import gguf
    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def f16_inputs(model_dir: Path, work: Path) -> tuple[Path, Path]:
    """The same float16 weights as an F16 safetensors bundle (ours) and an F16 GGUF (llama.cpp's)."""
    import shutil

    import numpy as np

    from services.exporter.base import ExportInput, ExportOptions
    from services.exporter.formats.gguf import GgufExporter
    from shared.models.bundle import ModelDir
    from shared.tensors.safetensors_writer import write_safetensors
    model = ModelDir(model_dir)
    bundle = work / "model-f16"
    bundle.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, bundle / name)
    shapes = {name: (model.shape(name), "F16") for name in model.tensor_names()}
    write_safetensors(bundle / "model.safetensors", shapes,
                      ((name, model.array(name).astype(np.float16)) for name in model.tensor_names()))
    gguf_path = work / "model-f16.gguf"
    GgufExporter().export(ExportInput(ModelDir(bundle), SHA, options=ExportOptions(float_type="f16")), gguf_path)
    return bundle, gguf_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=ROOT / ".edgeforge-assets")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "export.json")
    parser.add_argument("--child")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--f16-gguf", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.model, args.work, args.f16_gguf)))
        return
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    model_dir = args.assets / "models" / "smollm2-fp32"
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "results", suffix=".tmp") as scratch:
        work = Path(scratch)
        f16_bundle, f16_gguf = f16_inputs(model_dir, work)
        for variant in variants:
            source = f16_bundle if VARIANTS[variant][0] == "gguf" and VARIANTS[variant][1] else model_dir
            row = measure(variant, source, work, f16_gguf)
            rows.append(row)
            print(f"{variant:<26}" + (f"{row['seconds']:>8.1f} s {row['peak_rss_mib']:>8.0f} MiB "
                                      f"{row['size_bytes'] / 1e6:>9.1f} MB" if "error" not in row
                                      else f"  failed: {row['error']}"), flush=True)
        by_name = {row["variant"]: row for row in rows}
        for gguf_type in LLAMA_FTYPES:
            ours, theirs = by_name.get(f"gguf-{gguf_type}"), by_name.get(f"llama.cpp-{gguf_type}")
            if ours and theirs and "error" not in ours and "error" not in theirs:
                a, b = gguf_tensor_bytes(Path(ours["path"])), gguf_tensor_bytes(Path(theirs["path"]))
                same = sum(a[name] == b.get(name) for name in a)
                ours["vs_llama_cpp"] = {"time_ratio": ours["seconds"] / theirs["seconds"],
                                        "peak_rss_ratio": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
                                        "identical_tensors": f"{same}/{len(a)}"}
    for row in rows:
        row.pop("path", None)
    result = {"machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
                          "python": platform.python_version()},
              "model": "SmolLM2-135M-Instruct (float32 reference; K-quant rows from the same weights in float16)",
              "command": "bench/export.py " + " ".join(sys.argv[1:]), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'variant':<26}{'seconds':>9}{'peak MiB':>10}{'MB':>9}   vs llama.cpp (time, RSS, identical tensors)")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<26} failed: {row['error']}")
            continue
        versus = row.get("vs_llama_cpp")
        extra = (f"   {versus['time_ratio']:.2f}x, {versus['peak_rss_ratio']:.2f}x, {versus['identical_tensors']}"
                 if versus else "")
        print(f"{row['variant']:<26}{row['seconds']:>9.1f}{row['peak_rss_mib']:>10.0f}{row['size_bytes'] / 1e6:>9.1f}{extra}")


if __name__ == "__main__":
    main()
