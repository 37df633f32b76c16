"""The measurement protocol, run in a child process so its peak RSS is the runtime's alone.

    python -m clients.agent.measure FORMAT PATH CONFIG_JSON   -> one JSON line on stdout

FORMAT is gguf, onnx, tflite or coreml; PATH the file (or the directory of an unpacked directory
export); CONFIG_JSON a BenchmarkConfig (proto/edgeforge/v1/common.proto) in proto JSON with proto field
names, plus "task" ("causal_lm", the default, or another task). The output's keys are fields of the
Measurement message, so the parent reads it with json_format.ParseDict.

Protocol (llama-bench, MLPerf LoadGen, TVM's time_evaluator):
1. load the file, timed (`load_ms`);
2. one cold run (`first_run_ms`), then `warmup_runs` untimed runs;
3. a timed phase: runs until both `timed_runs` runs and `min_duration_ms` of wall time are reached
   (LoadGen's min query count and min duration). Latency is one whole run. When the coefficient of
   variation of the phase (`cv_pct` = 100·stddev/mean) is over `max_cv_pct`, the phase is repeated
   with fresh samples, up to `cv_repeats` times; the last phase is reported and `unstable` is set if
   it is still over;
4. throughput tests for causal LMs (llama-bench's), each `throughput_runs` times after one untimed
   warm-up: ppN processes N prompt tokens from an empty context; tgM makes M single-token decode steps
   from an empty context, as llama-bench's test_gen does (the first step feeds one token to the empty
   context, each next step feeds the greedy next token where llama-bench feeds a random one: an argmax
   over the vocabulary is the only extra work). A test the file cannot hold is skipped with a note.

One causal-LM run is prompt processing of `prompt_tokens` from an empty context, then greedy
generation of `generation_tokens`. The prompt is a fixed pseudo-random token sequence (seed 0), so
every candidate and device sees identical input. One run of any other task is one inference on fixed
pseudo-random inputs (drivers.synthetic_inputs).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .drivers import CAUSAL_LM, DRIVERS, ContextExceeded, DriverError, normalize_task


class ConfigError(ValueError):
    """A benchmark config field is unknown, mistyped or out of range; the message names it."""


EXPLICIT_ZERO = frozenset({"min_duration_ms", "max_cv_pct", "cv_repeats", "cooldown_ms"})   # proto3 optional


@dataclasses.dataclass(frozen=True)
class Config:
    """BenchmarkConfig with the defaults its proto comments document, plus the task. As in proto3, a
    zero or absent field means its default (threads: 0 = every core this process may use) — except the
    fields declared `optional` in the proto (EXPLICIT_ZERO), where a present 0 is a value: no minimum
    duration, no CV repeats, no cool-down."""
    prompt_tokens: int = 128                       # prompt tokens of one latency run (pp)
    generation_tokens: int = 32                    # tokens generated after the prompt in one latency run (tg)
    warmup_runs: int = 1                           # untimed runs after the cold one
    timed_runs: int = 5                            # minimum runs of a timed phase
    threads: int = 0                               # CPU threads; 0: every core this process may use
    min_duration_ms: int = 1000                    # minimum wall time of a timed phase
    max_cv_pct: float = 10.0                       # largest acceptable coefficient of variation, percent
    cv_repeats: int = 2                            # repeats of a noisy timed phase
    throughput_prompt_tokens: tuple[int, ...] = (128, 512)     # ppN tests
    throughput_generation_tokens: int = 128        # the tgM test
    throughput_runs: int = 3                       # timed runs of each throughput test
    skip_throughput: bool = False
    cooldown_ms: int = 1000                        # the parent's pause before the job; read, not used here
    task: str = CAUSAL_LM

    @classmethod
    def from_json(cls, values: dict) -> Config:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"unknown benchmark config field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        given = {}
        for name, value in values.items():
            default = fields[name].default
            if name == "task":
                if not isinstance(value, str):
                    raise ConfigError(f"task must be a string such as \"causal_lm\", got {value!r}")
                given[name] = normalize_task(value)
            elif name == "throughput_prompt_tokens":
                if not isinstance(value, list) or not all(isinstance(v, int) and v > 0 for v in value):
                    raise ConfigError(f"throughput_prompt_tokens must be a list of positive token counts, "
                                      f"got {value!r}")
                given[name] = tuple(value) or default
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"{name} must be true or false, got {value!r}")
                given[name] = value
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                        (isinstance(default, int) and value != int(value)):
                    raise ConfigError(f"{name} must be a {type(default).__name__}, got {value!r}")
                if value < 0:
                    raise ConfigError(f"{name} must be ≥ 0, got {value}")
                given[name] = type(default)(value) if name in EXPLICIT_ZERO else type(default)(value) or default
        return cls(**given)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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


def latency_stats(samples: list[float]) -> dict:
    """LatencyStats of `samples` (ms): percentiles, mean, sample standard deviation, the samples."""
    values = np.array(samples, dtype=np.float64)
    return {"p50_ms": float(np.percentile(values, 50)), "p90_ms": float(np.percentile(values, 90)),
            "p99_ms": float(np.percentile(values, 99)), "mean_ms": float(values.mean()),
            "stddev_ms": float(values.std(ddof=1)) if len(values) > 1 else 0.0, "samples_ms": values.tolist()}


def cv_pct(samples: list[float]) -> float:
    """Coefficient of variation, 100·stddev/mean, in percent (0 for a single sample)."""
    if len(samples) < 2:
        return 0.0
    values = np.array(samples, dtype=np.float64)
    return float(100 * values.std(ddof=1) / values.mean())


@dataclasses.dataclass(frozen=True)
class Phase:
    runs: list[tuple[float, ...]]      # per run, its parts in ms: (prompt, generation) or (inference,)
    duration_ms: float                 # wall time of the phase

    @property
    def latencies_ms(self) -> list[float]:
        return [sum(parts) for parts in self.runs]


def timed_phase(run: Callable[[], tuple[float, ...]], timed_runs: int, min_duration_ms: float) -> Phase:
    runs = []
    start = time.perf_counter()
    while len(runs) < timed_runs or (time.perf_counter() - start) * 1e3 < min_duration_ms:
        runs.append(run())
    return Phase(runs, (time.perf_counter() - start) * 1e3)


def steady_phase(run: Callable[[], tuple[float, ...]], config: Config) -> tuple[Phase, int]:
    """Timed phases until one's CV is within max_cv_pct or cv_repeats repeats are spent; returns the last
    phase and how many ran. The last, not the least noisy: a repeat exists because something transient
    (a background job, a clock ramping) disturbed the earlier phase, and picking the quietest of several
    draws would understate the spread a user of the device sees."""
    phase, attempts = timed_phase(run, config.timed_runs, config.min_duration_ms), 1
    while cv_pct(phase.latencies_ms) > config.max_cv_pct and attempts <= config.cv_repeats:
        phase, attempts = timed_phase(run, config.timed_runs, config.min_duration_ms), attempts + 1
    return phase, attempts


def token_sequence(vocab_size: int, count: int) -> list[int]:
    """The fixed pseudo-random prompt (seed 0), away from the special tokens at either end of the vocabulary."""
    margin = min(256, vocab_size // 4)
    rng = np.random.default_rng(0)
    return [int(t) for t in rng.integers(margin, vocab_size - margin, size=count)]


def throughput_tests(driver, config: Config, tokens: list[int]) -> tuple[list[dict], list[str]]:
    """llama-bench's ppN and tgM tests (see the module docstring) -> (ThroughputResult dicts, notes)."""
    tests = [(f"pp{n}", n, lambda n=n: driver.prompt(tokens[:n]), lambda n=n: driver.prompt(tokens[:n]))
             for n in config.throughput_prompt_tokens]
    steps = config.throughput_generation_tokens
    tests.append((f"tg{steps}", steps, lambda: driver.prompt(tokens[:1]) + driver.generate(steps - 1),
                  lambda: driver.prompt(tokens[:1])))                 # llama-bench warms tg with one step
    results, notes = [], []
    for name, count, run, warm_up in tests:
        try:
            warm_up()
            samples = [run() for _ in range(config.throughput_runs)]
        except ContextExceeded as error:            # drivers refuse before the work that would not fit
            notes.append(f"{name} skipped: {error}")
            continue
        rates = np.array([count / (ms / 1e3) for ms in samples])
        results.append({"test": name, "tokens": count, "tokens_per_s": float(rates.mean()),
                        "stddev_tokens_per_s": float(rates.std(ddof=1)) if len(rates) > 1 else 0.0,
                        "samples_ms": samples})
    return results, notes


