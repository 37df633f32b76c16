"""report.html: one self-contained page rendered from report.json alone (inline CSS, SVG and a small
script; no network needed to view it). Per target: the choice and why, the size–latency plot coloured
by quality loss, a sortable candidate table and predicted beside measured; then the layer-level views
(layers.py). The page reads with JavaScript off (the tables stay in build order) and prints.
"""
from __future__ import annotations

import html
from typing import Any

from services.coordinator.report import charts, layers
from services.coordinator.report.document import device_summary

e = html.escape

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;color:#1d2430}
body{margin:2rem auto;max-width:1200px;padding:0 1rem}
h1{font-size:1.5rem;margin:0 0 .3rem}h2{font-size:1.15rem;margin:2rem 0 .5rem}
h3{font-size:1rem;margin:1.2rem 0 .4rem}.meta{color:#5b6575}
.chosen-box{background:#eefaf1;border:1px solid #9bd3ad;border-radius:8px;padding:.8rem 1rem;margin:.8rem 0}
.chosen-box p{margin:.3rem 0}table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:.35rem .5rem;border-bottom:1px solid #e3e7ee;text-align:right;vertical-align:top}
th:first-child,td:first-child,td.why,th.why,td.text,th.text{text-align:left}th{background:#f5f7fa}
tr.chosen td{background:#eefaf1;font-weight:600}tr.failed td{color:#9b2c2c}td.why{color:#5b6575;max-width:28rem}
.tag{display:inline-block;padding:0 .4rem;border-radius:4px;font-size:12px}
.tag.chosen{background:#2f855a;color:#fff}.tag.eligible{background:#e2e8f0}.tag.rejected{background:#fed7d7}
.tag.failed{background:#feb2b2}section.target{border-top:2px solid #e3e7ee;margin-top:2rem}
.warn{background:#fffaf0;border:1px solid #f6ad55;border-radius:8px;padding:.5rem 1rem;margin:.8rem 0}
.none-box{background:#fff5f5;border:1px solid #feb2b2;border-radius:8px;padding:.8rem 1rem;margin:.8rem 0}
td.unstable{color:#c05621;font-weight:600}td.off{color:#c05621;font-weight:600}
th button{font:inherit;font-weight:600;background:none;border:0;padding:0;cursor:pointer;color:inherit}
th button::after{content:" \\2195";color:transparent}th button:hover::after,th button:focus::after{color:#a0aec0}
th[aria-sort=ascending] button::after{content:" \\25B2";color:#1d2430}
th[aria-sort=descending] button::after{content:" \\25BC";color:#1d2430}
th button:focus-visible{outline:2px solid #0072b2}
svg.chart{background:#fbfcfd;border:1px solid #e3e7ee;border-radius:6px;max-width:100%;height:auto;display:block}
svg .grid{stroke:#edf0f4}svg .axis{stroke:#8a94a6}svg .title{fill:#3d4757;font-weight:600}svg text{fill:#3d4757}
svg .front{fill:none;stroke:#1d2430;stroke-width:1.5;stroke-dasharray:none}
svg .front-point{stroke:#1d2430;stroke-width:2}svg circle{stroke:#fff;stroke-width:1}
svg .rejected{stroke:#c0392b;stroke-width:2;stroke-dasharray:3 2;fill-opacity:.55}
svg .chosen-mark{stroke:#1d2430;stroke-width:2.5}svg .label{font-size:11px}svg .label.chosen{font-weight:700}
svg .limit{stroke:#c0392b;stroke-dasharray:5 4;stroke-width:1.5}svg .limit-label{fill:#c0392b}
svg .reference{stroke:#1d2430;stroke-dasharray:6 4}svg .cut{fill:#f6ad55;fill-opacity:.25}
.figures{display:flex;flex-wrap:wrap;gap:.8rem}figure{margin:0}
figcaption{font-size:12px;color:#5b6575;max-width:300px;overflow-wrap:anywhere}
.swatch{display:inline-block;width:.8rem;height:.8rem;border-radius:2px;vertical-align:-1px;margin:0 .25rem 0 .8rem}
.worst{color:#5b6575;font-size:13px}.worst b{color:#d55e00}
@media print{body{margin:0;max-width:none}
  section.target{break-before:page}svg.chart,figure,tr{break-inside:avoid}
  th button::after{content:""}
  .chosen-box,.warn,.none-box,tr.chosen td{-webkit-print-color-adjust:exact;print-color-adjust:exact}}
"""

# Sorts every table.sortable by a clicked header (a <button>, so keyboard users get it too) or by the
# URL's #sort=KEY[:asc|desc]; numbers by each cell's data-sort, text by its content; blanks stay last.
SCRIPT = """
(function () {
  "use strict";
  function key(cell, numeric) {
    var raw = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
    if (!numeric) return raw === "" ? null : raw.toLowerCase();
    var value = parseFloat(raw);
    return isNaN(value) ? null : value;
  }
  function sortBy(table, column, descending) {
    var heads = table.tHead.rows[0].cells, numeric = heads[column].getAttribute("data-type") === "number";
    var body = table.tBodies[0];
    var rows = Array.prototype.map.call(body.rows, function (row, index) {
      return {row: row, index: index, key: key(row.cells[column], numeric)};
    });
    rows.sort(function (a, b) {
      if (a.key === null || b.key === null) return a.key === b.key ? a.index - b.index : (a.key === null ? 1 : -1);
      var order = numeric ? a.key - b.key : a.key.localeCompare(b.key);
      return (descending ? -order : order) || a.index - b.index;
    });
    rows.forEach(function (r) { body.appendChild(r.row); });
    Array.prototype.forEach.call(heads, function (th, index) {
      if (index === column) th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    });
  }
  function enhance(table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
      if (!th.hasAttribute("data-key")) return;
      var button = document.createElement("button");
      button.type = "button";
      button.title = "sort by " + th.textContent;
      while (th.firstChild) button.appendChild(th.firstChild);
      th.appendChild(button);
      button.addEventListener("click", function () {
        sortBy(table, column, th.getAttribute("aria-sort") === "ascending");
      });
    });
  }
  function sortFromHash() {
    var match = /(?:^#|&)sort=([A-Za-z0-9_-]+)(?::(asc|desc))?/.exec(window.location.hash);
    if (!match) return;
    document.querySelectorAll("table.sortable").forEach(function (table) {
      var heads = table.tHead.rows[0].cells;
      for (var i = 0; i < heads.length; i++) {
        if (heads[i].getAttribute("data-key") === match[1]) sortBy(table, i, match[2] === "desc");
      }
    });
  }
  document.querySelectorAll("table.sortable").forEach(enhance);
  sortFromHash();
  window.addEventListener("hashchange", sortFromHash);
  window.addEventListener("beforeprint", function () {
    document.querySelectorAll("details").forEach(function (d) { d.open = true; });
  });
})();
"""


def mb(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


def pct(value: float) -> str:
    return f"{0.0 if abs(value) < 0.005 else value:+.2f}%"          # no "-0.00%"


def _fmt_constraint(key: str, value: float) -> str:
    if key in ("max_size_bytes", "max_peak_memory_bytes"):
        return f"{key} = {mb(value)}"
    return f"{key} = {value:g}"


def fmt_constraints(constraints: dict[str, float]) -> str:
    return ", ".join(_fmt_constraint(k, v) for k, v in constraints.items()) or "none"


_OBJECTIVE = {"best_quality": "the best quality", "lowest_latency": "the lowest p90 latency",
              "smallest": "the smallest file"}


def _rank(row: dict, objective: str) -> tuple:
    """The selection's order (selection.py _rank) on report rows; delta_pct is a loss for every metric."""
    size, p90, loss = row["size_bytes"], row["latency_ms"]["p90"], row["quality"]["delta_pct"]
    if objective == "lowest_latency":
        return (p90, loss, size, row["id"])
    if objective == "smallest":
        return (size, loss, p90, row["id"])
    return (loss, size, p90, row["id"])


def _trade(runner: dict, chosen: dict) -> str:
    """What the runner-up gives and gets against the chosen one: size, p90 and quality loss."""
    def relative(a: float, b: float, same: str, less: str, more: str) -> str:
        if not b or abs(a - b) / b < 0.005:
            return same
        return f"{abs(a - b) / b:.0%} {less if a < b else more}"
    loss_runner, loss_chosen = runner["quality"]["delta_pct"], chosen["quality"]["delta_pct"]
    if abs(loss_runner - loss_chosen) < 0.005:
        quality = "the same quality"
    else:
        quality = (f"{abs(loss_runner - loss_chosen):.2f} points {'more' if loss_runner > loss_chosen else 'less'} "
                   f"quality loss ({pct(loss_runner)} vs {pct(loss_chosen)})")
    size = relative(runner["size_bytes"], chosen["size_bytes"], "the same size", "smaller", "larger")
    speed = relative(runner["latency_ms"]["p90"], chosen["latency_ms"]["p90"], "the same p90", "faster at p90",
                     "slower at p90")
    return f"{size}, {speed}, {quality}"


def choice_html(device: dict, objective: str) -> str:
    """Chosen: the numbers; why it wins under the objective and the constraints; what the runner-up trades."""
    chosen = next((r for r in device["candidates"] if r["id"] == device["chosen"]), None)
    if chosen is None:
        misses = "".join(f"<li>{e(miss)}</li>" for miss in device.get("nearest_misses", []))
        return ("<div class='none-box'><b>No candidate met the constraints</b> on this target." +
                (f" Nearest misses:<ol>{misses}</ol>" if misses else "") + "</div>")
    quality, tps = chosen["quality"], chosen["tokens_per_s"]["generation"]
    eligible = sorted((r for r in device["candidates"] if r["status"] in ("chosen", "eligible")),
                      key=lambda r: _rank(r, objective))
    rejected = [r for r in device["candidates"] if r["status"] == "rejected"]
    failed = [r for r in device["candidates"] if r["status"] == "failed"]
    limits = e(fmt_constraints(device.get("constraints", {})))
    if len(eligible) > 1:
        why = (f"of the {len(eligible)} candidates that meet every constraint ({limits}), it has "
               f"{e(_OBJECTIVE.get(objective, objective))} (objective {e(objective)})")
    else:
        why = f"it is the only candidate that meets every constraint ({limits})"
    if rejected:
        why += (f"; {len(rejected)} break{'s' if len(rejected) == 1 else ''} a constraint ({e(rejected[0]['id'])}: "
                f"{e(rejected[0]['rejected_by'])}{', …' if len(rejected) > 1 else ''})")
    if failed:
        why += f"; {len(failed)} failed"
    # the runner-up is the next on the front when there is one: a dominated candidate trades nothing
    others = [r for r in eligible if r["id"] != chosen["id"]]
    runner = next((r for r in others if r.get("pareto")), others[0] if others else None)
    runner_up = (f"<p>Runner-up <b>{e(runner['id'])}</b>{' (also on the front)' if runner.get('pareto') else ''}: "
                 f"{e(_trade(runner, chosen))}.</p>" if runner else "")
    return (f"<div class='chosen-box'><p>Chosen: <b>{e(chosen['id'])}</b> — {mb(chosen['size_bytes'])}, "
            f"{e(quality['metric'] or 'perplexity')} {quality['value']:.3f} ({pct(quality['delta_pct'])} vs float32), "
            f"p90 {chosen['latency_ms']['p90']:.1f} ms, peak memory {mb(chosen['peak_rss_bytes'])}"
            + (f", generation {tps:.1f} tok/s" if tps else "") + f".</p><p>Why: {why}.</p>{runner_up}</div>")


def scatter_html(device: dict) -> str:
    """Size against p90 for every measured candidate, coloured by quality loss."""
    rows = [r for r in device["candidates"] if r["status"] != "failed" and r["latency_ms"]["p90"] > 0]
    if not rows:
        return ""
    metric = rows[0]["quality"]["metric"] or "perplexity"
    points = [charts.Point(
        label=r["id"], x=r["size_bytes"] / 1e6, y=r["latency_ms"]["p90"], colour_value=r["quality"]["delta_pct"],
        title=(f"{r['id']} ({r['status']}): {mb(r['size_bytes'])}, p90 {r['latency_ms']['p90']:.1f} ms, {metric} "
               f"{r['quality']['value']:.3f} ({pct(r['quality']['delta_pct'])})"
               + (f" — {r['rejected_by']}" if r["rejected_by"] else "")),
        chosen=r["status"] == "chosen", on_front=bool(r.get("pareto")), rejected=r["status"] == "rejected")
        for r in rows]
    limits = device.get("constraints", {})
    svg = charts.pareto_scatter(points, x_label="size (MB)", y_label="p90 latency (ms)",
                                colour_label=f"{metric} loss %",
                                x_limit=limits["max_size_bytes"] / 1e6 if "max_size_bytes" in limits else None,
                                y_limit=limits.get("max_p90_latency_ms"))
    return ("<h3>Size against latency</h3><p class='meta'>Lower left is better. Colour is the quality loss versus "
            "float32 (dark: least). The step line joins the candidates no other is both smaller and faster than; "
            "a dark ring marks the front of size, p90 and quality together; dashed red marks a candidate that "
            "breaks a constraint and the limits themselves. Hover a point for its numbers.</p>" + svg)


def _throughput_tests(rows: list[dict]) -> list[str]:
    """Throughput tests any candidate ran: prompt processing (pp) first, then generation (tg), by length."""
    tests = {test for r in rows for test in r.get("throughput", {})}
    return sorted(tests, key=lambda t: (not t.startswith("pp"), int("".join(filter(str.isdigit, t)) or 0), t))


def _th(text: str, key: str, numeric: bool = True, css: str = "") -> str:
    kind = ' data-type="number"' if numeric else ""
    return f"<th data-key='{e(key)}'{kind}{f' class={css!r}' if css else ''}>{e(text)}</th>"


def _td(text: str, sort: float | str | None = None, css: str = "") -> str:
    """A cell showing text, sorting by `sort` (a raw number; None or "" sorts last)."""
    attribute = "" if sort is None else f" data-sort='{e(str(sort))}'"
    return f"<td{attribute}{f' class={css!r}' if css else ''}>{text}</td>"


def candidates_html(device: dict) -> list[str]:
    """Every candidate's status, why it lost, latency, memory and throughput; click a header to sort."""
    rows = device["candidates"]
    tests = _throughput_tests(rows)
    pooled = len({r.get("device", device["device"]) for r in rows}) > 1
    metric = (rows[0]["quality"]["metric"] if rows else "") or "perplexity"
    rates = [(t, f"{t} tok/s") for t in tests] or [("pp", "pp tok/s"), ("tg", "tg tok/s")]
    heads = ([_th("candidate", "id", False)] + ([_th("measured on", "device", False, "text")] if pooled else [])
             + [_th("status", "status", False, "text"), _th("size", "size"), _th(metric, "quality"),
                _th("Δ vs fp32", "loss"), _th("p50 ms", "p50"), _th("p90 ms", "p90"), _th("p99 ms", "p99"),
                _th("CV %", "cv"), _th("load ms", "load"), _th("peak memory", "memory")]
             + [_th(text, key) for key, text in rates] + [_th("why not chosen", "why", False, "why")])
    out = ["<h3>Candidates</h3><p class='meta'>◆ on the Pareto front. Click a column to sort (or open the page "
           "with #sort=size, #sort=p90:desc, …).</p><table class='candidates sortable'><thead><tr>"
           + "".join(heads) + "</tr></thead><tbody>"]
    for r in rows:
        lat, measured = r["latency_ms"], r["latency_ms"]["p90"] > 0

        def timing(value: float, digits: int = 1) -> str:
            return _td(f"{value:.{digits}f}", value) if measured else _td("—", "")
        values = ([r.get("throughput", {}).get(t) for t in tests] if tests
                  else [r["tokens_per_s"]["prompt"], r["tokens_per_s"]["generation"]])
        why = r["rejected_by"] or ("" if r["status"] == "chosen" else r["error"])
        cv = f"{r.get('cv_pct', 0.0):.1f}" + (" ⚠ unstable" if r.get("unstable") else "")
        out.append(f"<tr class='{e(r['status'])}'><td>{e(r['id'])}{' ◆' if r.get('pareto') else ''}</td>"
                   + (f"<td class='text'>{e(r.get('device', ''))}</td>" if pooled else "")
                   + f"<td class='text'><span class='tag {e(r['status'])}'>{e(r['status'])}</span></td>"
                   + _td(mb(r["size_bytes"]), r["size_bytes"])
                   + _td(f"{r['quality']['value']:.3f}", r["quality"]["value"])
                   + _td(pct(r["quality"]["delta_pct"]), r["quality"]["delta_pct"])
                   + timing(lat["p50"]) + timing(lat["p90"]) + timing(lat["p99"])
                   + (_td(e(cv), r.get("cv_pct", 0.0), "unstable" if r.get("unstable") else "") if measured
                      else _td("—", ""))
                   + timing(r["load_ms"], 0)
                   + (_td(mb(r["peak_rss_bytes"]), r["peak_rss_bytes"]) if r["peak_rss_bytes"] else _td("—", ""))
                   + "".join(_td("", "") if not v else _td(f"{v:.1f}", v) for v in values)
                   + f"<td class='why'>{e(why)}</td></tr>")
    out.append("</tbody></table>")
    return out


def _ratio(measured: float, predicted: float) -> str:
    if not measured or not predicted:
        return "<td>—</td>"
    ratio = measured / predicted
    off = " class='off'" if not 2 / 3 <= ratio <= 1.5 else ""
    return f"<td{off}>{ratio:.2f}×</td>"


def predicted_html(device: dict) -> list[str]:
    """The planner's memory and generation-speed estimate beside what the device measured."""
    rows = [r for r in device["candidates"] if r.get("predicted") and r["status"] != "failed"]
    if not rows:
        return []
    out = ["<h3>Predicted against measured</h3><p class='meta'>The planner's estimate (edgeforge plan: weights, "
           "KV cache and activations for memory; a roofline for tokens/s) beside the device's measurement. A "
           "ratio far from 1× (highlighted outside 0.67–1.5×) means the device or runtime behaves unlike its "
           "profile.</p><table class='predicted'><thead><tr><th>candidate</th><th>predicted memory</th>"
           "<th>measured peak</th><th>measured / predicted</th><th>predicted tg tok/s</th><th>measured tg tok/s</th>"
           "<th>measured / predicted</th><th class='text'>bound</th><th class='why'>basis</th></tr></thead><tbody>"]
    for r in rows:
        p = r["predicted"]
        generation = r["tokens_per_s"]["generation"]
        out.append(f"<tr><td>{e(r['id'])}</td><td>{mb(p.get('memory_bytes', 0))}</td>"
                   f"<td>{mb(r['peak_rss_bytes'])}</td>{_ratio(r['peak_rss_bytes'], p.get('memory_bytes', 0))}"
                   f"<td>{p.get('generation_tokens_per_s', 0):.1f}</td><td>{generation:.1f}</td>"
                   f"{_ratio(generation, p.get('generation_tokens_per_s', 0))}<td class='text'>{e(p.get('bound', ''))}"
                   f"</td><td class='why'>{e(p.get('basis', ''))}</td></tr>")
    out.append("</tbody></table>")
    return out


def _heading(device: dict) -> str:
    target = device.get("target") or device["device"]
    return target if device["device"] in ("", target) else f"{target} — {device['device']}"


def target_html(device: dict, objective: str, index: int) -> list[str]:
    out = [f"<section class='target' id='target-{index}'><h2>{e(_heading(device))}</h2>",
           f"<p class='meta'>{e(device.get('summary') or device_summary(device['attributes']))} · constraints: "
           f"{e(fmt_constraints(device.get('constraints', {})))}</p>"]
    if device.get("warnings"):
        out.append("<div class='warn'><b>Warnings</b><ul>" + "".join(f"<li>{e(w)}</li>" for w in device["warnings"])
                   + "</ul></div>")
    out.append(choice_html(device, objective))
    out.append(scatter_html(device))
    out.extend(candidates_html(device))
    out.extend(predicted_html(device))
    out.append("</section>")
    return out


def glance_html(devices: list[dict]) -> list[str]:
    """One line per target: what was chosen and its numbers, or that nothing fit."""
    if not devices:
        return []
    out = ["<table class='glance'><thead><tr><th>target</th><th class='text'>chosen</th><th>size</th>"
           "<th>p90 ms</th><th>quality loss</th><th>peak memory</th></tr></thead><tbody>"]
    for i, device in enumerate(devices):
        chosen = next((r for r in device["candidates"] if r["id"] == device["chosen"]), None)
        link = f"<td><a href='#target-{i}'>{e(_heading(device))}</a></td>"
        if chosen is None:
            out.append(f"<tr>{link}<td class='text' colspan='5'>none met the constraints</td></tr>")
            continue
        out.append(f"<tr class='chosen'>{link}<td class='text'>{e(chosen['id'])}</td><td>{mb(chosen['size_bytes'])}"
                   f"</td><td>{chosen['latency_ms']['p90']:.1f}</td><td>{pct(chosen['quality']['delta_pct'])}</td>"
                   f"<td>{mb(chosen['peak_rss_bytes'])}</td></tr>")
    out.append("</tbody></table>")
    return out


def render_html(document: dict[str, Any]) -> str:
    title = e(document["name"] or document["build"])
    bench = document["benchmark"]
    baseline = document["baseline"]
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>"
           "<meta name='viewport' content='width=device-width, initial-scale=1'>",
           f"<title>edgeforge report — {title}</title><style>{CSS}</style></head><body>",
           f"<h1>edgeforge build report: {title}</h1>",
           f"<p class='meta'>{e(document['build'])} · state <b>{e(document['state'])}</b> · objective "
           f"{e(document['objective'])} · float32 baseline {e(baseline['metric'] or 'perplexity')} "
           f"<b>{baseline['value']:.3f}</b> over {baseline['tokens']} "
           f"{'tokens' if baseline['metric'] in ('', 'perplexity') else 'samples'}</p>",
           f"<p class='meta'>Build constraints: {e(fmt_constraints(document['constraints']))}</p>"]
    out.extend(glance_html(document["devices"]))
    for index, device in enumerate(document["devices"]):
        out.extend(target_html(device, document["objective"], index))
    out.extend(layers.pipelines_html(document.get("pipelines", [])))
    out.extend(layers.quantization_html(document.get("quantization", [])))
    out.append("<p class='meta'>Latency is one run: prompt processing of "
               f"{bench.get('prompt_tokens', '?')} tokens plus generation of {bench.get('generation_tokens', '?')} "
               f"tokens, measured on the device by its agent after {bench.get('warmup_runs', '?')} warm-up run(s); "
               f"at least {bench.get('timed_runs', '?')} timed runs and {bench.get('min_duration_ms', '?')} ms. A "
               f"measurement whose coefficient of variation exceeds {bench.get('max_cv_pct', '?')}% is repeated up "
               f"to {bench.get('cv_repeats', '?')} time(s), then flagged unstable. Throughput columns are "
               "llama-bench style tests (ppN: N prompt tokens, tgN: N generated tokens). Perplexity is computed by "
               f"each file's own runtime on held-out text.</p><script>{SCRIPT}</script></body></html>")
    return "".join(out)
