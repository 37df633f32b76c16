"""Parsers for the text that on-device benchmark tools print: pure functions, text in, plain dicts out.

- `parse_benchmark_model`: LiteRT/TFLite `benchmark_model` (tflite/tools/benchmark/benchmark_model.cc:
  the "count=… first=… avg=… std=…" line of each phase, "Inference timings in us: …", the memory lines).
- `parse_llama_bench`: llama.cpp `llama-bench`, its `-o json` / `-o jsonl` output or its default
  markdown table (tools/llama-bench/llama-bench.cpp, json_printer / markdown_printer).
- `parse_perf_test`: onnxruntime `onnxruntime_perf_test`'s summary (onnxruntime/test/perftest/
  performance_runner.cc), in the current "Min Latency: 0.01 s" form and the older "Min Latency is
  0.01 sec" one.
- `parse_time_verbose`: the peak RSS that `time -v` prints, toybox's ("Max RSS (KiB): …", Android's
  /system/bin/time) or GNU's ("Maximum resident set size (kbytes): …").

Every key carries its unit (`_us`, `_ms`, `_s`, `_bytes`, `_mb`, `_pct`, `_tokens_per_s`). A line the
tool always prints that is missing raises ValueError naming it; lines only some versions print are
left out of the result. tests/clients/agent/fixtures/ holds recorded outputs of each tool.
"""
from __future__ import annotations

import json
import re

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


# ---------------------------------------------------------------------------- benchmark_model
_TIMINGS = re.compile(rf"Inference timings in us: Init: ({_NUMBER}), First inference: ({_NUMBER}), "
                      rf"Warmup \(avg\): ({_NUMBER}), Inference \(avg\): ({_NUMBER})")
_STAT_KEYS = ("first", "curr", "min", "max", "avg", "std", "p5", "median", "p95")


def _run_stats(line: str) -> dict:
    """One `Stat::OutputToStream` line in µs: "count=50 first=… curr=… min=… max=… avg=… std=…", plus
    " p5=… median=… p95=…" in newer builds; "count=3 curr=…(all same)" when every run took as long."""
    pairs = dict(re.findall(rf"(\w+)=({_NUMBER})", line))
    stats: dict = {"count": int(float(pairs["count"]))}
    stats.update({f"{key}_us": float(pairs[key]) for key in _STAT_KEYS if key in pairs})
    if "avg_us" not in stats and "curr_us" in stats:        # all runs equal: the tool prints only curr
        same = stats["curr_us"]
        stats.update(first_us=same, min_us=same, max_us=same, avg_us=same, std_us=0.0)
    return stats


def parse_benchmark_model(text: str) -> dict:
    """`benchmark_model` output → {"init_us", "first_inference_us", "warmup_avg_us", "inference_avg_us",
    "warmup": stats, "inference": stats, and when printed "model_size_mb", "init_ms",
    "memory_init_mb"/"memory_overall_mb" (+ "memory_kind": "delta" | "peak"), "peak_memory_mb"}.

    stats: {"count", "first_us", "curr_us", "min_us", "max_us", "avg_us", "std_us"[, "p5_us",
    "median_us", "p95_us"]}. The memory numbers are the tool's own: "Memory footprint delta from the
    start of the tool (MB): init=… overall=…" (newer) or "Peak memory footprint (MB): init=… overall=…"
    (older; also measured from the tool's start), and, with --report_peak_memory_footprint=true,
    "Overall peak memory footprint (MB) via periodic monitoring: …" (the process's peak footprint)."""
    timings = _TIMINGS.search(text)
    if timings is None:
        raise ValueError("benchmark_model output has no 'Inference timings in us: Init: …, First inference: …, "
                         "Warmup (avg): …, Inference (avg): …' line (truncated, or the run failed)")
    lines = text.splitlines()
    phases = []                                  # the stats line after each "Running benchmark for at least …"
    for index, line in enumerate(lines):
        if line.lstrip().startswith("Running benchmark for at least"):
            following = next((later.strip() for later in lines[index + 1:] if later.strip()), "")
            if following.startswith("count="):
                phases.append(_run_stats(following))
    if len(phases) < 2:
        raise ValueError(f"benchmark_model output has {len(phases)} of the 2 'count=…' run statistics lines "
                         "(warm-up and inference) after 'Running benchmark for at least …'")
    result: dict = {"init_us": float(timings[1]), "first_inference_us": float(timings[2]),
                    "warmup_avg_us": float(timings[3]), "inference_avg_us": float(timings[4]),
                    "warmup": phases[-2], "inference": phases[-1]}
    if size := re.search(rf"The input model file size \(MB\): ({_NUMBER})", text):
        result["model_size_mb"] = float(size[1])
    if init := re.search(rf"Initialized session in ({_NUMBER})\s*ms", text):
        result["init_ms"] = float(init[1])
    memory = re.search(rf"(Memory footprint delta from the start of the tool|Peak memory footprint) \(MB\): "
                       rf"init=({_NUMBER}) overall=({_NUMBER})", text)
    if memory:
        result.update(memory_kind="delta" if memory[1].startswith("Memory") else "peak",
                      memory_init_mb=float(memory[2]), memory_overall_mb=float(memory[3]))
    if peak := re.search(rf"Overall peak memory footprint \(MB\) via periodic monitoring: ({_NUMBER})", text):
        result["peak_memory_mb"] = float(peak[1])
    return result


