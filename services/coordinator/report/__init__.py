"""The build report: a JSON document (the contract pipelines gate on) and a self-contained HTML
page rendered from it (inline CSS, SVG and script; no network needed to view it). docs/REPORT.md
describes the page section by section.

report.json: {build, name, state, model, baseline, constraints, objective, benchmark, targets[], task,
devices[] → {target, device, summary, attributes, emulated, constraints, chosen, pareto, nearest_misses,
warnings, candidates[] → {id, device, format, recipe, artifact, size_bytes, quality {metric, value,
baseline, delta_pct}, validation, latency_ms {p50, p90, p99, mean, stddev, samples}, cv_pct, unstable,
measurement_attempts, duration_ms, warmup_runs, cooldown_ms, load_ms, first_run_ms, peak_rss_bytes,
tokens_per_s {prompt, generation}, throughput {test: tokens_per_s}, threads, runtime, driver,
runtime_versions, notes, attempts, status, pareto, dominated_by, rejected_by, error, warnings,
predicted? {memory_bytes, generation_tokens_per_s, prompt_tokens_per_s, bound, basis}}},
quantization[] → {id, recipe, bits_per_weight, compress_seconds, tensors[] → {name, grid, bits_per_weight,
snr_db, output_error, histogram: {low, high, counts, threshold, threshold_kind} | null}},
pipelines[] → {id, transformed_model, steps[] → {index, kind, description, parameters, nonzero, sparsity,
dense_bytes, stored_bytes, storage, quality, seconds, note, histograms[] → {tensor, low, high, counts,
threshold, threshold_kind, pruned_fraction}}}}

One devices[] entry per DeviceResult: a target (a pool of devices; each candidate names the device that
measured it) or, with each_device, one device of a target. A histogram has len(counts) equal bins over
[low, high] of the float weights before the step (common.proto WeightHistogram); "predicted" is the
planner's estimate for that candidate on that device, absent when it had none.
"""
from services.coordinator.report.document import (CONSTRAINT_KEYS, build_report, device_summary,
                                                   emulation_warning, step_dict, unstable_warning)
from services.coordinator.report.page import render_html

__all__ = ["CONSTRAINT_KEYS", "build_report", "device_summary", "emulation_warning", "render_html", "step_dict",
           "unstable_warning"]
