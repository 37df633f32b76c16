"""A model bigger than RAM, quantized to GGUF Q4_0 in bounded memory: peak RSS and throughput
against the I/O floor, in one run.

    .venv/bin/python bench/large_model.py [--size-gb 30] [--dir PATH] [--keep]

1. Checks free disk space for the fp16 input, the compressed file and the GGUF (sizes computed from
   the tensor layout) plus a margin, says what it needs, and exits 2 if it is not there.
2. Writes a synthetic llama-shaped fp16 checkpoint of about --size-gb (HF layout: ~4 GiB shards,
   model.safetensors.index.json, config.json, SmolLM2's tokenizer files). Shape: hidden 5120,
   intermediate 13824, 40 heads / 8 KV heads, vocab 49152 (SmolLM2's tokenizer), untied head;
   the layer count sets the size. Weights: per-row Gaussian with the row's scale log-normal around
   1/√columns, plus sparse heavy-tailed outliers (Student-t, 3 dof, 1 in 10⁴ weights, ×4). To
   generate 30 GB in minutes the Gaussian draws come from one 128 MiB pool per process read at a
   random offset per chunk (every chunk is still Gaussian and per-row scales and outliers are
   drawn fresh); norms are |N(1, 0.1)|.
3. I/O floor: reads the input once, cold — the shards' page-cache pages are dropped first with
   posix_fadvise(DONTNEED), which needs no root for clean pages — in 16 MiB reads.
4. Runs the real pipeline, each step in its own child process under /usr/bin/time -v (the "Maximum
   resident set size", file-backed mapped pages included; without /usr/bin/time, os.wait4's
   ru_maxrss, the same number), caches dropped before each: compress() with RTN onto Q4_0 (the
   output projection gets Q6_K, llama.cpp's rule), then the GGUF export.
5. Checks the GGUF: gguf-py reads every tensor info, and llama.cpp (llama_cpp) loads it (mmap) and
   generates a few tokens (--no-generate skips that).
Prints a table and writes bench/results/large_model.json; deletes what it wrote unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from clients.agent.profile import cpu_model  # noqa: E402  (after the path set-up)

import numpy as np  # noqa: E402

ASSETS = ROOT / ".edgeforge-assets" / "models" / "smollm2-fp32"
SHA = "0" * 64
SHARD_BYTES = 4 << 30
POOL = 1 << 25                      # float32 Gaussian draws reused across chunks (128 MiB)
CHUNK_ELEMENTS = 1 << 24            # one generated chunk: 64 MiB float32, 32 MiB fp16
MARGIN_BYTES = 2 << 30
OUTLIER_RATE, OUTLIER_SCALE = 1e-4, 4.0


def llama_config(size_bytes: int):
    """The shape described in the module docstring, with as many layers as fill `size_bytes` of fp16."""
    from shared.models.decoder_config import DecoderConfig
    hidden, intermediate, heads, kv_heads, vocab = 5120, 13824, 40, 8, 49152
    kv = kv_heads * hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((size_bytes / 2 - fixed) / per_layer))
    return DecoderConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def planned_bytes(config) -> dict[str, int]:
    """Bytes of the fp16 input, the compressed file's payload and the GGUF's tensor data."""
    from services.compressor.compress import plan
    from shared.quant import compressed
    from shared.quant.grids import Method, QuantizationConfig
    model = types.SimpleNamespace(config=config)            # plan() reads only the config
    layout = compressed.layout(plan(model, QuantizationConfig(Method.RTN, gguf_type="q4_0")))
    itemsize = {"F32": 4, "F16": 2, "U8": 1}
    payload = sum(int(np.prod(shape)) * itemsize[dtype] for shape, dtype in layout.values())
    fp16 = sum(2 * int(np.prod(shape)) for shape in config.tensor_shapes().values())
    return {"input": fp16, "compressed": payload, "gguf": payload + (64 << 20)}    # + vocabulary, padding


# ------------------------------------------------------------------------------------ generation

def weight_chunks(name: str, shape: tuple[int, ...], seed: int, pool: np.ndarray):
    """fp16 row chunks of one synthetic tensor (see the module docstring for the statistics)."""
    rng = np.random.default_rng(seed)
    if len(shape) == 1:
        yield np.abs(rng.normal(1.0, 0.1, shape)).astype(np.float16)
        return
    rows, columns = shape
    step = max(1, CHUNK_ELEMENTS // columns)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        offset = int(rng.integers(0, POOL - n * columns))
        row_scale = (rng.lognormal(0.0, 0.5, (n, 1)) / np.sqrt(columns)).astype(np.float32)
        chunk = pool[offset:offset + n * columns].reshape(n, columns) * row_scale
        count = rng.binomial(n * columns, OUTLIER_RATE)
        where = rng.integers(0, n * columns, count)
        chunk.reshape(-1)[where] = (rng.standard_t(3, count).astype(np.float32) * OUTLIER_SCALE *
                                    row_scale[where // columns, 0])
        yield chunk.astype(np.float16)


def generate(directory: Path, config) -> None:
    from shared.tensors.safetensors_writer import write_safetensors
    directory.mkdir(parents=True, exist_ok=True)
    hf = {**config.to_hf(), "torch_dtype": "float16"}
    (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / name, directory / name)
    shapes = list(config.tensor_shapes().items())
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    pool = np.random.default_rng(0).standard_normal(POOL, dtype=np.float32)
    weight_map = {}
    seeds = {name: index + 1 for index, (name, _) in enumerate(shapes)}
    for index, members in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        layout = {name: (shape, "F16") for name, shape in members}
        write_safetensors(directory / file_name, layout,
                          ((name, weight_chunks(name, shape, seeds[name], pool)) for name, shape in members),
                          metadata={"format": "pt"})
        weight_map.update({name: file_name for name, _ in members})
        print(f"  wrote {file_name} ({sum(2 * int(np.prod(s)) for _, s in members) / 1e9:.2f} GB)", flush=True)
    total = sum(2 * int(np.prod(shape)) for _, shape in shapes)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ------------------------------------------------------------------------------------ measuring

def drop_cache(paths: list[Path]) -> None:
    """Drops the files' clean page-cache pages (POSIX_FADV_DONTNEED: no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_once(paths: list[Path]) -> float:
    """Seconds to read every byte of `paths` once, in 16 MiB reads."""
    buffer = bytearray(16 << 20)
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - started


