"""Plain-text tables of a build's results (what `edgeforge build --wait` and the demo print)."""
from __future__ import annotations


def _no_negative_zero(value: float) -> float:
    return 0.0 if abs(value) < 0.005 else value


def candidate_table(report: dict) -> str:
    lines = []
    for device in report["devices"]:
        attrs = device["attributes"]
        lines.append(f"device {device['device']}  ({attrs.get('cpu', '?')}, {attrs.get('os', '?')}/"
                     f"{attrs.get('arch', '?')}, {attrs.get('cores', '?')} cores)")
        header = f"  {'candidate':<27}{'size MB':>9}{'ppl':>9}{'Δ%':>8}{'p50 ms':>9}{'p90 ms':>9}{'load ms':>9}" \
                 f"{'RSS MB':>8}{'pp t/s':>8}{'tg t/s':>8}  status / why"
        lines += [header, "  " + "-" * (len(header) + 10)]
        for r in device["candidates"]:
            why = r["rejected_by"] or r["error"]
            mark = "★ chosen" if r["status"] == "chosen" else f"{r['status']}: {why}"
            lines.append(f"  {r['id']:<27}{r['size_bytes'] / 1e6:>9.1f}{r['quality']['value']:>9.3f}"
                         f"{_no_negative_zero(r['quality']['delta_pct']):>+8.2f}{r['latency_ms']['p50']:>9.1f}{r['latency_ms']['p90']:>9.1f}"
                         f"{r['load_ms']:>9.0f}{r['peak_rss_bytes'] / 1e6:>8.0f}{r['tokens_per_s']['prompt']:>8.1f}"
                         f"{r['tokens_per_s']['generation']:>8.1f}  {mark}")
        lines.append(f"  chosen: {device['chosen'] or 'none — no candidate met the constraints'}")
    lines.append(f"float32 baseline perplexity {report['baseline']['value']:.3f} over {report['baseline']['tokens']} tokens")
    return "\n".join(lines)
