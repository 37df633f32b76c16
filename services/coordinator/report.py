"""The build report: a JSON document (the contract pipelines gate on) and a self-contained HTML
page rendered from it (inline CSS and SVG, no network needed to view it).

report.json: {build, name, state, model, baseline, constraints, objective, benchmark,
devices[] → {device, attributes, chosen, candidates[] → {id, format, recipe, artifact, size_bytes,
quality {metric, value, baseline, delta_pct}, validation, latency_ms {p50, p90, p99, mean, stddev,
samples}, load_ms, first_run_ms, peak_rss_bytes, tokens_per_s {prompt, generation}, threads,
runtime_versions, status, rejected_by, error}}}
"""
from __future__ import annotations

import html
from typing import Any

from google.protobuf import json_format

from edgeforge.v1 import common_pb2, coordinator_pb2


def _status_name(value: int) -> str:
    return coordinator_pb2.CandidateStatus.Name(value).removeprefix("CANDIDATE_STATUS_").lower()


def build_report(build: coordinator_pb2.Build) -> dict[str, Any]:
    candidates = {c.id: c for c in build.candidates}
    devices = []
    for device in build.devices:
        rows = []
        for entry in device.candidates:
            c = candidates[entry.candidate_id]
            m = entry.measurement
            rows.append({
                "id": c.id, "format": common_pb2.ExportFormat.Name(c.format).removeprefix("EXPORT_FORMAT_").lower(),
                "recipe": json_format.MessageToDict(c.recipe), "artifact": c.artifact.removeprefix("artifacts/"),
                "size_bytes": c.size_bytes,
                "quality": {"metric": c.quality.metric or "perplexity", "value": c.quality.value,
                            "baseline": c.quality.baseline, "delta_pct": c.quality.delta_pct},
                "validation": {"runtime": c.validation.runtime, "max_abs_diff": c.validation.max_abs_diff,
                               "mean_abs_diff": c.validation.mean_abs_diff,
                               "top1_agreement": c.validation.top1_agreement},
                "latency_ms": {"p50": m.latency.p50_ms, "p90": m.latency.p90_ms, "p99": m.latency.p99_ms,
                               "mean": m.latency.mean_ms, "stddev": m.latency.stddev_ms,
                               "samples": list(m.latency.samples_ms)},
                "load_ms": m.load_ms, "first_run_ms": m.first_run_ms, "peak_rss_bytes": m.peak_rss_bytes,
                "tokens_per_s": {"prompt": m.prompt_tokens_per_s, "generation": m.generation_tokens_per_s},
                "threads": m.threads, "runtime_versions": dict(m.runtime_versions),
                "status": _status_name(entry.status), "rejected_by": entry.rejected_by,
                "error": entry.error.message,
            })
        devices.append({"device": device.device, "attributes": dict(sorted(device.attributes.items())),
                        "chosen": device.chosen_candidate or None, "candidates": rows})
    quantization = [{"id": c.id, "recipe": json_format.MessageToDict(c.recipe), "bits_per_weight": c.bits_per_weight,
                     "compress_seconds": c.compress_seconds,
                     "tensors": [{"name": t.name, "grid": t.grid, "bits_per_weight": t.bits_per_weight,
                                  "snr_db": t.snr_db, "output_error": t.output_error} for t in c.tensors]}
                    for c in build.candidates if c.tensors]
    spec = build.spec
    constraints = {k: getattr(spec.constraints, k) for k in ("max_size_bytes", "max_p90_latency_ms",
                                                             "max_quality_loss_pct") if spec.constraints.HasField(k)}
    return {
        "build": build.name, "name": spec.display_name,
        "state": coordinator_pb2.BuildState.Name(build.state).removeprefix("BUILD_STATE_").lower(),
        "model": {"source": spec.model.artifact, "reference": build.reference_model,
                  "calibration_stats": build.calibration_stats},
        "baseline": {"metric": build.baseline.metric, "value": build.baseline.value, "tokens": build.baseline.tokens},
        "constraints": constraints,
        "objective": coordinator_pb2.Objective.Name(spec.objective).removeprefix("OBJECTIVE_").lower(),
        "benchmark": json_format.MessageToDict(spec.benchmark, preserving_proto_field_name=True),
        "devices": devices,
        "quantization": quantization,
    }


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
"""


def _fmt_mb(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


def _fmt_pct(value: float) -> str:
    return f"{0.0 if abs(value) < 0.005 else value:+.2f}%"          # no "-0.00%"


def _fmt_constraint(key: str, value: float) -> str:
    if key == "max_size_bytes":
        return f"{key} = {_fmt_mb(value)}"
    return f"{key} = {value:g}"


def _scatter(rows: list[dict]) -> str:
    """Size (x) against p90 latency (y) for measured candidates; the chosen one in green."""
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
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="6" fill="{color}"><title>{html.escape(r["id"])}: '
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


def render_html(document: dict[str, Any]) -> str:
    e = html.escape
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>edgeforge report — {e(document['name'] or document['build'])}</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>edgeforge build report: {e(document['name'] or document['build'])}</h1>",
           f"<p class='meta'>{e(document['build'])} · state <b>{e(document['state'])}</b> · objective "
           f"{e(document['objective'])} · float32 baseline {e(document['baseline']['metric'] or 'perplexity')} "
           f"<b>{document['baseline']['value']:.3f}</b> over {document['baseline']['tokens']} tokens</p>",
           "<p class='meta'>Constraints: " + (", ".join(e(_fmt_constraint(k, v)) for k, v in document["constraints"].items())
                                             or "none") + "</p>"]
    for device in document["devices"]:
        attrs = device["attributes"]
        out.append(f"<h2>{e(device['device'])} — {e(attrs.get('cpu', ''))} · {e(attrs.get('os', ''))}/"
                   f"{e(attrs.get('arch', ''))} · {e(attrs.get('cores', '?'))} cores</h2>")
        chosen = next((r for r in device["candidates"] if r["id"] == device["chosen"]), None)
        if chosen:
            out.append(f"<div class='chosen-box'>Chosen: <b>{e(chosen['id'])}</b> — {_fmt_mb(chosen['size_bytes'])}, "
                       f"perplexity {chosen['quality']['value']:.3f} ({_fmt_pct(chosen['quality']['delta_pct'])} vs float32), "
                       f"p90 {chosen['latency_ms']['p90']:.1f} ms, generation "
                       f"{chosen['tokens_per_s']['generation']:.1f} tok/s. Best quality among candidates that meet "
                       f"every constraint.</div>")
        else:
            out.append("<div class='chosen-box' style='background:#fff5f5;border-color:#feb2b2'>No candidate met "
                       "the constraints on this device.</div>")
        out.append(_scatter(device["candidates"]))
        out.append("<table><thead><tr><th>candidate</th><th>status</th><th>size</th><th>perplexity</th><th>Δ vs fp32</th>"
                   "<th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>load ms</th><th>peak RSS</th><th>pp tok/s</th>"
                   "<th>tg tok/s</th><th class='why'>why not chosen</th></tr></thead><tbody>")
        for r in device["candidates"]:
            lat, tps = r["latency_ms"], r["tokens_per_s"]
            why = r["rejected_by"] or ("" if r["status"] == "chosen" else r["error"])
            out.append(f"<tr class='{e(r['status'])}'><td>{e(r['id'])}</td><td><span class='tag {e(r['status'])}'>"
                       f"{e(r['status'])}</span></td><td>{_fmt_mb(r['size_bytes'])}</td>"
                       f"<td>{r['quality']['value']:.3f}</td><td>{_fmt_pct(r['quality']['delta_pct'])}</td>"
                       f"<td>{lat['p50']:.1f}</td><td>{lat['p90']:.1f}</td><td>{lat['p99']:.1f}</td>"
                       f"<td>{r['load_ms']:.0f}</td><td>{_fmt_mb(r['peak_rss_bytes'])}</td><td>{tps['prompt']:.1f}</td>"
                       f"<td>{tps['generation']:.1f}</td><td class='why'>{e(why)}</td></tr>")
        out.append("</tbody></table>")
    out.extend(_quantization_html(document.get("quantization", [])))
    out.append("<p class='meta'>Latency is one run: prompt processing of "
               f"{document['benchmark'].get('prompt_tokens', '?')} tokens plus generation of "
               f"{document['benchmark'].get('generation_tokens', '?')} tokens, measured on the device by its agent. "
               "Perplexity is computed by each file's own runtime on held-out text.</p></body></html>")
    return "".join(out)
