"""report.html in a real browser: headless Chromium (the Debian package `chromium`) loads the page from a
file:// URL with no network, runs its script, and the test reads the rendered DOM (--dump-dom) and a
screenshot. The report comes from build_report over a Build shaped like a finished one: two targets,
six candidates, a mixed-precision allocation over 24 layers, a pruning pipeline with weight histograms,
and the planner's predictions beside the measurements."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from edgeforge.v1 import common_pb2, coordinator_pb2
from services.coordinator.report import build_report, render_html
from services.coordinator.selection import Budget, Measured, Status, select

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="`chromium` is not on PATH; `make system-deps` installs "
                                                          "the Debian package chromium that this test drives")
MB = 1_000_000
LAYERS = 24
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
# id: (size MB, perplexity loss %, p90 ms on the phone, peak MB)
CANDIDATES = {"gguf-f16": (270.0, 0.0, 2100.0, 420.0), "gguf-q8_0": (145.0, 0.5, 1250.0, 260.0),
              "gguf-q4_k-mixed": (101.0, 2.1, 880.0, 190.0), "gguf-q4_0": (90.0, 6.4, 820.0, 175.0),
              "onnx-int8-per_channel-sym": (150.0, 0.6, 1700.0, 300.0), "pruned-50-q4_0": (88.0, 14.0, 790.0, 170.0)}
_STATUS = {Status.CHOSEN: coordinator_pb2.CANDIDATE_STATUS_CHOSEN,
           Status.ELIGIBLE: coordinator_pb2.CANDIDATE_STATUS_ELIGIBLE,
           Status.REJECTED: coordinator_pb2.CANDIDATE_STATUS_REJECTED,
           Status.FAILED: coordinator_pb2.CANDIDATE_STATUS_FAILED}


def _histogram(name: str, weights: np.ndarray, threshold: float = 0.0, kind: str = "none",
               pruned: float = 0.0) -> common_pb2.WeightHistogram:
    counts, _ = np.histogram(weights, bins=48, range=(float(weights.min()), float(weights.max())))
    return common_pb2.WeightHistogram(tensor=name, low=float(weights.min()), high=float(weights.max()),
                                      counts=counts.tolist(), threshold=threshold, threshold_kind=kind,
                                      pruned_fraction=pruned)


def _device(target: str, device: str, cpu: str, slowdown: float, missing: set[str]) -> coordinator_pb2.DeviceResult:
    constraints = coordinator_pb2.Constraints(max_size_bytes=200 * MB, max_quality_loss_pct=10.0,
                                              max_p90_latency_ms=2000.0 * slowdown)
    result = coordinator_pb2.DeviceResult(target=target, device=device, constraints=constraints,
                                          attributes={"cpu": cpu, "os": "android", "arch": "arm64", "cores": "8"})
    measured = []
    for candidate_id, (size_mb, loss, p90_ms, peak_mb) in CANDIDATES.items():
        entry = result.candidates.add(candidate_id=candidate_id, device=device, attempts=1)
        if candidate_id in missing:
            entry.error.message = "onnxruntime: no arm64 build of onnxruntime 1.20 on this device"
        else:
            p90 = p90_ms * slowdown
            entry.measurement.CopyFrom(common_pb2.Measurement(
                latency=common_pb2.LatencyStats(p50_ms=0.93 * p90, p90_ms=p90, p99_ms=1.04 * p90, mean_ms=0.95 * p90,
                                                samples_ms=[0.93 * p90] * 5),
                prompt_tokens_per_s=40_000 / p90, generation_tokens_per_s=6_000 / p90, load_ms=size_mb * 1.8,
                peak_rss_bytes=int(peak_mb * MB), threads=4, cv_pct=3.1, attempts=1, runtime="llama.cpp"))
        measured.append(Measured(candidate_id, int(size_mb * MB), 20.0 * (1 + loss / 100), loss,
                                 entry.measurement.latency.p90_ms, entry.error.message,
                                 entry.measurement.peak_rss_bytes))
    selection = select(measured, Budget(200 * MB, 2000.0 * slowdown, 10.0, None))
    result.chosen_candidate = selection.chosen or ""
    for entry, verdict in zip(result.candidates, selection.verdicts):
        entry.status, entry.rejected_by, entry.pareto = _STATUS[verdict.status], verdict.reason, verdict.pareto
        entry.dominated_by.extend(verdict.dominated_by)
    return result


def _finished_build() -> coordinator_pb2.Build:
    spec = coordinator_pb2.BuildSpec(display_name="smollm2-on-phones", objective=coordinator_pb2.OBJECTIVE_BEST_QUALITY,
                                     constraints=coordinator_pb2.Constraints(max_size_bytes=200 * MB),
                                     benchmark=common_pb2.BenchmarkConfig(prompt_tokens=128, generation_tokens=32,
                                                                          warmup_runs=1, timed_runs=5))
    build = coordinator_pb2.Build(name="builds/b-7f3a", spec=spec, state=coordinator_pb2.BUILD_STATE_SUCCEEDED,
                                  baseline=common_pb2.Quality(metric="perplexity", value=20.0, tokens=4096))
    rng = np.random.default_rng(8)
    weights = {f"model.layers.{layer}.{kind}.weight": rng.laplace(0, 0.02 * (1 + layer / LAYERS), 4096)
               for layer in range(LAYERS) for kind in KINDS}
    for candidate_id, (size_mb, loss, _, _) in CANDIDATES.items():
        candidate = build.candidates.add(id=candidate_id, artifact=f"artifacts/{candidate_id}",
                                         size_bytes=int(size_mb * MB), format=common_pb2.EXPORT_FORMAT_GGUF,
                                         quality=common_pb2.Quality(metric="perplexity", value=20.0 * (1 + loss / 100),
                                                                    baseline=20.0, delta_pct=loss))
        if candidate_id in ("gguf-q4_k-mixed", "gguf-q4_0", "onnx-int8-per_channel-sym"):
            for i, (name, w) in enumerate(weights.items()):
                eight = candidate_id == "onnx-int8-per_channel-sym" or (candidate_id == "gguf-q4_k-mixed" and (
                    "down_proj" in name or ".layers.0." in name or "v_proj" in name))
                tensor = candidate.tensors.add(name=name, grid=("int8/per_channel/sym" if "onnx" in candidate_id else
                                                                "q8_0" if eight else "q4_0"),
                                               bits_per_weight=8.5 if eight else 4.5, snr_db=48.0 if eight else 20.0,
                                               output_error=(3e-4 if eight else 8e-3) * (1 + (i % 7 == 6) * 3
                                                                                          + i / 400))
                tensor.histogram.CopyFrom(_histogram(name, w))
            candidate.bits_per_weight = float(np.mean([t.bits_per_weight for t in candidate.tensors]))
            candidate.compress_seconds = 4.2
        if candidate_id == "pruned-50-q4_0":
            source = candidate.steps.add(index=0, kind="source", description="smollm2", parameter_count=134_515_008,
                                         nonzero_count=106_954_752, dense_bytes=538 * MB, stored_bytes=538 * MB)
            source.storage = "dense float32"
            prune = candidate.steps.add(index=1, kind="prune", description="magnitude 50% per layer",
                                        parameter_count=134_515_008, nonzero_count=53_477_376, sparsity=0.5,
                                        dense_bytes=538 * MB, stored_bytes=402 * MB, storage="CSR where smaller")
            prune.quality.CopyFrom(common_pb2.Quality(metric="perplexity", value=22.1, delta_pct=10.5))
            for name, w in list(weights.items())[:10]:
                threshold = float(np.quantile(np.abs(w), 0.5))
                prune.histograms.append(_histogram(name, w, threshold, "magnitude", 0.5))
    build.devices.append(_device("pixel-8", "devices/pixel-8", "Tensor G3", 1.0, missing=set()))
    build.devices.append(_device("budget-phones", "devices/moto-g", "Helio G85", 2.6,
                                 missing={"onnx-int8-per_channel-sym"}))
    return build


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> tuple[dict, Path]:
    document = json.loads(json.dumps(build_report(_finished_build())))
    for device, speed in zip(document["devices"], (1.0, 2.6)):
        for row in device["candidates"]:                        # what the planner adds (edgeforge plan)
            size = row["size_bytes"]
            row["predicted"] = {"memory_bytes": int(size * 1.1 + 60 * MB), "bound": "memory",
                                "generation_tokens_per_s": 0.8e9 / size / speed, "prompt_tokens_per_s": 4e10 / size,
                                "basis": "LPDDR5 51.2 GB/s; weights + KV cache at 512 tokens"}
    page = tmp_path_factory.mktemp("report") / "report.html"
    page.write_text(render_html(document))
    return document, page


def _chromium(tmp_path: Path, url: str, *flags: str) -> str:
    """Run headless Chromium once with its own profile and HOME; its stdout (the DOM, for --dump-dom)."""
    run = tmp_path / f"chromium-{len(list(tmp_path.glob('chromium-*')))}"
    (run / "home").mkdir(parents=True)
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               "--disable-extensions", "--disable-background-networking", f"--user-data-dir={run / 'profile'}",
               *flags, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(run / "home")})
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}"
    return done.stdout


class _Dom(HTMLParser):
    """Headings, and per candidate table its header attributes and each row's cells' text."""

    def __init__(self):
        super().__init__()
        self.headings: list[str] = []
        self.tables: list[dict] = []
        self._text: list[str] | None = None
        self._in_table = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._in_table = "candidates" in (attrs.get("class") or "")
            if self._in_table:
                self.tables.append({"heads": [], "rows": []})
        elif self._in_table and tag == "th":
            self.tables[-1]["heads"].append(dict(attrs, buttons=0))
        elif self._in_table and tag == "button" and self.tables[-1]["heads"]:
            self.tables[-1]["heads"][-1]["buttons"] += 1
        elif self._in_table and tag == "tr" and self.tables[-1]["heads"]:
            self.tables[-1]["rows"].append([])
        elif self._in_table and tag == "td":
            self.tables[-1]["rows"][-1].append("")
            self._text = self.tables[-1]["rows"][-1]
        elif tag in ("h2", "h3", "h4"):
            self.headings.append("")
            self._text = self.headings

    def handle_endtag(self, tag):
        if tag in ("td", "h2", "h3", "h4"):
            self._text = None
        if tag == "table":
            self._in_table = False

    def handle_data(self, data):
        if self._text is not None:
            self._text[-1] += data


def _dom(tmp_path: Path, page: Path, fragment: str = "", *flags: str) -> _Dom:
    dom = _Dom()
    dom.feed(_chromium(tmp_path, page.as_uri() + fragment, "--dump-dom", *flags))
    return dom


def _ids(table: dict) -> list[str]:
    return [row[0].removesuffix(" ◆") for row in table["rows"]]


def test_the_rendered_page_has_every_section_and_sorts_from_the_url(report_page, tmp_path):
    document, page = report_page
    dom = _dom(tmp_path, page, "#sort=size")
    for heading in ("pixel-8 — devices/pixel-8", "budget-phones — devices/moto-g", "Size against latency",
                    "Candidates", "Predicted against measured", "Pipelines, step by step", "Error per tensor",
                    "Bits per weight", "Weight distributions", "Quantization, tensor by tensor"):
        assert heading in dom.headings, (heading, dom.headings)
    assert dom.headings.count("Size against latency") == 2 and dom.headings.count("Bits per weight") == 1
    assert len(dom.tables) == 2
    for table, device in zip(dom.tables, document["devices"]):
        by_size = [r["id"] for r in sorted(device["candidates"], key=lambda r: r["size_bytes"])]
        assert _ids(table) == by_size
        size = next(h for h in table["heads"] if h.get("data-key") == "size")
        assert size.get("aria-sort") == "ascending" and size["buttons"] == 1       # a keyboard-reachable button
        assert sum("aria-sort" in h for h in table["heads"]) == 1
        assert all(h["buttons"] == 1 for h in table["heads"])

    descending = _dom(tmp_path, page, "#sort=p90:desc").tables[1]
    measured = [r for r in document["devices"][1]["candidates"] if r["status"] != "failed"]
    assert _ids(descending) == ([r["id"] for r in sorted(measured, key=lambda r: -r["latency_ms"]["p90"])]
                                + ["onnx-int8-per_channel-sym"])                  # the unmeasured one stays last
    assert descending["rows"][-1][6] == "—"


def _png(path: Path) -> tuple[int, int, int]:
    """Width, height, and how many distinct colours (Pillow) or distinct bytes of the decompressed, filtered
    scanlines (zlib alone, when Pillow is absent) the PNG holds: a blank page has a handful of either."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    try:
        from PIL import Image
    except ImportError:
        at, idat = 8, b""
        while at < len(data):
            length, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8]
            idat += data[at + 8:at + 8 + length] if kind == b"IDAT" else b""
            at += 12 + length
        return width, height, len(set(zlib.decompress(idat)))
    with Image.open(path) as image:
        return width, height, len(image.convert("RGB").getcolors(maxcolors=1 << 24))


def test_a_screenshot_of_the_page_is_not_blank(report_page, tmp_path):
    _, page = report_page
    shot = tmp_path / "report.png"
    _chromium(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1280,3000")
    width, height, colours = _png(shot)
    assert (width, height) == (1280, 3000) and shot.stat().st_size > 50_000
    assert colours > 200, colours                            # text, tables and charts in colour, not a blank page
    if os.environ.get("EDGEFORGE_TEST_ARTIFACTS"):
        artifacts = Path(os.environ["EDGEFORGE_TEST_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / "report-browser.png")
