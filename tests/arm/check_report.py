"""Checks the ARM build's report (`edgeforge build --wait --json`) and prints a short summary.

    python tests/arm/check_report.py REPORT.json

Passes when a device of the report is the emulated board (attributes arch=arm64 and
emulated=qemu-user), the report flags its timings as meaningless, and at least one of its candidates
was measured there (latency samples present). Exits 1 naming the first failed check.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def board(report: dict) -> dict:
    for device in report.get("devices", []):
        attributes = device.get("attributes", {})
        if attributes.get("arch") == "arm64" and attributes.get("emulated") == "qemu-user":
            return device
    seen = [d.get("attributes", {}) for d in report.get("devices", [])]
    raise ValueError(f"no device with arch=arm64 and emulated=qemu-user in the report; devices: {seen}")


def check(report: dict) -> list[str]:
    """The summary lines; raises ValueError at the first failed check."""
    device = board(report)
    if not device.get("emulated"):
        raise ValueError("the report does not warn that the board's timings are emulated")
    measured = [c for c in device.get("candidates", []) if c.get("latency_ms", {}).get("samples")]
    if not measured:
        errors = {c.get("id"): c.get("error") or c.get("status") for c in device.get("candidates", [])}
        raise ValueError(f"no candidate has latency samples on {device.get('device')}: {errors}")
    attributes = device["attributes"]
    lines = [f"board {device.get('device')}: {device.get('summary')}",
             f"  os {attributes.get('os_name')}, python {attributes.get('python')}, "
             f"runtimes {', '.join(f'{k[8:]} {v}' for k, v in attributes.items() if k.startswith('runtime:'))}",
             f"  warning: {device['emulated']}"]
    for candidate in device.get("candidates", []):
        latency = candidate.get("latency_ms", {})
        if latency.get("samples"):
            lines.append(f"  {candidate['id']:<12} {candidate.get('runtime') or '?':<12} p50 {latency['p50']:9.1f} ms "
                         f"over {len(latency['samples'])} runs, load {candidate.get('load_ms', 0):.0f} ms, "
                         f"peak RSS {candidate.get('peak_rss_bytes', 0) / 1e6:.0f} MB")
        else:
            lines.append(f"  {candidate['id']:<12} not measured: {candidate.get('error') or candidate.get('status')}")
    lines.append(f"  chosen: {device.get('chosen')}")
    return lines


def main() -> None:
    path = Path(sys.argv[1])
    try:
        lines = check(json.loads(path.read_text()))
    except (ValueError, KeyError, json.JSONDecodeError) as error:
        sys.exit(f"check_report: {path}: {error}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
