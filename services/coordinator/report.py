"""The build report: a JSON document (the contract pipelines gate on) and a self-contained HTML
page rendered from it (inline CSS and SVG, no network needed to view it).

report.json: {build, name, state, model, baseline, constraints, objective, benchmark, targets[],
devices[] → {target, device, summary, attributes, emulated, constraints, chosen, pareto, nearest_misses,
warnings, candidates[] → {id, device, format, recipe, artifact, size_bytes, quality {metric, value,
baseline, delta_pct}, validation, latency_ms {p50, p90, p99, mean, stddev, samples}, cv_pct, unstable,
measurement_attempts, duration_ms, warmup_runs, cooldown_ms, load_ms, first_run_ms, peak_rss_bytes,
tokens_per_s {prompt, generation}, throughput {test: tokens_per_s}, threads, runtime, driver,
runtime_versions, notes, attempts, status, pareto, dominated_by, rejected_by, error, warnings}},
quantization[]}

One devices[] entry per DeviceResult: a target (a pool of devices; each candidate names the device that
measured it) or, with each_device, one device of a target.
"""
from __future__ import annotations

import html
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
                                  "snr_db": t.snr_db, "output_error": t.output_error} for t in c.tensors]}
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
            "seconds": step.seconds, "note": step.note}


# ---------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;color:#1d2430;padding:0 1rem}
h1{font-size:1.5rem;margin:0 0 .3rem}h2{font-size:1.15rem;margin:2rem 0 .5rem}
.meta{color:#5b6575}.chosen-box{background:#eefaf1;border:1px solid #9bd3ad;border-radius:8px;padding:.8rem 1rem;margin:.8rem 0}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:.35rem .5rem;border-bottom:1px solid #e3e7ee;text-align:right;vertical-align:top}
th:first-child,td:first-child,td.why,th.why{text-align:left}th{background:#f5f7fa;position:sticky;top:0}
tr.chosen td{background:#eefaf1;font-weight:600}tr.failed td{color:#9b2c2c}
td.why{color:#5b6575;max-width:28rem}.tag{display:inline-block;padding:0 .4rem;border-radius:4px;font-size:12px}
.tag.chosen{background:#2f855a;color:#fff}.tag.eligible{background:#e2e8f0}.tag.rejected{background:#fed7d7}
.tag.failed{background:#feb2b2}svg{background:#fbfcfd;border:1px solid #e3e7ee;border-radius:6px}
h3{font-size:1rem;margin:1.2rem 0 .4rem}section.target{border-top:2px solid #e3e7ee;margin-top:2rem}
.warn{background:#fffaf0;border:1px solid #f6ad55;border-radius:8px;padding:.5rem 1rem;margin:.8rem 0}
.none-box{background:#fff5f5;border:1px solid #feb2b2;border-radius:8px;padding:.8rem 1rem;margin:.8rem 0}
tr.front td:first-child{font-weight:600}td.unstable{color:#c05621;font-weight:600}
"""


def _fmt_mb(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


def _fmt_pct(value: float) -> str:
    return f"{0.0 if abs(value) < 0.005 else value:+.2f}%"          # no "-0.00%"


def _fmt_constraint(key: str, value: float) -> str:
    if key in ("max_size_bytes", "max_peak_memory_bytes"):
        return f"{key} = {_fmt_mb(value)}"
    return f"{key} = {value:g}"


def _fmt_constraints(constraints: dict[str, float]) -> str:
    return ", ".join(_fmt_constraint(k, v) for k, v in constraints.items()) or "none"


def _scatter(rows: list[dict]) -> str:
    """Size (x) against p90 latency (y) for measured candidates; the chosen one in green, the front ringed."""
    points = [r for r in rows if r["latency_ms"]["p90"] > 0]
    if not points:
        return ""
    width, height, pad = 520, 300, 50
    xs = [r["size_bytes"] / 1e6 for r in points]
    ys = [r["latency_ms"]["p90"] for r in points]
    x_max, y_max = max(xs) * 1.1, max(ys) * 1.15

    def sx(v: float) -> float:
        return pad + (width - 2 * pad) * v / x_max

    def sy(v: float) -> float:
        return height - pad - (height - 2 * pad) * v / y_max
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="size versus p90 latency">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle" font-size="12">size (MB)</text>',
             f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle" '
             f'font-size="12">p90 latency (ms)</text>']
    for tick in range(5):
        xv, yv = x_max * tick / 4, y_max * tick / 4
        parts.append(f'<text x="{sx(xv):.0f}" y="{height - pad + 16}" text-anchor="middle" font-size="10">{xv:.0f}</text>')
        parts.append(f'<text x="{pad - 6}" y="{sy(yv) + 3:.0f}" text-anchor="end" font-size="10">{yv:.0f}</text>')
    for r, x, y in zip(points, xs, ys):
        color = "#2f855a" if r["status"] == "chosen" else ("#c53030" if r["status"] == "rejected" else "#4a5568")
        ring = ' stroke="#d69e2e" stroke-width="3"' if r.get("pareto") else ""
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="6" fill="{color}"{ring}>'
                     f'<title>{html.escape(r["id"])}: '
                     f'{x:.1f} MB, p90 {y:.1f} ms, Δ {_fmt_pct(r["quality"]["delta_pct"])}</title></circle>')
        parts.append(f'<text x="{sx(x) + 8:.1f}" y="{sy(y) - 6:.1f}" font-size="11">{html.escape(r["id"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _quantization_html(candidates: list[dict]) -> list[str]:
    """Per candidate, every quantized tensor's grid (the mixed-precision allocation), storage and error."""
    e = html.escape
    if not candidates:
        return []
    out = ["<h2>Quantization, tensor by tensor</h2><p class='meta'>Grid per tensor (a mixed-precision recipe "
           "shows its allocation here), storage in bits per weight with scales, signal-to-noise ratio of the "
           "weights, and the relative output error tr(ΔW·H·ΔWᵀ)/tr(W·H·Wᵀ) on the calibration inputs.</p>"]
    for c in candidates:
        grids: dict[str, int] = {}
        for t in c["tensors"]:
            grids[t["grid"]] = grids.get(t["grid"], 0) + 1
        summary = ", ".join(f"{e(g)} ×{n}" for g, n in sorted(grids.items()))
        out.append(f"<details><summary><b>{e(c['id'])}</b> — {c['bits_per_weight']:.3f} bits/weight, {summary}, "
                   f"compressed in {c['compress_seconds']:.1f} s</summary><table><thead><tr><th>tensor</th>"
                   "<th>grid</th><th>bits/weight</th><th>SNR dB</th><th>output error</th></tr></thead><tbody>")
        for t in c["tensors"]:
            out.append(f"<tr><td>{e(t['name'])}</td><td>{e(t['grid'])}</td><td>{t['bits_per_weight']:.3f}</td>"
                       f"<td>{t['snr_db']:.1f}</td><td>{t['output_error']:.2e}</td></tr>")
        out.append("</tbody></table></details>")
    return out


def _pipelines_html(pipelines: list[dict]) -> list[str]:
    """Per pipeline candidate, size and quality after every step (source → prune/distill/qat → export)."""
    e = html.escape
    if not pipelines:
        return []
    out = ["<h2>Pipelines, step by step</h2><p class='meta'>Size and quality after every step. “Stored” is the "
           "weights at the best honest storage (sparse tensors as CSR or a bitmask only where that is smaller than "
           "dense; quantized tensors at their grid), or for the export step the file itself: GGUF, ONNX and TFLite "
           "store zeros densely.</p>"]
    for pipeline in pipelines:
        out.append(f"<h3>{e(pipeline['id'])}</h3><table><thead><tr><th>step</th><th>parameters</th><th>sparsity</th>"
                   "<th>dense MB</th><th>stored MB</th><th>quality</th><th>Δ</th><th>seconds</th>"
                   "<th class='why'>note</th></tr></thead><tbody>")
        for step in pipeline["steps"]:
            quality = step["quality"]
            value = f"{e(quality['metric'])} {quality['value']:.4f}" if quality else "—"
            delta = _fmt_pct(quality["delta_pct"]) if quality and step["index"] else ""
            out.append(f"<tr><td>{step['index']}. {e(step['kind'])}: {e(step['description'])}</td>"
                       f"<td>{step['parameters']:,}</td><td>{100 * step['sparsity']:.1f}%</td>"
                       f"<td>{_fmt_mb(step['dense_bytes'])}</td><td>{_fmt_mb(step['stored_bytes'])}</td>"
                       f"<td>{value}</td><td>{delta}</td><td>{step['seconds']:.1f}</td>"
                       f"<td class='why'>{e(step['storage'])}{'. ' + e(step['note']) if step['note'] else ''}</td></tr>")
        out.append("</tbody></table>")
    return out


_OBJECTIVE_PHRASE = {"best_quality": "Best quality", "lowest_latency": "Lowest p90 latency",
                     "smallest": "Smallest file"}


def _throughput_tests(rows: list[dict]) -> list[str]:
    """Throughput tests any candidate ran: prompt processing (pp) first, then generation (tg), by length."""
    tests = {test for r in rows for test in r.get("throughput", {})}
    return sorted(tests, key=lambda t: (not t.startswith("pp"), int("".join(filter(str.isdigit, t)) or 0), t))


def _choice_html(device: dict, objective: str) -> str:
    e = html.escape
    chosen = next((r for r in device["candidates"] if r["id"] == device["chosen"]), None)
    if chosen is None:
        misses = "".join(f"<li>{e(miss)}</li>" for miss in device.get("nearest_misses", []))
        return ("<div class='none-box'><b>No candidate met the constraints</b> on this target." +
                (f" Nearest misses:<ol>{misses}</ol>" if misses else "") + "</div>")
    tps = chosen["tokens_per_s"]["generation"]
    return (f"<div class='chosen-box'>Chosen: <b>{e(chosen['id'])}</b> — {_fmt_mb(chosen['size_bytes'])}, "
            f"perplexity {chosen['quality']['value']:.3f} ({_fmt_pct(chosen['quality']['delta_pct'])} vs float32), "
            f"p90 {chosen['latency_ms']['p90']:.1f} ms, peak memory {_fmt_mb(chosen['peak_rss_bytes'])}"
            + (f", generation {tps:.1f} tok/s" if tps else "") +
            f". {e(_OBJECTIVE_PHRASE.get(objective, objective))} among candidates that meet every constraint.</div>")


def _pareto_html(rows: list[dict]) -> list[str]:
    """Every measured candidate by size; rows on the (size, p90, quality) front are marked."""
    measured = sorted((r for r in rows if r["status"] != "failed"), key=lambda r: (r["size_bytes"], r["id"]))
    if not measured:
        return []
    e = html.escape
    out = ["<h3>Pareto front</h3><p class='meta'>◆ marks the front of (size, p90 latency, perplexity) over every "
           "measured candidate, rejected ones included: no other candidate is at least as good on all three and "
           "better on one. Peak memory is shown, not part of the front.</p><table class='pareto'><thead><tr>"
           "<th>candidate</th><th>front</th><th>status</th><th>size</th><th>p90 ms</th><th>perplexity</th><th>peak memory</th>"
           "<th class='why'>dominated by</th></tr></thead><tbody>"]
    for r in measured:
        out.append(f"<tr class='{'front' if r.get('pareto') else 'dominated'}'><td>{e(r['id'])}</td>"
                   f"<td>{'◆' if r.get('pareto') else ''}</td><td><span class='tag {e(r['status'])}'>"
                   f"{e(r['status'])}</span></td><td>{_fmt_mb(r['size_bytes'])}</td>"
                   f"<td>{r['latency_ms']['p90']:.1f}</td><td>{r['quality']['value']:.3f}</td>"
                   f"<td>{_fmt_mb(r['peak_rss_bytes'])}</td>"
                   f"<td class='why'>{e(', '.join(r.get('dominated_by', [])))}</td></tr>")
    out.append("</tbody></table>")
    return out


def _candidates_html(device: dict) -> list[str]:
    """Status and why-not of every candidate, with its latency, memory and throughput."""
    e = html.escape
    rows = device["candidates"]
    tests = _throughput_tests(rows)
    pooled = len({r.get("device", device["device"]) for r in rows}) > 1
    rate_heads = [f"{t} tok/s" for t in tests] or ["pp tok/s", "tg tok/s"]
    out = ["<h3>Candidates</h3><table class='candidates'><thead><tr><th>candidate</th>"
           + ("<th>measured on</th>" if pooled else "") +
           "<th>status</th><th>size</th><th>perplexity</th><th>Δ vs fp32</th><th>p50 ms</th><th>p90 ms</th>"
           "<th>p99 ms</th><th>CV %</th><th>load ms</th><th>peak memory</th>"
           + "".join(f"<th>{e(h)}</th>" for h in rate_heads)
           + "<th class='why'>why not chosen</th></tr></thead><tbody>"]
    for r in rows:
        lat = r["latency_ms"]
        rates = ([r.get("throughput", {}).get(t) for t in tests] if tests
                 else [r["tokens_per_s"]["prompt"], r["tokens_per_s"]["generation"]])
        why = r["rejected_by"] or ("" if r["status"] == "chosen" else r["error"])
        cv = f"{r.get('cv_pct', 0.0):.1f}" + (" ⚠ unstable" if r.get("unstable") else "")
        out.append(f"<tr class='{e(r['status'])}'><td>{e(r['id'])}{' ◆' if r.get('pareto') else ''}</td>"
                   + (f"<td>{e(r.get('device', ''))}</td>" if pooled else "") +
                   f"<td><span class='tag {e(r['status'])}'>{e(r['status'])}</span></td>"
                   f"<td>{_fmt_mb(r['size_bytes'])}</td><td>{r['quality']['value']:.3f}</td>"
                   f"<td>{_fmt_pct(r['quality']['delta_pct'])}</td><td>{lat['p50']:.1f}</td><td>{lat['p90']:.1f}</td>"
                   f"<td>{lat['p99']:.1f}</td><td class='{'unstable' if r.get('unstable') else ''}'>{e(cv)}</td>"
                   f"<td>{r['load_ms']:.0f}</td><td>{_fmt_mb(r['peak_rss_bytes'])}</td>"
                   + "".join(f"<td>{'' if v is None else f'{v:.1f}'}</td>" for v in rates) +
                   f"<td class='why'>{e(why)}</td></tr>")
    out.append("</tbody></table>")
    return out


def _target_html(device: dict, objective: str) -> list[str]:
    e = html.escape
    target = device.get("target") or device["device"]
    heading = target if device["device"] in ("", target) else f"{target} — {device['device']}"
    out = [f"<section class='target'><h2>{e(heading)}</h2>",
           f"<p class='meta'>{e(device.get('summary') or device_summary(device['attributes']))} · constraints: "
           f"{e(_fmt_constraints(device.get('constraints', {})))}</p>"]
    if device.get("warnings"):
        out.append("<div class='warn'><b>Warnings</b><ul>" + "".join(f"<li>{e(w)}</li>" for w in device["warnings"])
                   + "</ul></div>")
    out.append(_choice_html(device, objective))
    out.append(_scatter(device["candidates"]))
    out.extend(_pareto_html(device["candidates"]))
    out.extend(_candidates_html(device))
    out.append("</section>")
    return out


def render_html(document: dict[str, Any]) -> str:
    e = html.escape
    title = e(document["name"] or document["build"])
    bench = document["benchmark"]
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>edgeforge report — {title}</title><style>{_CSS}</style></head><body>",
           f"<h1>edgeforge build report: {title}</h1>",
           f"<p class='meta'>{e(document['build'])} · state <b>{e(document['state'])}</b> · objective "
           f"{e(document['objective'])} · float32 baseline {e(document['baseline']['metric'] or 'perplexity')} "
           f"<b>{document['baseline']['value']:.3f}</b> over {document['baseline']['tokens']} "
           f"{'tokens' if document['baseline']['metric'] in ('', 'perplexity') else 'samples'}</p>",
           f"<p class='meta'>Build constraints: {e(_fmt_constraints(document['constraints']))}</p>"]
    for device in document["devices"]:
        out.extend(_target_html(device, document["objective"]))
    out.extend(_pipelines_html(document.get("pipelines", [])))
    out.extend(_quantization_html(document.get("quantization", [])))
    out.append("<p class='meta'>Latency is one run: prompt processing of "
               f"{bench.get('prompt_tokens', '?')} tokens plus generation of {bench.get('generation_tokens', '?')} "
               f"tokens, measured on the device by its agent after {bench.get('warmup_runs', '?')} warm-up run(s); "
               f"at least {bench.get('timed_runs', '?')} timed runs and {bench.get('min_duration_ms', '?')} ms. A "
               f"measurement whose coefficient of variation exceeds {bench.get('max_cv_pct', '?')}% is repeated up "
               f"to {bench.get('cv_repeats', '?')} time(s), then flagged unstable. Throughput columns are "
               "llama-bench style tests (ppN: N prompt tokens, tgN: N generated tokens). Perplexity is computed by "
               "each file's own runtime on held-out text.</p></body></html>")
    return "".join(out)
