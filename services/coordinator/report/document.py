"""report.json: the build report as data, assembled from the Build proto (see the package docstring for
its schema). Pipelines gate on this document; the HTML page is rendered from it alone."""
from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from edgeforge.v1 import common_pb2, coordinator_pb2

CONSTRAINT_KEYS = ("max_size_bytes", "max_p90_latency_ms", "max_quality_loss_pct", "max_peak_memory_bytes")


def _status_name(value: int) -> str:
    return coordinator_pb2.CandidateStatus.Name(value).removeprefix("CANDIDATE_STATUS_").lower()


def _constraints(message: coordinator_pb2.Constraints) -> dict[str, float]:
    return {key: getattr(message, key) for key in CONSTRAINT_KEYS if message.HasField(key)}


def device_summary(attributes: dict[str, str]) -> str:
    """One line: "Apple M2 · darwin/arm64 · 8 cores" (plus how it is emulated, when it is)."""
    summary = (f"{attributes.get('cpu', '?')} · {attributes.get('os', '?')}/{attributes.get('arch', '?')} · "
               f"{attributes.get('cores', '?')} cores")
    return summary + (f" · emulated ({attributes['emulated']})" if "emulated" in attributes else "")


def emulation_warning(attributes: dict[str, str]) -> str | None:
    """Set when the agent runs under an emulator (attribute "emulated", e.g. "qemu-user")."""
    if "emulated" not in attributes:
        return None
    return (f"timings under emulation ({attributes['emulated'] or 'unknown emulator'}) are meaningless; this run "
            f"proves the agent installs and works on {attributes.get('arch') or 'the emulated architecture'}")


def unstable_warning(measurement: common_pb2.Measurement, max_cv_pct: float) -> str:
    limit = f" > max_cv_pct {max_cv_pct:g}%" if max_cv_pct else ""
    return (f"unstable: latency CV {measurement.cv_pct:.1f}%{limit} after {measurement.attempts or 1} timed "
            f"phase(s); its timings are not trustworthy to a few percent")


def _candidate_row(c: coordinator_pb2.CandidateResult, entry: coordinator_pb2.DeviceCandidate,
                   result: coordinator_pb2.DeviceResult, max_cv_pct: float) -> dict[str, Any]:
    m = entry.measurement
    return {
        "id": c.id, "device": entry.device or result.device,
        "format": common_pb2.ExportFormat.Name(c.format).removeprefix("EXPORT_FORMAT_").lower(),
        "recipe": json_format.MessageToDict(c.recipe), "artifact": c.artifact.removeprefix("artifacts/"),
        "size_bytes": c.size_bytes,
        "quality": {"metric": c.quality.metric or "perplexity", "value": c.quality.value,
                    "baseline": c.quality.baseline, "delta_pct": c.quality.delta_pct},
        "validation": {"runtime": c.validation.runtime, "max_abs_diff": c.validation.max_abs_diff,
                       "mean_abs_diff": c.validation.mean_abs_diff, "top1_agreement": c.validation.top1_agreement},
        "latency_ms": {"p50": m.latency.p50_ms, "p90": m.latency.p90_ms, "p99": m.latency.p99_ms,
                       "mean": m.latency.mean_ms, "stddev": m.latency.stddev_ms, "samples": list(m.latency.samples_ms)},
        "cv_pct": m.cv_pct, "unstable": m.unstable, "measurement_attempts": m.attempts,
        "duration_ms": m.duration_ms, "warmup_runs": m.warmup_runs, "cooldown_ms": m.cooldown_ms,
        "load_ms": m.load_ms, "first_run_ms": m.first_run_ms, "peak_rss_bytes": m.peak_rss_bytes,
        "tokens_per_s": {"prompt": m.prompt_tokens_per_s, "generation": m.generation_tokens_per_s},
        "throughput": {t.test: t.tokens_per_s for t in m.throughput},
        "threads": m.threads, "runtime": m.runtime, "driver": m.driver, "runtime_versions": dict(m.runtime_versions),
        "notes": list(m.notes), "attempts": entry.attempts,
        "status": _status_name(entry.status), "pareto": entry.pareto, "dominated_by": list(entry.dominated_by),
        "rejected_by": entry.rejected_by, "error": entry.error.message,
        "warnings": [unstable_warning(m, max_cv_pct)] if m.unstable else [],
    }