# ---------------------------------------------------------------------------- llama-bench
_TEST_NAME = re.compile(r"^(?:pp(\d+))?(?:\+)?(?:tg(\d+))?(?: @ d(\d+))?$")


def _test_tokens(name: str) -> tuple[int, int, int]:
    """"pp512" → (512, 0, 0); "tg128" → (0, 128, 0); "pp4096+tg128" → (4096, 128, 0); "pp512 @ d4096"."""
    match = _TEST_NAME.match(name)
    if match is None or not (match[1] or match[2]):
        raise ValueError(f"llama-bench test name {name!r} is not ppN, tgN, ppN+tgM (optionally ' @ dN')")
    return int(match[1] or 0), int(match[2] or 0), int(match[3] or 0)


def _test_name(n_prompt: int, n_gen: int, n_depth: int) -> str:
    """llama-bench's own naming (markdown_printer::print_test)."""
    name = f"pp{n_prompt}" if not n_gen else f"tg{n_gen}" if not n_prompt else f"pp{n_prompt}+tg{n_gen}"
    return f"{name} @ d{n_depth}" if n_depth else name


def _json_test(entry: dict) -> dict:
    missing = [key for key in ("n_prompt", "n_gen", "avg_ts", "stddev_ts") if key not in entry]
    if missing:
        raise ValueError(f"llama-bench JSON test lacks {', '.join(missing)}")
    test = {"test": _test_name(entry["n_prompt"], entry["n_gen"], entry.get("n_depth", 0)),
            "n_prompt": int(entry["n_prompt"]), "n_gen": int(entry["n_gen"]), "n_depth": int(entry.get("n_depth", 0)),
            "avg_tokens_per_s": float(entry["avg_ts"]), "stddev_tokens_per_s": float(entry["stddev_ts"])}
    optional = {"n_threads": "threads", "model_type": "model", "model_size": "model_size_bytes",
                "model_n_params": "model_params", "backends": "backend", "avg_ns": "avg_ns", "stddev_ns": "stddev_ns"}
    test.update({ours: entry[theirs] for theirs, ours in optional.items() if theirs in entry})
    if "samples_ns" in entry:
        test["samples_ns"] = [int(value) for value in entry["samples_ns"]]
        test["samples_tokens_per_s"] = [float(value) for value in entry.get("samples_ts", [])]
    return test


