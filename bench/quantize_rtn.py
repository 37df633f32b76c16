"""Our GGUF Q8_0/Q4_0 of SmolLM2 versus llama.cpp's own quantizer, side by side in one run.

    .venv/bin/python bench/quantize_rtn.py [--repeat N]

Both start from the same F16 GGUF (written by our exporter from the float32 reference) and each runs in
its own child process, so wall time and peak RSS are each tool's alone. Peak RSS is the child's VmHWM
(resident pages, file-backed mappings included), read by the child itself: the parent's ru_maxrss for
a child on Linux also counts the parent pages copied at fork, which would inflate both tools.
- llama.cpp: llama_cpp.llama_model_quantize (F16 GGUF -> quantized GGUF).
- ours, end to end: import the F16 GGUF to a float32 model (dequantize), compress (RTN onto the
  llama.cpp grid, streaming tensor by tensor), export GGUF (pack blocks, gguf-py streaming writer).
- ours, quantize+export: the last two steps only, from the already-imported float32 model — the work
  that corresponds to llama.cpp's.
Then every tensor of the two files is compared byte for byte. Results: bench/results/quantize_rtn.json.
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
FTYPES = {"q8_0": 7, "q4_0": 2}
SHA = "0" * 64


def child(argv: list[str]) -> tuple[float, int]:
    """Runs this script's child mode; returns (wall seconds, the child's own peak RSS in bytes)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {argv} failed with {done.returncode}")
    return time.perf_counter() - started, int(done.stdout.strip().splitlines()[-1])


def run_child(mode: str, args: list[str]) -> None:
    if mode == "llama.cpp":
        import llama_cpp
        gguf_type, source, out = args
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = FTYPES[gguf_type], len(os.sched_getaffinity(0))
        assert llama_cpp.llama_model_quantize(source.encode(), out.encode(), params) == 0
        return
    from services.compressor.compress import compress
    from services.exporter.base import ExportInput, ExportOptions
    from services.exporter.formats.gguf import GgufExporter
    from shared.models.bundle import ModelDir
    from shared.models.gguf_import import import_gguf
    from shared.quant.compressed import CompressedModel
    from shared.quant.grids import Method, QuantizationConfig
    if mode == "import":
        source, model_dir = args
        import_gguf(Path(source), Path(model_dir))
        return
    gguf_type, model_dir, work, out = args
    model = ModelDir(Path(model_dir))
    compressed = Path(work) / f"compressed-{gguf_type}.safetensors"
    compress(model, SHA, QuantizationConfig(Method.RTN, gguf_type=gguf_type), compressed)
    GgufExporter().export(ExportInput(model, SHA, CompressedModel(compressed)), Path(out))


def identical_tensors(ours: Path, theirs: Path) -> tuple[int, int]:
    import gguf
    import numpy as np
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    same = sum(1 for n in a if n in b and a[n].tensor_type == b[n].tensor_type and np.array_equal(a[n].data, b[n].data))
    return same, len(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions per tool (the median is reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantize_rtn.json")
    args = parser.parse_args()
    from services.exporter.base import ExportInput, ExportOptions
    from services.exporter.formats.gguf import GgufExporter
    from shared.assets import prepare
    from shared.models.bundle import ModelDir
    assets = ROOT / ".edgeforge-assets"
    prepare(assets)
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "results") as scratch:
        work = Path(scratch)
        f16 = work / "smollm2-f16.gguf"
        GgufExporter().export(ExportInput(ModelDir(assets / "models" / "smollm2-fp32"), SHA, options=ExportOptions(float_type="f16")), f16)
        import_s, import_rss = child(["--child", "import", str(f16), str(work / "from-f16")])
        for gguf_type in FTYPES:
            theirs, ours = work / f"llama-cpp-{gguf_type}.gguf", work / f"ours-{gguf_type}.gguf"
            llama_runs = [child(["--child", "llama.cpp", gguf_type, str(f16), str(theirs)]) for _ in range(args.repeat)]
            our_runs = [child(["--child", "ours", gguf_type, str(work / "from-f16"), str(work), str(ours)])
                        for _ in range(args.repeat)]
            same, total = identical_tensors(ours, theirs)
            llama_s = sorted(t for t, _ in llama_runs)[len(llama_runs) // 2]
            ours_s = sorted(t for t, _ in our_runs)[len(our_runs) // 2]
            rows.append({"type": gguf_type, "llama_cpp_s": llama_s, "ours_quantize_export_s": ours_s,
                         "ours_end_to_end_s": ours_s + import_s, "ratio_quantize_export": ours_s / llama_s,
                         "ratio_end_to_end": (ours_s + import_s) / llama_s,
                         "llama_cpp_peak_rss_bytes": max(r for _, r in llama_runs),
                         "ours_peak_rss_bytes": max(r for _, r in our_runs), "import_peak_rss_bytes": import_rss,
                         "identical_tensors": same, "tensors": total,
                         "bytes": {"ours": ours.stat().st_size, "llama_cpp": theirs.stat().st_size}})
    result = {"machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version()},
              "model": "SmolLM2-135M-Instruct (F16 GGUF input)", "repeat": args.repeat, "import_s": import_s,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'type':<6}{'llama.cpp s':>12}{'ours q+e s':>12}{'ratio':>7}{'ours e2e s':>12}{'ratio':>7}"
          f"{'llama.cpp RSS':>15}{'ours RSS':>10}{'import RSS':>12}  bit-identical")
    for r in rows:
        print(f"{r['type']:<6}{r['llama_cpp_s']:>12.2f}{r['ours_quantize_export_s']:>12.2f}"
              f"{r['ratio_quantize_export']:>7.2f}{r['ours_end_to_end_s']:>12.2f}{r['ratio_end_to_end']:>7.2f}"
              f"{r['llama_cpp_peak_rss_bytes'] / 2**20:>12.0f} MiB{r['ours_peak_rss_bytes'] / 2**20:>6.0f} MiB"
              f"{r['import_peak_rss_bytes'] / 2**20:>8.0f} MiB  {r['identical_tensors']}/{r['tensors']}")
    print(f"wrote {args.out}")



if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        from clients.agent.measure import peak_rss_bytes
        run_child(sys.argv[2], sys.argv[3:])
        print(peak_rss_bytes())            # VmHWM of this process, measured by itself
    else:
        main()
