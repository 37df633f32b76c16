"""What the phones' benchmark tools measured, as Measurement fields (proto names of common.proto).

parsers.py only reads each tool's text; what its numbers mean as a Measurement is decided here, and
every number that is derived rather than measured is said in `notes`: benchmark_model prints mean,
std and (newer builds) median but no samples; llama-bench runs its own warm-up and a fixed count;
onnxruntime_perf_test prints summary percentiles of one input shape.
"""
from __future__ import annotations

from .drivers import CAUSAL_LM
from .measure import Config, cv_pct, latency_stats


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _memory(result: dict, notes: list[str], rss_bytes: int | None, fallback_bytes: int | None, fallback: str) -> None:
    if rss_bytes:
        result["peak_rss_bytes"] = rss_bytes
        notes.append("peak_rss_bytes: the benchmark process's max RSS from the phone's `time -v` (ru_maxrss)")
    elif fallback_bytes:
        result["peak_rss_bytes"] = fallback_bytes
        notes.append(f"peak_rss_bytes: {fallback}")
    else:
        notes.append("peak_rss_bytes not measured: no `time -v` on the phone and the tool reported no peak")


def litert_measurement(parsed: dict, config: Config, threads: int, rss_bytes: int | None = None) -> dict:
    """parse_benchmark_model's dict → Measurement fields. benchmark_model prints mean, std, min and max of
    the timed runs (p5/median/p95 in newer builds), not each run: no samples, p90 or p99."""
    runs = parsed["inference"]
    mean_ms, stddev_ms = runs["avg_us"] / 1e3, runs["std_us"] / 1e3
    latency = {"mean_ms": mean_ms, "stddev_ms": stddev_ms}
    if "median_us" in runs:
        latency["p50_ms"] = runs["median_us"] / 1e3
    cv = 100 * stddev_ms / mean_ms if mean_ms else 0.0
    result = {"driver": "adb", "runtime": "litert", "threads": threads, "latency": latency, "cv_pct": cv,
              "unstable": cv > config.max_cv_pct, "load_ms": parsed["init_us"] / 1e3,
              "first_run_ms": parsed["first_inference_us"] / 1e3, "warmup_runs": parsed["warmup"]["count"] - 1,
              "duration_ms": runs["count"] * mean_ms}
    notes = ["latency: one invocation of the file's signature on benchmark_model's random inputs"
             + (" (an edgeforge causal-LM export: a prefill of its fixed sequence length, no KV cache)"
                if config.task == CAUSAL_LM else ""),
             f"benchmark_model reports mean, std{', median' if 'median_us' in runs else ''} of {runs['count']} "
             "runs, not each run: samples, p90 and p99 are not available",
             "duration_ms: runs × mean run time (benchmark_model prints no wall time)"]
    peak_mb = parsed.get("peak_memory_mb")
    _memory(result, notes, rss_bytes, int(peak_mb * 2**20) if peak_mb else None,
            "benchmark_model's peak footprint by periodic monitoring (--report_peak_memory_footprint)")
    return {**result, "notes": notes}


def llama_measurement(latency_run: dict, config: Config, threads: int, rss_bytes: int | None = None) -> dict:
    """parse_llama_bench's dict of the latency run (JSON, with samples) → Measurement fields."""
    tests = {test["test"]: test for test in latency_run["tests"]}
    prompt, generation = config.prompt_tokens, config.generation_tokens
    whole = f"pp{prompt}+tg{generation}"                   # Config: 0 tokens means the default, never none
    if "samples_ns" not in tests.get(whole, {}):
        raise ValueError(f"llama-bench output has no {whole} test with samples (run with -o json); "
                         f"tests: {', '.join(tests) or 'none'}")
    samples = [ns / 1e6 for ns in tests[whole]["samples_ns"]]
    result = {"driver": "adb", "runtime": "llama.cpp", "threads": threads, "latency": latency_stats(samples),
              "cv_pct": cv_pct(samples), "warmup_runs": 1, "duration_ms": sum(samples)}
    result["unstable"] = result["cv_pct"] > config.max_cv_pct
    for name, part in ((f"pp{prompt}", "prompt"), (f"tg{generation}", "generation")):
        if tests.get(name, {}).get("samples_ns"):
            result[f"{part}_samples_ms"] = [ns / 1e6 for ns in tests[name]["samples_ns"]]
            result[f"{part}_tokens_per_s"] = _median(tests[name]["samples_tokens_per_s"])
    notes = [f"latency: llama-bench's {whole} test, {len(samples)} runs (one prompt pass from an empty context, "
             f"then {generation} single-token steps on random tokens)",
             f"prompt/generation tokens per second and samples: llama-bench's separate pp{prompt} and tg{generation} "
             "tests (tg from an empty context), not parts of the latency runs",
             f"warm-up: llama-bench's own, one prompt pass and one token per test (warmup_runs={config.warmup_runs} "
             "not applied); min_duration_ms not applied: llama-bench runs a fixed -r count",
             "load_ms and first_run_ms not measured: llama-bench reports neither",
             "duration_ms: the sum of the timed latency runs"]
    _memory(result, notes, rss_bytes, None, "")
    return {**result, "notes": notes}