def _device_entry(result: coordinator_pb2.DeviceResult, candidates: dict[str, coordinator_pb2.CandidateResult],
                  spec: coordinator_pb2.BuildSpec) -> dict[str, Any]:
    attributes = dict(sorted(result.attributes.items()))
    rows = [_candidate_row(candidates[entry.candidate_id], entry, result, spec.benchmark.max_cv_pct)
            for entry in result.candidates]
    emulated = emulation_warning(attributes)
    warnings = ([emulated] if emulated else []) + [f"{r['id']}: {w}" for r in rows for w in r["warnings"]]
    return {
        "target": result.target or result.device, "device": result.device, "summary": device_summary(attributes),
        "attributes": attributes, "emulated": emulated,
        # A result stored before targets carried their own budgets has none: the build's applied.
        "constraints": _constraints(result.constraints) or _constraints(spec.constraints),
        "chosen": result.chosen_candidate or None, "pareto": [r["id"] for r in rows if r["pareto"]],
        "nearest_misses": list(result.nearest_misses), "warnings": warnings, "candidates": rows,
    }


def build_report(build: coordinator_pb2.Build) -> dict[str, Any]:
    candidates = {c.id: c for c in build.candidates}
    spec = build.spec
    quantization = [{"id": c.id, "recipe": json_format.MessageToDict(c.recipe), "bits_per_weight": c.bits_per_weight,
                     "compress_seconds": c.compress_seconds,
                     "tensors": [{"name": t.name, "grid": t.grid, "bits_per_weight": t.bits_per_weight,
                                  "snr_db": t.snr_db, "output_error": t.output_error,
                                  "histogram": (_histogram(t.histogram) if t.HasField("histogram") else None)}
                                 for t in c.tensors]}
                    for c in build.candidates if c.tensors]
    pipelines = [{"id": c.id, "transformed_model": c.transformed_model, "steps": [step_dict(r) for r in c.steps]}
                 for c in build.candidates if c.steps]
    targets = [{"name": t.name or f"targets[{i}]", "device": t.device, "selector": dict(sorted(t.selector.items())),
                "each_device": t.each_device, "constraints": _constraints(t.constraints)}
               for i, t in enumerate(spec.targets)]
    return {
        "build": build.name, "name": spec.display_name,
        "state": coordinator_pb2.BuildState.Name(build.state).removeprefix("BUILD_STATE_").lower(),
        "model": {"source": spec.model.artifact, "reference": build.reference_model,
                  "calibration_stats": build.calibration_stats},
        "baseline": {"metric": build.baseline.metric, "value": build.baseline.value, "tokens": build.baseline.tokens},
        "constraints": _constraints(spec.constraints),
        "objective": coordinator_pb2.Objective.Name(spec.objective).removeprefix("OBJECTIVE_").lower(),
        "benchmark": json_format.MessageToDict(spec.benchmark, preserving_proto_field_name=True),
        "targets": targets,
        "devices": [_device_entry(result, candidates, spec) for result in build.devices],
        "quantization": quantization,
        "pipelines": pipelines,
        "task": common_pb2.ModelTask.Name(spec.model.task or 1).removeprefix("MODEL_TASK_").lower(),
    }


def step_dict(step: common_pb2.StepReport) -> dict[str, Any]:
    """One pipeline step's size and quality, as report.json (and `edgeforge show`) give it."""
    quality = step.quality
    return {"index": step.index, "kind": step.kind, "description": step.description,
            "parameters": step.parameter_count, "nonzero": step.nonzero_count, "sparsity": step.sparsity,
            "dense_bytes": step.dense_bytes, "stored_bytes": step.stored_bytes, "storage": step.storage,
            "quality": ({"metric": quality.metric, "value": quality.value, "higher_is_better": quality.higher_is_better,
                         "delta_pct": quality.delta_pct, "metrics": dict(quality.metrics)} if quality.metric else None),
            "seconds": step.seconds, "note": step.note,
            "histograms": [{"tensor": h.tensor, **_histogram(h), "pruned_fraction": h.pruned_fraction}
                           for h in step.histograms]}


def _histogram(histogram: common_pb2.WeightHistogram) -> dict[str, Any]:
    """Bin edges, counts and the cut of one tensor's weights (common.proto WeightHistogram)."""
    return {"low": histogram.low, "high": histogram.high, "counts": list(histogram.counts),
            "threshold": histogram.threshold, "threshold_kind": histogram.threshold_kind}
