"""The measurement protocol, run in a child process so its peak RSS is the runtime's alone.

    python -m clients.agent.measure FORMAT PATH CONFIG_JSON   -> one JSON line on stdout

Protocol (llama-bench / MLPerf LoadGen practice): load (timed) → first run (cold, timed) →
warm-up runs → timed runs until both `timed_runs` runs and `min_duration_s` have passed. One run is
prompt processing of `prompt_tokens` from an empty context, then greedy generation of
`generation_tokens`. The prompt is a fixed pseudo-random token sequence (seed 0) so every
candidate and device sees identical input.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from clients.agent.drivers import DRIVERS


def peak_rss_bytes() -> int:
    """This process's peak resident set size, file-backed mapped pages included (Linux VmHWM).

    Read by the process itself: a parent's ru_maxrss for a child would also count the parent's own
    pages copied at fork (Linux keeps the pre-exec maximum), inflating small runtimes' numbers."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024        # bytes on macOS, KiB elsewhere


def percentiles(samples: list[float]) -> dict[str, float]:
    values = np.array(samples, dtype=np.float64)
    return {"p50_ms": float(np.percentile(values, 50)), "p90_ms": float(np.percentile(values, 90)),
            "p99_ms": float(np.percentile(values, 99)), "mean_ms": float(values.mean()),
            "stddev_ms": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def measure(export_format: str, path: Path, config: dict) -> dict:
    prompt_tokens, generation_tokens = config["prompt_tokens"], config["generation_tokens"]
    threads = config.get("threads") or len(os.sched_getaffinity(0))
    start = time.perf_counter()
    driver = DRIVERS[export_format](path, prompt_tokens + generation_tokens + 8, threads)
    load_ms = (time.perf_counter() - start) * 1e3
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(256, driver.vocab_size - 256, size=prompt_tokens)]

    def run() -> tuple[float, float]:
        pp = driver.prompt(prompt)
        return pp, driver.generate(generation_tokens)

    first = run()
    for _ in range(config.get("warmup_runs", 1)):
        run()
    pp_samples, tg_samples = [], []
    began = time.perf_counter()
    while len(pp_samples) < config.get("timed_runs", 5) or time.perf_counter() - began < config.get("min_duration_s", 0):
        pp, tg = run()
        pp_samples.append(pp)
        tg_samples.append(tg)
    peak = peak_rss_bytes()
    driver.close()
    totals = [p + g for p, g in zip(pp_samples, tg_samples)]
    return {"latency": {**percentiles(totals), "samples_ms": totals},
            "prompt_tokens_per_s": prompt_tokens / (float(np.median(pp_samples)) / 1e3),
            "generation_tokens_per_s": generation_tokens / (float(np.median(tg_samples)) / 1e3) if generation_tokens else 0.0,
            "load_ms": load_ms, "first_run_ms": sum(first), "threads": threads,
            "runtime_versions": driver.versions, "prompt_samples_ms": pp_samples, "generation_samples_ms": tg_samples,
            "peak_rss_bytes": peak}


if __name__ == "__main__":
    result = measure(sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]))
    sys.stdout.write(json.dumps(result) + "\n")