def run_step(argv: list[str]) -> dict:
    """Runs this script's child mode; -> seconds, peak RSS (by /usr/bin/time -v or wait4) and the
    child's own VmHWM."""
    command = [sys.executable, __file__, "--child", *argv]
    timer = Path("/usr/bin/time")
    started = time.perf_counter()
    if timer.exists():
        done = subprocess.run([str(timer), "-v", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"step {argv[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
        source = "/usr/bin/time -v"
        stdout = done.stdout
    else:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        stdout = child.stdout.read()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"step {argv[0]} failed ({status})")
        peak, source = usage.ru_maxrss * 1024, "os.wait4 ru_maxrss"
    return {"seconds": seconds, "peak_rss_bytes": peak, "peak_rss_source": source,
            "child_vmhwm_bytes": int(stdout.strip().splitlines()[-1])}


def run_child(mode: str, args: list[str]) -> None:
    from services.compressor.compress import compress
    from services.exporter.base import ExportInput
    from services.exporter.formats.gguf import GgufExporter
    from shared.models.bundle import ModelDir
    from shared.quant.compressed import CompressedModel
    from shared.quant.grids import Method, QuantizationConfig
    if mode == "compress":
        model_dir, out = args
        compress(ModelDir(Path(model_dir)), SHA, QuantizationConfig(Method.RTN, gguf_type="q4_0"), Path(out),
                 device="cpu")
    elif mode == "export":
        model_dir, compressed, out = args
        GgufExporter().export(ExportInput(ModelDir(Path(model_dir)), SHA, CompressedModel(Path(compressed))),
                              Path(out))
    elif mode == "generate":
        import llama_cpp
        (path,) = args
        llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=len(os.sched_getaffinity(0)), verbose=False)
        started = time.perf_counter()
        out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)
        print(json.dumps({"tokens": out["usage"]["completion_tokens"], "seconds": time.perf_counter() - started}))


def check_gguf(path: Path, config) -> dict:
    import gguf
    reader = gguf.GGUFReader(path)
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    expected = len(config.tensor_shapes())
    if len(reader.tensors) != expected:
        raise SystemExit(f"GGUF holds {len(reader.tensors)} tensors, expected {expected}")
    return {"tensors": len(reader.tensors), "types": types}