def throughput_results(throughput_run: dict) -> list[dict]:
    """parse_llama_bench's dict of the throughput run → ThroughputResult fields, one per ppN/tgM test."""
    return [{"test": test["test"], "tokens": test["n_prompt"] + test["n_gen"], "tokens_per_s": test["avg_tokens_per_s"],
             "stddev_tokens_per_s": test["stddev_tokens_per_s"],
             "samples_ms": [ns / 1e6 for ns in test.get("samples_ns", [])]} for test in throughput_run["tests"]]


def onnx_measurement(runs: list[dict], config: Config, threads: int) -> dict:
    """parse_perf_test's dicts (one run, or prefill and decode for a causal LM) → Measurement fields."""
    def ms(run: dict, key: str) -> float | None:
        return run[key] * 1e3 if key in run else None
    first = runs[0]
    result = {"driver": "adb", "runtime": "onnxruntime", "threads": threads, "warmup_runs": 0}
    notes = ["onnxruntime_perf_test prints summary statistics, not each run: no samples, stddev or cv_pct",
             f"inputs: onnxruntime_perf_test's generated tensors (-I, zeros); its one untimed first inference is "
             f"the cold run (warmup_runs={config.warmup_runs} not applied), min_duration_ms not applied"]
    if "session_creation_s" in first:
        result["load_ms"] = first["session_creation_s"] * 1e3
    if "first_inference_ms" in first:
        result["first_run_ms"] = first["first_inference_ms"]
    if len(runs) == 1:
        latency = {"mean_ms": first["average_inference_ms"]}
        latency.update({f"{p}_ms": value for p in ("p50", "p90", "p99")
                        if (value := ms(first, f"{p}_latency_s")) is not None})
        result["latency"] = latency
        notes.append("one inference; free dimensions of the inputs are 1 (perf_test -I)")
    else:
        prefill, decode = runs
        prompt, generation = config.prompt_tokens, config.generation_tokens
        latency = {"mean_ms": prefill["average_inference_ms"] + generation * decode["average_inference_ms"]}
        medians = ms(prefill, "p50_latency_s"), ms(decode, "p50_latency_s")
        if None not in medians:
            latency["p50_ms"] = medians[0] + generation * medians[1]
        prefill_ms = medians[0] or prefill["average_inference_ms"]      # the mean where no percentiles were printed
        decode_ms = medians[1] or decode["average_inference_ms"]
        result.update(latency=latency, prompt_tokens_per_s=prompt / (prefill_ms / 1e3),
                      generation_tokens_per_s=1e3 / decode_ms)
        notes += [f"derived: latency = prefill of {prompt} tokens + {generation} × one decode step after {prompt} "
                  "tokens (mean: the sum of the means; p50: the sum of the medians, an estimate); p90/p99 not derived",
                  "prompt_tokens_per_s = prompt_tokens / median prefill time; generation_tokens_per_s = 1 / median "
                  "decode step (means where the build printed no percentiles); the prefill carries a one-position "
                  "zero past (perf_test's -f rejects 0)"]
    peaks = [run["peak_working_set_bytes"] for run in runs if "peak_working_set_bytes" in run]
    _memory(result, notes, None, max(peaks) if peaks else None,
            "onnxruntime_perf_test's 'Peak working set size' (getrusage ru_maxrss), the larger of its runs")
    notes.append("no throughput tests: onnxruntime_perf_test has no ppN/tgN tests")
    return {**result, "notes": notes}