def measure(export_format: str, path: Path, values: dict) -> dict:
    """Runs the protocol on one file; returns a dict whose keys are Measurement fields."""
    config = Config.from_json(values)
    if export_format not in DRIVERS:
        raise ConfigError(f"unknown format {export_format!r}; known: {', '.join(DRIVERS)}")
    language_model = config.task == CAUSAL_LM
    threads = config.threads or available_cores()
    context = config.prompt_tokens + config.generation_tokens
    if language_model and not config.skip_throughput:       # the context must hold the largest test
        context = max(context, config.throughput_generation_tokens, *config.throughput_prompt_tokens)

    start = time.perf_counter()
    driver = DRIVERS[export_format](path, context, threads, config.task)
    load_ms = (time.perf_counter() - start) * 1e3
    try:
        if language_model:
            tokens = token_sequence(driver.vocab_size, context)
            prompt = tokens[:config.prompt_tokens]

            def run() -> tuple[float, ...]:
                return driver.prompt(prompt), driver.generate(config.generation_tokens)
        else:
            def run() -> tuple[float, ...]:
                return (driver.infer(),)
        first_run_ms = sum(run())
        for _ in range(config.warmup_runs):
            run()
        phase, attempts = steady_phase(run, config)
        throughput, skipped = [], []
        if language_model and not config.skip_throughput:
            throughput, skipped = throughput_tests(driver, config, tokens)
        peak = peak_rss_bytes()
    finally:
        driver.close()

    latencies = phase.latencies_ms
    variation = cv_pct(latencies)
    notes = list(driver.notes) + skipped
    if variation > config.max_cv_pct:
        notes.append(f"unstable: latency CV {variation:.1f}% stayed above max_cv_pct {config.max_cv_pct:g}% "
                     f"in {attempts} timed phases (the last is reported)")
    result = {"runtime": driver.runtime, "driver": "local", "runtime_versions": dict(driver.versions),
              "threads": threads, "load_ms": load_ms, "first_run_ms": first_run_ms,
              "warmup_runs": config.warmup_runs, "latency": latency_stats(latencies), "cv_pct": variation,
              "attempts": attempts, "unstable": variation > config.max_cv_pct, "duration_ms": phase.duration_ms,
              "peak_rss_bytes": peak, "notes": notes}
    if language_model:
        prompt_ms = [parts[0] for parts in phase.runs]
        generation_ms = [parts[1] for parts in phase.runs]
        result.update(
            prompt_samples_ms=prompt_ms, generation_samples_ms=generation_ms, throughput=throughput,
            prompt_tokens_per_s=config.prompt_tokens / (float(np.median(prompt_ms)) / 1e3),
            generation_tokens_per_s=config.generation_tokens / (float(np.median(generation_ms)) / 1e3))
    return result


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        sys.exit("usage: python -m clients.agent.measure FORMAT PATH CONFIG_JSON")
    try:
        result = measure(args[0], Path(args[1]), json.loads(args[2]))
    except (DriverError, ConfigError, json.JSONDecodeError) as error:
        sys.exit(f"measure: {type(error).__name__}: {error}")       # the parent shows stderr's last lines
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