# ------------------------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=30.0, help="fp16 checkpoint size in GB (10⁹ bytes)")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "results" / "large-model.tmp",
                        help="scratch directory (deleted at the end unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint, compressed file and GGUF")
    parser.add_argument("--no-generate", action="store_true", help="skip llama.cpp's load-and-generate check")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "large_model.json")
    args = parser.parse_args()
    config = llama_config(int(args.size_gb * 1e9))
    sizes = planned_bytes(config)
    work = args.dir
    work.mkdir(parents=True, exist_ok=True)
    needed = sizes["input"] + sizes["compressed"] + sizes["gguf"] + MARGIN_BYTES
    present = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
    free = shutil.disk_usage(work).free
    print(f"needs {needed / 1e9:.1f} GB free in {work}: input {sizes['input'] / 1e9:.1f} GB + compressed "
          f"{sizes['compressed'] / 1e9:.1f} GB + GGUF {sizes['gguf'] / 1e9:.1f} GB + margin "
          f"{MARGIN_BYTES / 1e9:.1f} GB; {free / 1e9:.1f} GB free", flush=True)
    if free + present < needed:
        raise SystemExit(2)
    model_dir, compressed, gguf_path = work / "model", work / "compressed-q4_0.safetensors", work / "model-q4_0.gguf"
    try:
        print(f"generating {config.num_hidden_layers} layers, {sizes['input'] / 2e9:.2f} G parameters "
              f"({sizes['input'] / 1e9:.1f} GB fp16) in {model_dir}", flush=True)
        started = time.perf_counter()
        generate(model_dir, config)
        generate_s = time.perf_counter() - started
        shards = sorted(model_dir.glob("*.safetensors"))
        drop_cache(shards)
        io_floor_s = read_once(shards)
        print(f"I/O floor: {io_floor_s:.1f} s ({sizes['input'] / io_floor_s / 1e9:.2f} GB/s cold read)", flush=True)
        drop_cache(shards)
        compress_step = run_step(["compress", str(model_dir), str(compressed)])
        print(f"compress: {compress_step['seconds']:.1f} s, peak RSS {compress_step['peak_rss_bytes'] / 2**20:.0f} MiB",
              flush=True)
        drop_cache(shards + [compressed])
        export_step = run_step(["export", str(model_dir), str(compressed), str(gguf_path)])
        print(f"export: {export_step['seconds']:.1f} s, peak RSS {export_step['peak_rss_bytes'] / 2**20:.0f} MiB",
              flush=True)
        check = check_gguf(gguf_path, config)
        if not args.no_generate:
            generation = run_step(["generate", str(gguf_path)])
            check["llama_cpp_generate"] = {"seconds": generation["seconds"],
                                           "peak_rss_bytes": generation["peak_rss_bytes"]}
        result = report(args, config, sizes, generate_s, io_floor_s, compress_step, export_step, check,
                        compressed.stat().st_size, gguf_path.stat().st_size)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def report(args, config, sizes, generate_s, io_floor_s, compress_step, export_step, check, compressed_bytes,
           gguf_bytes) -> dict:
    input_bytes = sizes["input"]
    steps = {"io_floor (cold read of the input)": {"seconds": io_floor_s},
             "compress (RTN -> Q4_0)": compress_step, "export (GGUF)": export_step}
    rows = []
    for step, numbers in steps.items():
        rows.append({"step": step, "seconds": numbers["seconds"],
                     "input_gb_per_s": input_bytes / numbers["seconds"] / 1e9,
                     "peak_rss_mib": numbers.get("peak_rss_bytes", 0) / 2**20,
                     "io_floor_ratio": numbers["seconds"] / io_floor_s})
    total = compress_step["seconds"] + export_step["seconds"]
    rows.append({"step": "compress + export", "seconds": total, "input_gb_per_s": input_bytes / total / 1e9,
                 "peak_rss_mib": max(compress_step["peak_rss_bytes"], export_step["peak_rss_bytes"]) / 2**20,
                 "io_floor_ratio": total / io_floor_s})
    print(f"\n{'step':<36}{'seconds':>9}{'GB/s':>7}{'peak RSS MiB':>14}{'x I/O floor':>13}")
    for row in rows:
        rss = f"{row['peak_rss_mib']:.0f}" if row["peak_rss_mib"] else "-"
        print(f"{row['step']:<36}{row['seconds']:>9.1f}{row['input_gb_per_s']:>7.3f}{rss:>14}"
              f"{row['io_floor_ratio']:>13.1f}")
    print(f"GGUF check: {check}")
    memory = {line.split(":")[0]: line.split(":")[1].strip() for line in Path("/proc/meminfo").read_text().splitlines()
              if line.startswith("MemTotal")}
    return {
        "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "memory": memory.get("MemTotal"),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "load_average_at_end": os.getloadavg()},          # other work on the host slows every step
        "model": {"shape": {k: v for k, v in config.to_hf().items() if isinstance(v, int) and not isinstance(v, bool)},
                  "parameters": input_bytes // 2, "input_bytes": input_bytes, "shards": -(-input_bytes // SHARD_BYTES),
                  "weights": "synthetic: per-row Gaussian, log-normal row scales, Student-t outliers (1e-4)"},
        "generate_s": generate_s,
        "io_floor": "cold: page cache dropped with posix_fadvise(DONTNEED) before each read and step",
        "rows": rows, "compress": compress_step, "export": export_step,
        "compressed_bytes": compressed_bytes, "gguf_bytes": gguf_bytes, "gguf_check": check,
        "peak_rss_limit_bytes": 2 << 30,
        "within_limit": max(compress_step["peak_rss_bytes"], export_step["peak_rss_bytes"]) < 2 << 30}



if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        from clients.agent.measure import peak_rss_bytes
        run_child(sys.argv[2], sys.argv[3:])
        print(peak_rss_bytes())            # VmHWM of this process, measured by itself
    else:
        main()
