"""Plain-text tables of a build's results (what `edgeforge build --wait` and the demo print), and the rows
of `edgeforge build --watch`'s live table.

Lines stay within 120 columns: numbers on the candidate's row, the reason it was not chosen wrapped on
the lines below it.
"""
from __future__ import annotations

import textwrap

WIDTH = 120
_MAX_ID_WIDTH = 27          # 4 + 27 + 79 columns of numbers + "  ★ chosen" = 120
_LEGEND = "  * on the Pareto front (size, p90, ppl)   ~ unstable timing (CV over max_cv_pct after repeats)"


def _no_negative_zero(value: float) -> float:
    return 0.0 if abs(value) < 0.005 else value


def _cell(value: float, width: int = 8, decimals: int = 1, sign: str = "") -> str:
    """`value` right-aligned in `width` columns with at least one space before it: fewer decimals when it
    would not fit, then fewer significant digits (a huge random-model perplexity still leaves a gap)."""
    for places in range(decimals, -1, -1):
        text = f"{value:{sign}.{places}f}"
        if len(text) < width:
            return text.rjust(width)
    for digits in range(3, 0, -1):
        text = f"{value:{sign}.{digits}g}"
        if len(text) < width:
            break
    return text.rjust(width)


def _row(r: dict, id_width: int) -> list[str]:
    front = "*" if r.get("pareto") else " "
    unstable = "~" if r.get("unstable") else " "
    status = "★ chosen" if r["status"] == "chosen" else r["status"]
    made = (_cell(r["size_bytes"] / 1e6) + _cell(r["quality"]["value"], decimals=3)
            + _cell(_no_negative_zero(r["quality"]["delta_pct"]), decimals=2, sign="+"))
    if r["status"] == "failed" and not r["latency_ms"]["p90"]:      # never measured: no zeros posing as numbers
        measured = f"{'-':>8}{'-':>8} {'-':>6}{'-':>8}{'-':>8}{'-':>8}{'-':>8}"
    else:
        measured = (_cell(r["latency_ms"]["p50"]) + _cell(r["latency_ms"]["p90"]) + unstable
                    + _cell(r.get("cv_pct", 0.0), 6) + _cell(r["load_ms"], decimals=0)
                    + _cell(r["peak_rss_bytes"] / 1e6, decimals=0) + _cell(r["tokens_per_s"]["prompt"])
                    + _cell(r["tokens_per_s"]["generation"]))
    numbers = f"{made}{measured}  {status}"
    if len(r["id"]) <= id_width:
        lines = [f"  {front} {r['id']:<{id_width}}{numbers}"]
    else:                                   # an id too long for the column gets a line of its own
        lines = [f"  {front} {r['id']}", f"    {'':<{id_width}}{numbers}"]
    why = r["rejected_by"] or r["error"]
    if r["status"] != "chosen" and why:
        lines += textwrap.wrap(why, WIDTH, initial_indent="      why: ", subsequent_indent="           ")
    return lines


_METRIC_SHORT = {"perplexity": "ppl", "top1_accuracy": "acc", "top1_agreement": "agree", "cosine_similarity": "cos"}


def candidate_table(report: dict) -> str:
    lines = []
    metric = report["baseline"].get("metric") or "perplexity"
    short = _METRIC_SHORT.get(metric, metric[:6])
    for device in report["devices"]:
        attrs = device["attributes"]
        summary = device.get("summary") or (f"{attrs.get('cpu', '?')}, {attrs.get('os', '?')}/"
                                            f"{attrs.get('arch', '?')}, {attrs.get('cores', '?')} cores")
        target = device.get("target") or device["device"]
        lines.append(f"target {target}" + ("" if device["device"] in ("", target) else f" on {device['device']}")
                     + f"  ({summary})")
        lines += textwrap.wrap(f"warning: {device['emulated']}", WIDTH, initial_indent="  ",
                               subsequent_indent="    ") if device.get("emulated") else []
        id_width = min(max([len(r["id"]) for r in device["candidates"]] + [9]), _MAX_ID_WIDTH)
        header = (f"    {'candidate':<{id_width}}{'size MB':>8}{short:>8}{'Δ%':>8}{'p50 ms':>8}{'p90 ms':>8} "
                  f"{'CV%':>6}{'load ms':>8}{'peak MB':>8}{'pp t/s':>8}{'tg t/s':>8}  status")
        lines += [header, "  " + "-" * len(header)]         # as wide as a row ending "★ chosen"
        for r in device["candidates"]:
            lines += _row(r, id_width)
        if device["chosen"]:
            lines.append(f"  chosen: {device['chosen']}")
        else:
            lines.append("  chosen: none — no candidate met the constraints")
            for miss in device.get("nearest_misses", []):
                lines += textwrap.wrap(miss, WIDTH, initial_indent="    nearest miss: ", subsequent_indent=" " * 18)
        lines.append(_LEGEND.replace("ppl)", f"{short})"))
    unit = "tokens" if metric == "perplexity" else "samples"
    lines.append(f"float32 baseline {metric} {report['baseline']['value']:.4g} over {report['baseline']['tokens']} {unit}"
                 + ("   (Δ% is the loss: positive is worse)" if metric != "perplexity" else ""))
    lines += pipeline_table(report)
    return "\n".join(lines)


def pipeline_table(report: dict) -> list[str]:
    """Per pipeline candidate: size and quality after every step."""
    lines = []
    for pipeline in report.get("pipelines", []):
        lines.append(f"pipeline {pipeline['id']}")
        lines.append(f"    {'step':<44}{'params':>12}{'sparse':>8}{'dense MB':>10}{'stored MB':>10}{'quality':>10}"
                     f"{'Δ%':>8}{'s':>7}")
        for step in pipeline["steps"]:
            quality = step["quality"]
            value = f"{quality['value']:>10.4f}" if quality else f"{'-':>10}"
            delta = f"{_no_negative_zero(quality['delta_pct']):>+8.2f}" if quality and step["index"] else f"{'':>8}"
            label = f"{step['index']}. {step['kind']}: {step['description']}"[:43]
            lines.append(f"    {label:<44}{step['parameters']:>12,}{100 * step['sparsity']:>7.1f}%"
                         f"{step['dense_bytes'] / 1e6:>10.2f}{step['stored_bytes'] / 1e6:>10.2f}{value}{delta}"
                         f"{step['seconds']:>7.1f}")
            if step["note"]:
                lines += textwrap.wrap(step["note"], WIDTH, initial_indent="        ", subsequent_indent="        ")
    return lines


LIVE_HEADER = f"    {'candidate (as it is made)':<36}{'size MB':>9}  quality vs float32"


def live_row(candidate: dict) -> str:
    """One line of `edgeforge build --watch`'s live table: a CandidateResult (as a dict with proto field names)
    once the coordinator has made it, before any device has measured it."""
    if candidate.get("error"):
        return f"    {candidate['id']:<36}{'-':>9}  failed: {candidate['error'].get('message', '')}"[:WIDTH]
    quality = candidate.get("quality") or {}
    metric = _METRIC_SHORT.get(quality.get("metric", ""), quality.get("metric", "quality"))
    size_mb = int(candidate.get("size_bytes", 0)) / 1e6          # int64 arrives as a string in proto JSON
    text = (f"{metric} {quality['value']:.4g} ({_no_negative_zero(quality.get('delta_pct', 0.0)):+.2f}%)"
            if "value" in quality else "not evaluated")
    return f"    {candidate['id']:<36}{size_mb:>9.1f}  {text}"
