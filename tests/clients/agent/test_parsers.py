"""clients/agent/parsers.py against recorded outputs of the real tools (fixtures/SOURCES.md says where
each came from), and malformed inputs against their precise errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from clients.agent import parsers

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# ---------------------------------------------------------------------------- benchmark_model
def test_benchmark_model_android_run_with_old_memory_line():
    parsed = parsers.parse_benchmark_model(fixture("benchmark_model-android-tf42507.txt"))
    assert parsed["init_us"] == 855 and parsed["first_inference_us"] == 49060
    assert parsed["warmup_avg_us"] == 34825.1 and parsed["inference_avg_us"] == 33209.4
    assert parsed["warmup"] == {"count": 15, "first_us": 49060, "curr_us": 33682, "min_us": 32825,
                                "max_us": 49060, "avg_us": 34825.1, "std_us": 3930}
    assert parsed["inference"] == {"count": 50, "first_us": 32891, "curr_us": 33978, "min_us": 32641,
                                   "max_us": 34005, "avg_us": 33209.4, "std_us": 450}
    assert parsed["model_size_mb"] == 0.004448 and parsed["init_ms"] == 0.855
    assert (parsed["memory_kind"], parsed["memory_init_mb"], parsed["memory_overall_mb"]) == ("peak", 0, 12.8672)
    assert "peak_memory_mb" not in parsed


def test_benchmark_model_raspberry_pi_run_with_memory_delta_line():
    parsed = parsers.parse_benchmark_model(fixture("benchmark_model-raspberrypi-xnnpack999.txt"))
    assert (parsed["init_us"], parsed["first_inference_us"]) == (18777, 64791)
    assert (parsed["warmup_avg_us"], parsed["inference_avg_us"]) == (57758.2, 55043.2)
    assert parsed["warmup"]["count"] == 9 and parsed["warmup"]["std_us"] == 4065
    assert parsed["inference"] == {"count": 50, "first_us": 58154, "curr_us": 53809, "min_us": 53077,
                                   "max_us": 60727, "avg_us": 55043.2, "std_us": 1562}
    assert (parsed["memory_kind"], parsed["memory_init_mb"], parsed["memory_overall_mb"]) == ("delta", 8.97656, 18.7227)
    assert parsed["model_size_mb"] == 3.67827 and parsed["init_ms"] == 18.777


def test_benchmark_model_malformed():
    text = fixture("benchmark_model-android-tf42507.txt")
    truncated = text[:text.index("Inference timings in us")]
    with pytest.raises(ValueError, match=r"no 'Inference timings in us: Init: …"):
        parsers.parse_benchmark_model(truncated)
    with pytest.raises(ValueError, match=r"no 'Inference timings in us"):
        parsers.parse_benchmark_model("")
    with pytest.raises(ValueError, match=r"no 'Inference timings in us"):
        parsers.parse_benchmark_model("Segmentation fault\n\x00\xff garbage")
    no_stats = "\n".join(line for line in text.splitlines() if not line.startswith("count="))
    with pytest.raises(ValueError, match=r"has 0 of the 2 'count=…' run statistics lines"):
        parsers.parse_benchmark_model(no_stats)


# ---------------------------------------------------------------------------- llama-bench
def test_llama_bench_markdown_with_build_line():
    parsed = parsers.parse_llama_bench(fixture("llama-bench-md-macos-pr11390.txt"))
    assert parsed["format"] == "markdown"
    assert (parsed["build_commit"], parsed["build_number"]) == ("6eecde3c", 4621)
    assert [(t["threads"], t["avg_tokens_per_s"], t["stddev_tokens_per_s"]) for t in parsed["tests"]] == [
        (1, 47.84, 0.08), (2, 87.31, 0.16), (4, 157.63, 1.01), (6, 188.15, 9.39), (8, 237.40, 0.71), (10, 243.65, 0.14)]
    first = parsed["tests"][0]
    assert (first["test"], first["n_prompt"], first["n_gen"], first["n_depth"]) == ("tg64", 0, 64, 0)
    assert (first["model"], first["size"], first["params"], first["backend"]) == \
        ("llama 1B Q4_0", "727.75 MiB", "1.24 B", "CPU")


def test_llama_bench_markdown_with_combined_test():
    parsed = parsers.parse_llama_bench(fixture("llama-bench-md-radxa-dragon-q8b.txt"))
    assert "build_commit" not in parsed                 # that post left the build line out
    tests = {t["test"]: t for t in parsed["tests"]}
    assert list(tests) == ["pp512", "pp4096", "tg128", "pp4096+tg128"]
    assert (tests["pp512"]["avg_tokens_per_s"], tests["pp512"]["stddev_tokens_per_s"]) == (194.49, 0.74)
    assert (tests["pp4096"]["avg_tokens_per_s"], tests["tg128"]["avg_tokens_per_s"]) == (132.65, 38.81)
    combined = tests["pp4096+tg128"]
    assert (combined["n_prompt"], combined["n_gen"], combined["avg_tokens_per_s"], combined["stddev_tokens_per_s"]) == \
        (4096, 128, 116.17, 0.01)
    assert combined["threads"] == 8 and combined["model"] == "llama 1B Q4_K - Medium"


def test_llama_bench_json_with_samples():
    parsed = parsers.parse_llama_bench(fixture("llama-bench-json-latency.txt"))
    assert parsed["format"] == "json" and (parsed["build_commit"], parsed["build_number"]) == ("0c1e570", 1)
    pp, tg, whole = parsed["tests"]
    assert (pp["test"], tg["test"], whole["test"]) == ("pp128", "tg32", "pp128+tg32")
    assert (whole["n_prompt"], whole["n_gen"], whole["n_depth"], whole["threads"]) == (128, 32, 0, 2)
    assert whole["samples_ns"] == [21406801397, 20856875914, 15026754616, 16865160287, 12126880096]
    assert whole["samples_tokens_per_s"] == [7.47426, 7.67133, 10.6477, 9.48701, 13.1938]
    assert (whole["avg_ns"], whole["avg_tokens_per_s"], whole["stddev_tokens_per_s"]) == (17256494462, 9.694822, 2.356883)
    assert (pp["avg_tokens_per_s"], pp["samples_ns"][0]) == (18.209465, 12473183087)
    assert (tg["avg_tokens_per_s"], tg["stddev_ns"]) == (1.886401, 220870607)
    assert (whole["model"], whole["model_size_bytes"], whole["model_params"]) == ("llama 256M Q4_1", 96576768, 134515008)


def test_llama_bench_jsonl():
    parsed = parsers.parse_llama_bench(fixture("llama-bench-jsonl.txt"))
    assert parsed["format"] == "json" and (parsed["build_commit"], parsed["build_number"]) == ("0c1e570", 1)
    pp, tg = parsed["tests"]
    assert (pp["test"], pp["n_prompt"], tg["test"], tg["n_gen"]) == ("pp16", 16, "tg4", 4)
    assert (pp["samples_ns"], pp["avg_tokens_per_s"]) == ([377267509, 352995716], 43.868277)
    assert (tg["samples_ns"], tg["avg_tokens_per_s"]) == ([192157336, 137501133], 24.953472)


def test_llama_bench_json_throughput_tests():
    tests = parsers.parse_llama_bench(fixture("llama-bench-json-throughput.txt"))["tests"]
    assert [(t["test"], t["avg_tokens_per_s"], t["stddev_tokens_per_s"]) for t in tests] == [
        ("pp128", 18.348424, 7.330113), ("pp512", 76.342645, 28.906143), ("tg128", 51.302068, 40.464965)]
    assert tests[2]["samples_ns"] == [21889787715, 1979648388, 1534757810]
    assert tests[2]["samples_tokens_per_s"] == [5.84748, 64.6579, 83.4008]


def test_llama_bench_markdown_recorded_here():
    parsed = parsers.parse_llama_bench(fixture("llama-bench-md-x86.txt"))
    assert (parsed["build_commit"], parsed["build_number"]) == ("0c1e570", 1)
    pp, tg = parsed["tests"]
    assert (pp["test"], pp["avg_tokens_per_s"], pp["stddev_tokens_per_s"]) == ("pp128", 184.77, 16.93)
    assert (tg["test"], tg["avg_tokens_per_s"], tg["stddev_tokens_per_s"]) == ("tg32", 77.66, 7.43)
    assert (pp["model"], pp["size"], pp["params"], pp["threads"]) == ("llama 256M Q4_1", "92.10 MiB", "134.52 M", 2)


def test_llama_bench_malformed():
    with pytest.raises(ValueError, match=r"neither a JSON array \(-o json\), JSON lines \(-o jsonl\) nor a markdown table"):
        parsers.parse_llama_bench("")
    with pytest.raises(ValueError, match=r"neither a JSON array"):
        parsers.parse_llama_bench("error: failed to load model 'x.gguf'\nmain: error: failed to load model")
    table = fixture("llama-bench-md-radxa-dragon-q8b.txt")
    with pytest.raises(ValueError, match=r"table row has 5 of 7 cells \(truncated\?\)"):
        parsers.parse_llama_bench(table[:table.rindex("|    pp4096+tg128")])
    header_only = "\n".join(table.splitlines()[:2])
    with pytest.raises(ValueError, match=r"has a header but no result rows"):
        parsers.parse_llama_bench(header_only)
    with pytest.raises(ValueError, match=r"JSON output is truncated: '\[' has no closing '\]'"):
        parsers.parse_llama_bench('[\n  {\n    "build_commit": "6eecde3c",\n')
    with pytest.raises(ValueError, match=r"JSON output is malformed"):
        parsers.parse_llama_bench('[\n  {"n_prompt": 512,\n]\n')
    with pytest.raises(ValueError, match=r"JSON test lacks n_gen, avg_ts, stddev_ts"):
        parsers.parse_llama_bench('[\n  {"n_prompt": 512}\n]\n')


# ---------------------------------------------------------------------------- onnxruntime_perf_test
def test_perf_test_arm_run_with_cpu_and_memory():
    parsed = parsers.parse_perf_test(fixture("perf_test-acl-armv8-ort1.3.1.txt"))
    assert parsed == {"session_creation_s": 0.127918, "total_inference_time_s": 1.44871, "inference_requests": 10,
                      "average_inference_ms": 144.871, "total_run_time_s": 1.44916, "avg_cpu_usage_pct": 68,
                      "peak_working_set_bytes": 158171136}


def test_perf_test_lines_without_a_space_after_the_colon():
    parsed = parsers.parse_perf_test(fixture("perf_test-armv8-cortex-a-duration.txt"))
    assert parsed == {"session_creation_s": 0.133189, "total_inference_time_s": 600.051, "inference_requests": 7160,
                      "average_inference_ms": 83.8059, "total_run_time_s": 600.102}


def test_perf_test_statistics_in_the_older_wording():
    parsed = parsers.parse_perf_test(fixture("perf_test-readme-sample-statistics.txt"))
    assert (parsed["total_inference_time_s"], parsed["inference_requests"], parsed["average_inference_ms"]) == \
        (58.8053, 1000, 58.8053)
    assert parsed["total_run_time_s"] == 58.8102
    assert (parsed["min_latency_s"], parsed["max_latency_s"]) == (0.0559777, 0.0623472)
    assert (parsed["p50_latency_s"], parsed["p90_latency_s"], parsed["p95_latency_s"]) == (0.0587108, 0.0599845, 0.0605676)
    assert (parsed["p99_latency_s"], parsed["p999_latency_s"]) == (0.0619517, 0.0623472)


def test_perf_test_malformed():
    with pytest.raises(ValueError, match=r"no 'Total inference requests' / 'Average inference time cost' line"):
        parsers.parse_perf_test("")
    with pytest.raises(ValueError, match=r"no 'Total inference requests' / 'Average inference time cost' line"):
        parsers.parse_perf_test("failed to initialize.\n\x1b[31mgarbage")
    truncated = fixture("perf_test-acl-armv8-ort1.3.1.txt").split("Average inference")[0]
    with pytest.raises(ValueError, match=r"has no 'Average inference time cost' line \(truncated"):
        parsers.parse_perf_test(truncated)


# ---------------------------------------------------------------------------- time -v
def test_time_verbose_toybox_and_gnu():
    assert parsers.parse_time_verbose(fixture("toybox-time-v.txt")) == {"max_rss_bytes": 2280 * 1024}
    assert parsers.parse_time_verbose(fixture("gnu-time-v.txt")) == {"max_rss_bytes": 1924 * 1024}
    with pytest.raises(ValueError, match=r"no 'Max RSS \(KiB\):' \(toybox time -v\)"):
        parsers.parse_time_verbose("\nreal\t0.001\nuser\t0.000\nsys\t0.000\n")     # time without -v