def _llama_json(text: str) -> list[dict] | None:
    """The entries of `-o json` (an array) or `-o jsonl` (one object a line); None if neither is there."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "["), None)
    if start is not None:
        end = next((i for i in range(len(lines) - 1, start, -1) if lines[i].strip() == "]"), None)
        if end is None:
            raise ValueError("llama-bench JSON output is truncated: '[' has no closing ']'")
        try:
            entries = json.loads("\n".join(lines[start:end + 1]))
        except json.JSONDecodeError as error:
            raise ValueError(f"llama-bench JSON output is malformed: {error}") from None
        return entries
    objects = [line.strip() for line in lines if line.strip().startswith("{\"build_commit\"")]
    if not objects:
        return None
    try:
        return [json.loads(line) for line in objects]
    except json.JSONDecodeError as error:
        raise ValueError(f"llama-bench JSONL output is malformed: {error}") from None


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _llama_markdown(text: str) -> list[dict] | None:
    lines = text.splitlines()
    header_at = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|")
                      and "test" in _cells(line) and "t/s" in _cells(line)), None)
    if header_at is None:
        return None
    header = _cells(lines[header_at])
    tests = []
    for line in lines[header_at + 2:]:                      # after the |---:| separator
        if not line.lstrip().startswith("|"):
            break
        cells = _cells(line)
        if len(cells) != len(header) or not line.rstrip().endswith("|"):
            raise ValueError(f"llama-bench table row has {len(cells)} of {len(header)} cells (truncated?): {line!r}")
        row = dict(zip(header, cells))
        speed = re.fullmatch(rf"({_NUMBER}) ± ({_NUMBER})", row["t/s"])
        if speed is None:
            raise ValueError(f"llama-bench t/s cell {row['t/s']!r} is not 'mean ± stddev'")
        n_prompt, n_gen, n_depth = _test_tokens(row["test"])
        test = {"test": row["test"], "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": n_depth,
                "avg_tokens_per_s": float(speed[1]), "stddev_tokens_per_s": float(speed[2])}
        for column, key in (("model", "model"), ("size", "size"), ("params", "params"), ("backend", "backend")):
            if column in row:
                test[key] = row[column]
        if "threads" in row:
            test["threads"] = int(row["threads"]) if row["threads"].isdigit() else row["threads"]
        tests.append(test)
    if not tests:
        raise ValueError("llama-bench markdown table has a header but no result rows (truncated, or every test failed)")
    return tests


def parse_llama_bench(text: str) -> dict:
    """llama-bench output → {"format": "json" | "markdown", "tests": [test, ...], and when printed
    "build_commit", "build_number"}.

    test: {"test" ("pp512", "tg128", "pp512+tg128", "… @ dN"), "n_prompt", "n_gen", "n_depth",
    "avg_tokens_per_s", "stddev_tokens_per_s"} plus, from JSON, "samples_ns" (each run's wall time),
    "samples_tokens_per_s", "avg_ns", "stddev_ns", "threads", "model", "model_size_bytes", and from the
    table "model", "size", "params", "backend", "threads" as printed."""
    entries = _llama_json(text)
    if entries is not None:
        if not isinstance(entries, list) or not entries:
            raise ValueError("llama-bench JSON output holds no tests (an empty array)")
        result = {"format": "json", "tests": [_json_test(entry) for entry in entries]}
        if "build_commit" in entries[0]:
            result.update(build_commit=str(entries[0]["build_commit"]), build_number=int(entries[0]["build_number"]))
        return result
    tests = _llama_markdown(text)
    if tests is None:
        raise ValueError("llama-bench output has neither a JSON array (-o json), JSON lines (-o jsonl) nor a "
                         "markdown table with 'test' and 't/s' columns")
    result = {"format": "markdown", "tests": tests}
    if build := re.search(r"^build: (\S+) \((\d+)\)\s*$", text, re.MULTILINE):
        result.update(build_commit=build[1], build_number=int(build[2]))
    return result


# ---------------------------------------------------------------------------- onnxruntime_perf_test
# (key, unit) -> the line's label as each version printed it; the number follows ":" or " is".
_PERF_LINES = {
    "session_creation_s": ("Session creation time cost",),
    "first_inference_ms": ("First inference time cost",),
    "total_inference_time_s": ("Total inference time cost", "Total time cost"),
    "inference_requests": ("Total inference requests", "Total iterations"),
    "average_inference_ms": ("Average inference time cost", "Average time cost"),
    "total_run_time_s": ("Total inference run time", "Total run time"),
    "inferences_per_s": ("Number of inferences per second",),
    "avg_cpu_usage_pct": ("Avg CPU usage",),
    "peak_working_set_bytes": ("Peak working set size",),
    "min_latency_s": ("Min Latency",), "max_latency_s": ("Max Latency",),
    "p50_latency_s": ("P50 Latency",), "p90_latency_s": ("P90 Latency",), "p95_latency_s": ("P95 Latency",),
    "p99_latency_s": ("P99 Latency",), "p999_latency_s": ("P999 Latency",),
}
_INTEGERS = {"inference_requests", "peak_working_set_bytes"}


def parse_perf_test(text: str) -> dict:
    """onnxruntime_perf_test's summary → {"average_inference_ms", "inference_requests", and what the
    version printed of "session_creation_s", "first_inference_ms", "total_inference_time_s",
    "total_run_time_s", "inferences_per_s", "avg_cpu_usage_pct", "peak_working_set_bytes",
    "min_latency_s", "max_latency_s", "p50_latency_s", "p90_latency_s", "p95_latency_s",
    "p99_latency_s", "p999_latency_s"}. The percentiles are printed with -s (or with no result file)."""
    result: dict = {}
    for key, labels in _PERF_LINES.items():
        for label in labels:
            match = re.search(rf"^\s*{re.escape(label)}(?::| is)\s*({_NUMBER})", text, re.MULTILINE)
            if match:
                result[key] = int(float(match[1])) if key in _INTEGERS else float(match[1])
                break
    missing = [labels[0] for key, labels in _PERF_LINES.items()
               if key in ("average_inference_ms", "inference_requests") and key not in result]
    if missing:
        raise ValueError(f"onnxruntime_perf_test output has no {' / '.join(repr(m) for m in missing)} line "
                         "(truncated, or the run failed)")
    return result


# ---------------------------------------------------------------------------- time -v
def parse_time_verbose(text: str) -> dict:
    """{"max_rss_bytes"} from toybox `time -v` ("Max RSS (KiB): 2448") or GNU time -v ("Maximum resident
    set size (kbytes): 2208"); both report getrusage's ru_maxrss, in KiB on Linux."""
    match = re.search(r"^\s*(?:Max RSS \(KiB\)|Maximum resident set size \(kbytes\)):\s*(\d+)\s*$", text, re.MULTILINE)
    if match is None:
        raise ValueError("no 'Max RSS (KiB):' (toybox time -v) or 'Maximum resident set size (kbytes):' "
                         "(GNU time -v) line")
    return {"max_rss_bytes": int(match[1]) * 1024}
