"""The report page's layer-level views: pipeline steps with the weight histograms at each pruning cut,
and per quantized candidate the error of every tensor (worst layers highlighted), the bits each tensor
got (the mixed-precision allocation) and the float weights' distribution. Bounded for models with
hundreds of tensors: one bar per tensor, at most HISTOGRAMS histograms per step or candidate.
"""
from __future__ import annotations

import html
import math
import re

from services.coordinator.report import charts

e = html.escape
HISTOGRAMS = 6          # per pruning step / quantized candidate: the most pruned (or largest) tensors
WORST = 5               # layers highlighted in each error chart
_LAYER = re.compile(r"\.(\d+)\.")


def _mb(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


def _pct(value: float) -> str:
    return f"{0.0 if abs(value) < 0.005 else value:+.2f}%"


def layer_ticks(names: list[str], most: int = 16) -> list[tuple[int, str]]:
    """(bar index, layer number) at the first tensor of every k-th layer, k chosen so at most `most` show."""
    firsts: dict[str, int] = {}
    for index, name in enumerate(names):
        match = _LAYER.search(name)
        if match and match.group(1) not in firsts:
            firsts[match.group(1)] = index
    every = max(1, math.ceil(len(firsts) / most))
    return [(index, layer) for i, (layer, index) in enumerate(firsts.items()) if i % every == 0]


def tensor_error(tensor: dict) -> tuple[float, str] | None:
    """The relative error of one quantized tensor and what it is: the output error on the calibration
    inputs when the method saw them, else the weights' noise-to-signal ratio 10^(−SNR/10)."""
    if tensor["output_error"] > 0:
        return tensor["output_error"], "output"
    snr = tensor["snr_db"]
    if snr and math.isfinite(snr):
        return 10 ** (-snr / 10), "weight"
    return None


def _histogram_figure(histogram: dict, name: str) -> str:
    """One small histogram with its caption: tensor, the cut and the share of weights it removed."""
    kind, threshold = histogram["threshold_kind"], histogram["threshold"]
    total = sum(histogram["counts"])
    if kind == "magnitude":
        cut = f"pruned {histogram.get('pruned_fraction', 0):.1%} at |w| &lt; {threshold:.3g}"
    elif kind in charts.PRUNING_KINDS:
        cut = f"pruned {histogram.get('pruned_fraction', 0):.1%}; largest pruned |w| {threshold:.3g}"
    elif kind == "clip" and threshold > 0:
        cut = f"clipped at ±{threshold:.3g}"
    else:
        cut = "no cut"
    svg = charts.weight_histogram(histogram["low"], histogram["high"], histogram["counts"], threshold, kind,
                                  label=f"histogram of {name}")
    return f"<figure>{svg}<figcaption><b>{e(name)}</b> · {total:,} weights · {cut}</figcaption></figure>"


def _histograms_html(histograms: list[tuple[str, dict]], heading: str) -> list[str]:
    """The HISTOGRAMS most pruned (then largest) tensors as small multiples."""
    if not histograms:
        return []
    shown = sorted(histograms, key=lambda item: (-item[1].get("pruned_fraction", 0), -sum(item[1]["counts"]),
                                                  item[0]))[:HISTOGRAMS]
    pruned = any(h.get("pruned_fraction", 0) > 0 for _, h in histograms)
    count = (f"the {len(shown)} {'most pruned' if pruned else 'largest'} of {len(histograms)} tensors"
             if len(histograms) > len(shown) else f"{len(shown)} tensor{'s' if len(shown) > 1 else ''}")
    return [f"<h4>{e(heading)}</h4><p class='meta'>Weights before the step, {count}; counts on a log scale so the "
            "tails show. The shaded band is what the cut removed (for a clip: what it clipped); the dashed lines "
            "are ±threshold.</p><div class='figures'>"
            + "".join(_histogram_figure(h, name) for name, h in shown) + "</div>"]


def pipelines_html(pipelines: list[dict]) -> list[str]:
    """Per pipeline candidate, size and quality after every step, and the histograms at every cut."""
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
            delta = _pct(quality["delta_pct"]) if quality and step["index"] else ""
            out.append(f"<tr><td>{step['index']}. {e(step['kind'])}: {e(step['description'])}</td>"
                       f"<td>{step['parameters']:,}</td><td>{100 * step['sparsity']:.1f}%</td>"
                       f"<td>{_mb(step['dense_bytes'])}</td><td>{_mb(step['stored_bytes'])}</td>"
                       f"<td>{value}</td><td>{delta}</td><td>{step['seconds']:.1f}</td>"
                       f"<td class='why'>{e(step['storage'])}{'. ' + e(step['note']) if step['note'] else ''}"
                       "</td></tr>")
        out.append("</tbody></table>")
        for step in pipeline["steps"]:
            histograms = [(h["tensor"], h) for h in step.get("histograms", [])]
            out.extend(_histograms_html(histograms, f"Step {step['index']}: {step['kind']} {step['description']}"))
    return out


def _error_chart(candidate: dict) -> list[str]:
    """One bar per tensor, in model order; the WORST largest errors highlighted and listed."""
    errors = [(t["name"], tensor_error(t)) for t in candidate["tensors"]]
    errors = [(name, value) for name, value in errors if value is not None]
    if not errors:
        return []
    kinds = {kind for _, (_, kind) in errors}
    ranked = sorted(range(len(errors)), key=lambda i: (-errors[i][1][0], i))[:WORST]      # ties in model order
    worst = set(ranked)
    bars = [charts.Bar(value, f"{name}: {value:.3g} ({kind} error)",
                       charts.HIGHLIGHT_COLOUR if i in worst else charts.BAR_COLOUR)
            for i, (name, (value, kind)) in enumerate(errors)]
    label = ("relative output error" if kinds == {"output"} else "relative weight error" if kinds == {"weight"}
             else "relative error (output / weights)")
    svg = charts.bar_chart(bars, y_label=label, label=f"{label} per tensor of {candidate['id']}",
                           x_ticks=layer_ticks([name for name, _ in errors]))
    listed = ", ".join(f"<b>{e(errors[i][0])}</b> {errors[i][1][0]:.3g}"
                       for i in ranked)
    return [f"<h4>Error per tensor</h4>{svg}<p class='worst'>Most sensitive: {listed}. Numbers under the bars are "
            "layer indices.</p>"]


def _bits_chart(candidate: dict) -> list[str]:
    """Bits per weight of every tensor, coloured by its grid, against the candidate's average."""
    tensors = candidate["tensors"]
    grids = sorted({t["grid"] for t in tensors})
    if len(grids) < 2:
        return []
    colour = {grid: charts.OKABE_ITO[i % len(charts.OKABE_ITO)] for i, grid in enumerate(grids)}
    counts = {grid: sum(t["grid"] == grid for t in tensors) for grid in grids}
    bars = [charts.Bar(t["bits_per_weight"], f"{t['name']}: {t['grid']}, {t['bits_per_weight']:.3f} bits/weight",
                       colour[t["grid"]]) for t in tensors]
    average = candidate["bits_per_weight"]
    svg = charts.bar_chart(bars, y_label="bits per weight", label=f"bits per weight per tensor of {candidate['id']}",
                           x_ticks=layer_ticks([t["name"] for t in tensors]),
                           reference=(average, f"average {average:.3f}") if average else None)
    legend = "".join(f"<span class='swatch' style='background:{colour[g]}'></span>{e(g)} ×{counts[g]}"
                     for g in grids)
    return [f"<h4>Bits per weight</h4><p class='meta'>The precision each tensor got (scales included), coloured "
            f"by grid: {legend}. The dashed line is the average over all quantized weights.</p>{svg}"]


def _weights_html(candidates: list[dict]) -> list[str]:
    """Float weights before quantization: once for all candidates, plus each candidate that clipped them."""
    out, shown_plain = [], False
    for c in candidates:
        histograms = [(t["name"], t["histogram"]) for t in c["tensors"] if t.get("histogram")]
        clipped = any(h["threshold_kind"] == "clip" and h["threshold"] > 0 for _, h in histograms)
        if histograms and (clipped or not shown_plain):
            heading = (f"{c['id']}: float weights and the clipping range" if clipped
                       else "Float weights before quantization (the same source for every candidate)")
            out.extend(_histograms_html(histograms, heading))
            shown_plain = shown_plain or not clipped
    return ["<h3>Weight distributions</h3>"] + out if out else []


def quantization_html(candidates: list[dict]) -> list[str]:
    """Per candidate, every quantized tensor's error, bits and grid (the mixed-precision allocation)."""
    if not candidates:
        return []
    out = ["<h2>Quantization, tensor by tensor</h2><p class='meta'>Which layers quantization hurt most: the "
           "relative output error tr(ΔW·H·ΔWᵀ)/tr(W·H·Wᵀ) on the calibration inputs where the method saw them, "
           "else the weights' noise-to-signal ratio 10^(−SNR/10). Log scale when errors span more than 10×; the "
           f"{WORST} worst are highlighted. A mixed-precision recipe shows where its bits went.</p>"]
    for c in candidates:
        grids: dict[str, int] = {}
        for t in c["tensors"]:
            grids[t["grid"]] = grids.get(t["grid"], 0) + 1
        summary = ", ".join(f"{e(g)} ×{n}" for g, n in sorted(grids.items()))
        out.append(f"<h3>{e(c['id'])}</h3><p class='meta'>{c['bits_per_weight']:.3f} bits/weight on average, "
                   f"{summary}; compressed in {c['compress_seconds']:.1f} s</p>")
        out.extend(_error_chart(c))
        out.extend(_bits_chart(c))
        out.append(f"<details><summary>every tensor of {e(c['id'])}</summary><table><thead><tr><th>tensor</th>"
                   "<th>grid</th><th>bits/weight</th><th>SNR dB</th><th>output error</th></tr></thead><tbody>")
        for t in c["tensors"]:
            out.append(f"<tr><td>{e(t['name'])}</td><td>{e(t['grid'])}</td><td>{t['bits_per_weight']:.3f}</td>"
                       f"<td>{t['snr_db']:.1f}</td><td>{t['output_error']:.2e}</td></tr>")
        out.append("</tbody></table></details>")
    out.extend(_weights_html(candidates))
    return out
