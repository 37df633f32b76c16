"""The report: report.json carries per target the choice, the Pareto front, why every other candidate lost,
the nearest misses and the warnings (unstable runs, emulation); report.html shows them without needing a
network; the CLI table renders them within 120 columns."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from clients.cli.tables import candidate_table
from edgeforge.v1 import common_pb2, coordinator_pb2
from services.coordinator.report import build_report, charts, render_html
from services.coordinator.selection import Budget, Measured, Status, select

MB = 1_000_000
EMULATION = ("timings under emulation (qemu-user) are meaningless; this run proves the agent installs and works "
             "on arm64")
_STATUS = {Status.CHOSEN: coordinator_pb2.CANDIDATE_STATUS_CHOSEN,
           Status.ELIGIBLE: coordinator_pb2.CANDIDATE_STATUS_ELIGIBLE,
           Status.REJECTED: coordinator_pb2.CANDIDATE_STATUS_REJECTED,
           Status.FAILED: coordinator_pb2.CANDIDATE_STATUS_FAILED}
# id: (size MB, perplexity, Δ%)
CANDIDATES = {"gguf-f16": (270.0, 17.10, 0.1), "gguf-q8_0": (145.0, 17.15, 0.4), "gguf-q4_0": (90.0, 18.20, 6.5),
              "onnx-int8-per_channel-sym": (150.0, 17.60, 3.0)}


def _measurement(p90_ms: float, peak_mb: float, *, cv_pct: float = 2.0,
                 unstable: bool = False) -> common_pb2.Measurement:
    return common_pb2.Measurement(
        latency=common_pb2.LatencyStats(p50_ms=p90_ms * 0.9, p90_ms=p90_ms, p99_ms=p90_ms * 1.1, mean_ms=p90_ms * 0.92,
                                        stddev_ms=p90_ms * cv_pct / 100, samples_ms=[p90_ms * 0.9] * 5),
        prompt_tokens_per_s=900.0, generation_tokens_per_s=40.0, load_ms=120.0, first_run_ms=p90_ms * 2,
        peak_rss_bytes=int(peak_mb * MB), threads=4, runtime_versions={"llama.cpp": "b4000"},
        throughput=[common_pb2.ThroughputResult(test="pp512", tokens=512, tokens_per_s=850.0),
                    common_pb2.ThroughputResult(test="tg128", tokens=128, tokens_per_s=41.5),
                    common_pb2.ThroughputResult(test="pp128", tokens=128, tokens_per_s=910.0)],
        cv_pct=cv_pct, attempts=3 if unstable else 1, unstable=unstable, duration_ms=1500.0, warmup_runs=1,
        driver="local", runtime="llama.cpp", cooldown_ms=1000.0, notes=["mmap on"])


def _result(target: str, device: str, attributes: dict, constraints: coordinator_pb2.Constraints,
            measurements: dict[str, common_pb2.Measurement | str]) -> coordinator_pb2.DeviceResult:
    """What benchmarks.assemble produces: measurements, then the selection's verdicts written back."""
    result = coordinator_pb2.DeviceResult(target=target, device=device, attributes=attributes, constraints=constraints)
    budget = Budget(*(getattr(constraints, k) if constraints.HasField(k) else None for k in
                      ("max_size_bytes", "max_p90_latency_ms", "max_quality_loss_pct", "max_peak_memory_bytes")))
    measured = []
    for candidate_id, measurement in measurements.items():
        size_mb, quality, loss = CANDIDATES[candidate_id]
        entry = coordinator_pb2.DeviceCandidate(candidate_id=candidate_id, device=device, attempts=1)
        if isinstance(measurement, str):
            entry.error.message = measurement
        else:
            entry.measurement.CopyFrom(measurement)
        measured.append(Measured(candidate_id, int(size_mb * MB), quality, loss, entry.measurement.latency.p90_ms,
                                 measurement if isinstance(measurement, str) else "",
                                 entry.measurement.peak_rss_bytes))
        result.candidates.append(entry)
    selection = select(measured, budget)
    result.chosen_candidate = selection.chosen or ""
    result.nearest_misses.extend(selection.nearest_misses)
    for entry, verdict in zip(result.candidates, selection.verdicts):
        entry.status, entry.rejected_by, entry.pareto = _STATUS[verdict.status], verdict.reason, verdict.pareto
        entry.dominated_by.extend(verdict.dominated_by)
    return result


@pytest.fixture(scope="module")
def build() -> coordinator_pb2.Build:
    spec = coordinator_pb2.BuildSpec(
        display_name="smollm2-edge", objective=coordinator_pb2.OBJECTIVE_BEST_QUALITY,
        constraints=coordinator_pb2.Constraints(max_size_bytes=200 * MB, max_peak_memory_bytes=600 * MB),
        targets=[coordinator_pb2.Target(name="laptop", selector={"os": "linux"}),
                 coordinator_pb2.Target(name="rpi-emu", selector={"arch": "arm64"},
                                        constraints=coordinator_pb2.Constraints(max_p90_latency_ms=500.0))],
        benchmark=common_pb2.BenchmarkConfig(prompt_tokens=128, generation_tokens=32, warmup_runs=1, timed_runs=5,
                                             min_duration_ms=1000, max_cv_pct=10.0, cv_repeats=2))
    build = coordinator_pb2.Build(name="builds/b-42", spec=spec, state=coordinator_pb2.BUILD_STATE_SUCCEEDED,
                                  baseline=common_pb2.Quality(metric="perplexity", value=17.08, tokens=4096))
    for candidate_id, (size_mb, quality, loss) in CANDIDATES.items():
        build.candidates.add(id=candidate_id, format=common_pb2.EXPORT_FORMAT_GGUF,
                             artifact=f"artifacts/{candidate_id}", size_bytes=int(size_mb * MB),
                             quality=common_pb2.Quality(metric="perplexity", value=quality, baseline=17.08,
                                                        delta_pct=loss))
    laptop = {"cpu": "AMD Ryzen 7", "os": "linux", "arch": "x86_64", "cores": "8"}
    build.devices.append(_result("laptop", "devices/laptop-1", laptop, spec.constraints, {
        "gguf-f16": _measurement(300.0, 700.0),                                # rejected: size and memory
        "gguf-q8_0": _measurement(180.0, 400.0, cv_pct=14.5, unstable=True),   # chosen, but noisy
        "gguf-q4_0": _measurement(120.0, 300.0),                               # on the front, lost on quality
        "onnx-int8-per_channel-sym": _measurement(200.0, 420.0)}))             # dominated by gguf-q8_0
    board = {"cpu": "Cortex-A76", "os": "linux", "arch": "arm64", "cores": "4", "emulated": "qemu-user"}
    applied = coordinator_pb2.Constraints(max_size_bytes=200 * MB, max_peak_memory_bytes=600 * MB,
                                          max_p90_latency_ms=500.0)
    build.devices.append(_result("rpi-emu", "devices/rpi", board, applied, {
        "gguf-f16": _measurement(9000.0, 700.0), "gguf-q8_0": _measurement(5200.0, 400.0),
        "gguf-q4_0": _measurement(4100.0, 300.0), "onnx-int8-per_channel-sym": "onnxruntime: illegal instruction"}))
    return build


@pytest.fixture(scope="module")
def document(build) -> dict:
    return json.loads(json.dumps(build_report(build)))           # what report.json holds, round-tripped


def _rows(device: dict) -> dict[str, dict]:
    return {r["id"]: r for r in device["candidates"]}


def test_a_target_with_a_choice(document):
    laptop = document["devices"][0]
    assert (laptop["target"], laptop["device"], laptop["chosen"]) == ("laptop", "devices/laptop-1", "gguf-q8_0")
    assert laptop["constraints"] == {"max_size_bytes": 200 * MB, "max_peak_memory_bytes": 600 * MB}
    assert laptop["summary"] == "AMD Ryzen 7 · linux/x86_64 · 8 cores" and laptop["emulated"] is None
    assert laptop["pareto"] == ["gguf-f16", "gguf-q8_0", "gguf-q4_0"] and laptop["nearest_misses"] == []
    rows = _rows(laptop)
    assert rows["gguf-f16"]["status"] == "rejected"
    assert rows["gguf-f16"]["rejected_by"] == ("size 270.0 MB > max_size_bytes 200.0 MB; "
                                               "peak memory 700.0 MB > max_peak_memory_bytes 600.0 MB")
    onnx = rows["onnx-int8-per_channel-sym"]
    assert (onnx["status"], onnx["pareto"], onnx["dominated_by"]) == ("eligible", False, ["gguf-q8_0"])
    assert onnx["rejected_by"] == ("dominated by gguf-q8_0 (smaller 145.0 vs 150.0 MB, faster p90 180.0 vs 200.0 ms, "
                                   "better quality 17.150 vs 17.600)")
    assert rows["gguf-q4_0"]["rejected_by"] == "gguf-q8_0 has better quality (17.150 vs 18.200)"


def test_candidate_rows_carry_the_measurement(document):
    row = _rows(document["devices"][0])["gguf-q4_0"]
    # the keys clients/cli/demo.py, main.py and the integration tests read
    assert row["artifact"] == "gguf-q4_0" and row["size_bytes"] == 90 * MB and row["quality"]["value"] == 18.2
    assert row["latency_ms"]["p90"] == 120.0 and row["latency_ms"]["p50"] == pytest.approx(108.0)
    assert set(row["latency_ms"]) == {"p50", "p90", "p99", "mean", "stddev", "samples"}
    assert row["throughput"] == {"pp512": 850.0, "tg128": 41.5, "pp128": 910.0}
    assert row["device"] == "devices/laptop-1" and row["attempts"] == 1
    assert row["peak_rss_bytes"] == 300 * MB and row["load_ms"] == 120.0
    assert (row["runtime"], row["driver"], row["notes"], row["cv_pct"]) == ("llama.cpp", "local", ["mmap on"], 2.0)
    assert row["first_run_ms"] == 240.0 and row["unstable"] is False and row["warnings"] == []
    assert row["pareto"] is True and row["dominated_by"] == [] and row["measurement_attempts"] == 1


def test_an_unstable_measurement_is_flagged(document):
    laptop = document["devices"][0]
    noisy = _rows(laptop)["gguf-q8_0"]
    assert noisy["unstable"] is True and noisy["measurement_attempts"] == 3
    (warning,) = noisy["warnings"]
    assert "14.5%" in warning and "max_cv_pct 10%" in warning and "3 timed phase" in warning
    assert laptop["warnings"] == [f"gguf-q8_0: {warning}"]


def test_a_target_nobody_meets_lists_the_nearest_misses(document):
    board = document["devices"][1]
    assert board["target"] == "rpi-emu" and board["chosen"] is None       # the CLI's "no candidate" exit code
    assert board["constraints"]["max_p90_latency_ms"] == 500.0
    assert board["nearest_misses"] == [
        "gguf-q4_0: p90 latency 4100.0 ms > max_p90_latency_ms 500.0 ms",
        "gguf-q8_0: p90 latency 5200.0 ms > max_p90_latency_ms 500.0 ms",
        "gguf-f16: size 270.0 MB > max_size_bytes 200.0 MB; p90 latency 9000.0 ms > max_p90_latency_ms 500.0 ms; "
        "peak memory 700.0 MB > max_peak_memory_bytes 600.0 MB"]
    failed = _rows(board)["onnx-int8-per_channel-sym"]
    assert failed["status"] == "failed" and failed["rejected_by"] == "failed: onnxruntime: illegal instruction"
    assert failed["error"] == "onnxruntime: illegal instruction" and failed["pareto"] is False


def test_an_emulated_device_says_its_timings_are_meaningless(document):
    board = document["devices"][1]
    assert board["emulated"] == EMULATION and board["warnings"][0] == EMULATION
    assert board["summary"].endswith("emulated (qemu-user)")


def test_build_level_fields(document):
    assert document["constraints"] == {"max_size_bytes": 200 * MB, "max_peak_memory_bytes": 600 * MB}
    assert [t["name"] for t in document["targets"]] == ["laptop", "rpi-emu"]
    assert document["targets"][1]["constraints"] == {"max_p90_latency_ms": 500.0}
    assert document["objective"] == "best_quality" and document["benchmark"]["max_cv_pct"] == 10.0


def test_an_old_result_falls_back_to_the_device_name_and_build_constraints(build):
    old = coordinator_pb2.Build()
    old.CopyFrom(build)
    old.devices[0].ClearField("target")
    old.devices[0].ClearField("constraints")
    device = build_report(old)["devices"][0]
    assert device["target"] == "devices/laptop-1" and device["constraints"] == {"max_size_bytes": 200 * MB,
                                                                               "max_peak_memory_bytes": 600 * MB}


class _Outline(HTMLParser):
    """Sections, headings, table headers, table classes, scripts, and anything that would load from elsewhere."""

    def __init__(self):
        super().__init__()
        self.sections, self.headings, self.table_classes, self.th, self.external = 0, [], [], [], []
        self.scripts, self.links = 0, []
        self._text_of: list | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections += 1
        if tag == "table":
            self.table_classes.append(attrs.get("class"))
        if tag in ("h2", "h3", "h4", "th"):
            self._text_of = self.headings if tag != "th" else self.th
            self._text_of.append("")
        if tag == "script":
            self.scripts += 1
        if tag == "a":
            self.links.append(attrs.get("href"))
        for key in ("src", "srcset", "data", "action", "xlink:href"):
            if key in attrs:
                self.external.append((tag, key, attrs[key]))
        if tag in ("link", "img", "iframe", "object", "embed", "base"):
            self.external.append((tag, "", ""))

    def handle_endtag(self, tag):
        if tag in ("h2", "h3", "h4", "th"):
            self._text_of = None

    def handle_data(self, data):
        if self._text_of is not None:
            self._text_of[-1] += data


def _outline(page: str) -> _Outline:
    outline = _Outline()
    outline.feed(page)
    return outline


def _self_contained(page: str) -> None:
    """Nothing is fetched: no src/href off the page, no url(), no @import; links only to anchors in it."""
    outline = _outline(page)
    assert outline.external == [] and outline.scripts == 1
    assert all(href.startswith("#") for href in outline.links), outline.links
    assert "http://" not in page and "https://" not in page and "url(" not in page and "@import" not in page


def test_html_has_a_section_per_target_with_choice_plot_candidates_and_warnings(document):
    page = render_html(document)
    outline = _outline(page)
    assert outline.sections == 2
    assert [h for h in outline.headings if " — " in h] == ["laptop — devices/laptop-1", "rpi-emu — devices/rpi"]
    assert outline.headings.count("Size against latency") == 2 and outline.headings.count("Candidates") == 2
    assert outline.table_classes == ["glance"] + ["candidates sortable"] * 2    # no predictions in this build
    assert {"pp128 tok/s", "pp512 tok/s", "tg128 tok/s", "peak memory", "why not chosen"} <= set(outline.th)
    assert outline.th.index("pp128 tok/s") < outline.th.index("pp512 tok/s") < outline.th.index("tg128 tok/s")
    _self_contained(page)
    assert EMULATION in page and "unstable" in page and "14.5 ⚠ unstable" in page
    assert "No candidate met the constraints" in page and "Nearest misses" in page
    assert "gguf-q4_0: p90 latency 4100.0 ms &gt; max_p90_latency_ms 500.0 ms" in page
    assert "dominated by gguf-q8_0" in page and "max_peak_memory_bytes = 600.0 MB" in page
    assert "of the 3 candidates that meet every constraint (max_size_bytes = 200.0 MB" in page
    assert "<a href='#target-1'>rpi-emu — devices/rpi</a></td><td class='text' colspan='5'>none met" in page


def test_candidate_table_fits_120_columns_and_marks_front_and_noise(document):
    table = candidate_table(document)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert "peak MB" in lines[1]
    noisy = next(line for line in lines if "gguf-q8_0" in line and "chosen" in line)
    assert noisy.startswith("  * gguf-q8_0") and "180.0~" in noisy
    assert any(line.startswith("  * gguf-q4_0") for line in lines)
    assert any(line.strip().startswith("onnx-int8-per_channel-sym") and not line.startswith("  *") for line in lines)
    assert "  chosen: none — no candidate met the constraints" in lines
    assert "    nearest miss: gguf-q4_0: p90 latency 4100.0 ms > max_p90_latency_ms 500.0 ms" in lines
    assert any("warning: timings under emulation (qemu-user) are meaningless" in line for line in lines)
    assert "why: dominated by gguf-q8_0" in table and "target rpi-emu on devices/rpi" in table


def test_candidate_table_gives_a_long_id_its_own_line(document):
    long_id = "gguf-q4_k_m-awq-then-gptq-mixed-precision"
    report = json.loads(json.dumps(document))
    report["devices"][0]["candidates"][0]["id"] = long_id
    lines = candidate_table(report).splitlines()
    assert max(len(line) for line in lines) <= 120
    at = lines.index(f"  * {long_id}")
    assert "270.0" in lines[at + 1] and "rejected" in lines[at + 1]


def test_a_pool_that_measured_nothing_still_renders(build):
    empty = coordinator_pb2.Build()
    empty.CopyFrom(build)
    del empty.devices[1:]
    result = empty.devices[0]
    result.ClearField("device")
    result.attributes.clear()
    for entry in result.candidates:
        entry.ClearField("measurement")
        entry.error.message = "no measurement before the benchmark timeout"
    document = build_report(empty)
    assert document["devices"][0]["summary"] == "? · ?/? · ? cores"
    assert "<h2>laptop</h2>" in render_html(document)
    assert candidate_table(document).splitlines()[0].startswith("target laptop  (")


# ---------------------------------------------------------------- the page's views, one by one

def _histogram(tensor: str, threshold: float = 0.0, kind: str = "none", pruned: float = 0.0,
               weights: int = 4800) -> common_pb2.WeightHistogram:
    """48 bins over [-0.12, 0.12], peaked at 0 like a trained layer's weights."""
    shape = [50 - abs(i - 23.5) * 2 for i in range(48)]
    counts = [round(weights * s / sum(shape)) for s in shape]
    return common_pb2.WeightHistogram(tensor=tensor, low=-0.12, high=0.12, counts=counts, threshold=threshold,
                                      threshold_kind=kind, pruned_fraction=pruned)


def test_histograms_go_into_report_json(build):
    with_layers = coordinator_pb2.Build()
    with_layers.CopyFrom(build)
    quantized = with_layers.candidates[2]                     # gguf-q4_0
    plain = quantized.tensors.add(name="model.layers.0.mlp.up_proj.weight", grid="q4_0", bits_per_weight=4.5,
                                  snr_db=18.0, output_error=0.004)
    plain.histogram.CopyFrom(_histogram(plain.name, 0.1, "clip"))
    quantized.tensors.add(name="lm_head.weight", grid="q8_0", bits_per_weight=8.5, snr_db=40.0)
    pruned = with_layers.candidates[3]
    step = pruned.steps.add(index=1, kind="prune", description="magnitude 50%", sparsity=0.5)
    step.histograms.append(_histogram("model.layers.0.mlp.up_proj.weight", 0.03, "magnitude", 0.5))
    document = json.loads(json.dumps(build_report(with_layers)))
    (tensors,) = [q["tensors"] for q in document["quantization"] if q["id"] == "gguf-q4_0"]
    assert tensors[0]["histogram"] == {"low": -0.12, "high": 0.12, "counts": list(plain.histogram.counts),
                                       "threshold": 0.1, "threshold_kind": "clip"}
    assert tensors[1]["histogram"] is None                    # unset in the proto: an older compressor
    (pipeline,) = document["pipelines"]
    (histogram,) = pipeline["steps"][0]["histograms"]
    assert histogram["tensor"] == "model.layers.0.mlp.up_proj.weight" and histogram["pruned_fraction"] == 0.5
    assert (histogram["threshold"], histogram["threshold_kind"]) == (0.03, "magnitude")
    assert sum(histogram["counts"]) == sum(step.histograms[0].counts)


def _charts(page: str) -> list[ET.Element]:
    """Every inline SVG chart on the page, parsed (the renderer writes them as well-formed XML)."""
    return [ET.fromstring(svg) for svg in re.findall(r'<svg class="chart".*?</svg>', page, re.S)]


def _titles(svg: ET.Element, tag: str) -> dict[str, ET.Element]:
    return {mark.find("title").text: mark for mark in svg.iter(tag) if mark.find("title") is not None}


def test_pareto_plot_colours_by_quality_and_marks_choice_limits_and_front(document):
    laptop = _charts(render_html(document))[0]
    assert laptop.get("aria-label") == "p90 latency (ms) against size (MB), coloured by perplexity loss %"
    (chosen,) = [m for m in laptop.iter("path") if m.get("class") == "chosen-mark" and m.find("title") is not None]
    assert chosen.find("title").text.startswith("gguf-q8_0 (chosen): 145.0 MB, p90 180.0 ms, perplexity 17.150")
    circles = {title.split(" ")[0]: mark for title, mark in _titles(laptop, "circle").items()}
    assert set(circles) == {"gguf-f16", "gguf-q4_0", "onnx-int8-per_channel-sym"}
    assert circles["gguf-f16"].get("class") == "rejected" and circles["gguf-q4_0"].get("class") == "front-point"
    # viridis over the losses on this target: the least (gguf-f16, +0.1%) darkest, the most (q4_0, +6.5%) yellow
    fills = circles["gguf-f16"].get("fill"), circles["gguf-q4_0"].get("fill")
    assert fills == (charts.VIRIDIS[0], charts.VIRIDIS[-1])
    labels = [t.text for t in laptop.iter("text")]
    assert "gguf-q8_0 — chosen" in labels and "perplexity loss %" in labels and "+6.50" in labels
    limits = [m.find("title").text for m in laptop.iter("line") if m.get("class") == "limit" and len(m)]
    assert limits == ["limit: 200"]                                      # max_size_bytes; the legend's key aside
    assert not any("(log)" in label for label in labels)                                  # 90..270 MB, 120..300 ms


def test_front_is_a_step_line_and_axes_go_logarithmic_past_ten_times():
    points = [charts.Point(name, x, y, loss, name) for name, x, y, loss in
              [("a", 10, 900, 0.1), ("b", 40, 300, 1.0), ("c", 60, 500, 2.0), ("d", 400, 40, 9.0), ("e", 400, 30, 8.0)]]
    assert [p.label for p in charts.size_latency_front(points)] == ["a", "b", "e"]
    svg = ET.fromstring(charts.pareto_scatter(points, x_label="size (MB)", y_label="p90 latency (ms)",
                                              colour_label="loss", y_limit=5000.0))
    (front,) = [p for p in svg.iter("path") if p.get("class") == "front" and len(p)]
    assert re.fullmatch(r"M[\d.]+,[\d.]+H[\d.]+V[\d.]+H[\d.]+V[\d.]+", front.get("d"))
    labels = [t.text for t in svg.iter("text")]
    assert "size (MB) (log)" in labels and "p90 latency (ms) (log)" in labels
    assert "limits off the chart: max 5,000 far above" in labels                       # 5000 > 2 × 900: not drawn
    axis = charts.Axis.fit([1.5, 50.0], 0, 100)
    assert axis.log and (axis.low, axis.high) == (1, 100) and axis.ticks() == [1, 2, 5, 10, 20, 50, 100]
    assert axis(10) == pytest.approx(50.0)
    linear = charts.Axis.fit([3.0, 20.0], 0, 100)
    assert not linear.log and linear.low == 0 and linear.ticks() == [0, 5, 10, 15, 20]
    assert charts.viridis(0) == "#440154" and charts.viridis(1) == "#fde725" and charts.viridis(0.5) == "#22908c"


def test_the_choice_says_why_and_what_the_runner_up_trades(document):
    page = render_html(document)
    assert ("Why: of the 3 candidates that meet every constraint (max_size_bytes = 200.0 MB, max_peak_memory_bytes "
            "= 600.0 MB), it has the best quality (objective best_quality); 1 breaks a constraint (gguf-f16: size "
            "270.0 MB &gt; max_size_bytes 200.0 MB; peak memory 700.0 MB &gt; max_peak_memory_bytes 600.0 MB).</p>"
            in page)
    # the runner-up is the next candidate on the front (onnx is dominated, so it trades nothing)
    assert ("Runner-up <b>gguf-q4_0</b> (also on the front): 38% smaller, 33% faster at p90, 6.10 points more "
            "quality loss (+6.50% vs +0.40%).") in page
    alone = json.loads(json.dumps(document))
    for row in alone["devices"][0]["candidates"]:
        if row["status"] == "eligible":
            row["status"], row["rejected_by"] = "rejected", "p90 latency over the limit"
    page = render_html(alone)
    assert "Why: it is the only candidate that meets every constraint (max_size_bytes = 200.0 MB" in page
    assert "Runner-up" not in page


def test_candidate_table_is_sortable_by_raw_numbers(document):
    page = render_html(document)
    assert "<th data-key='size' data-type=\"number\">size</th>" in page
    assert "<th data-key='why' class='why'>why not chosen</th>" in page                 # text: no data-type
    assert "<td data-sort='145000000'>145.0 MB</td>" in page                             # not "145.0 MB" as text
    failed = page[page.index("<tr class='failed'>"):]
    failed = failed[:failed.index("</tr>")]
    assert failed.count("<td data-sort=''>—</td>") >= 5                                 # unmeasured sorts last
    script = page[page.index("<script>"):]
    assert "aria-sort" in script and 'createElement("button")' in script and "sort=" in script
    # without JavaScript the markup is the page: rows in build order, plain headers, every number shown
    markup = page[page.index("</style>"):page.index("<script>")]
    assert "<button" not in markup and "aria-sort" not in markup
    laptop = markup[markup.index("<table class='candidates sortable'>"):]
    assert re.findall(r"<tr class='\w+'><td>([\w-]+)", laptop[:laptop.index("</table>")]) == list(CANDIDATES)


def test_hostile_names_are_escaped_everywhere(document):
    hostile = json.loads(json.dumps(document))
    attack = "<script>alert(1)</script>"
    hostile["devices"][0]["candidates"][1]["id"] = attack
    hostile["devices"][0]["chosen"] = attack
    hostile["devices"][1]["target"] = "<img src=x onerror=alert(2)>"
    hostile["quantization"] = [{"id": attack, "recipe": {}, "bits_per_weight": 4.5, "compress_seconds": 1.0,
                                "tensors": [{"name": f"{attack}'\"", "grid": "<b>q4_0", "bits_per_weight": 4.5,
                                             "snr_db": 20.0, "output_error": 0.0, "histogram": None}]}]
    page = render_html(hostile)
    outline = _outline(page)
    assert outline.scripts == 1 and outline.external == [] and "<img" not in page and "<b>q4_0" not in page
    assert attack not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Chosen: <b>&lt;script&gt;alert(1)&lt;/script&gt;</b>" in page
    assert len(_charts(page)) == 3                             # both plots and the error chart parse: nothing broke out


def _tensors(layers: int, grid_of, error_of, snr_of=lambda i: 20.0) -> list[dict]:
    names = [f"model.layers.{layer}.{kind}.weight" for layer in range(layers)
             for kind in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]
    return [{"name": name, "grid": grid_of(name), "bits_per_weight": 8.5 if grid_of(name) == "q8_0" else 4.5,
             "snr_db": snr_of(i), "output_error": error_of(i), "histogram": None} for i, name in enumerate(names)]


def test_quantization_error_per_layer_and_the_bit_allocation(document):
    mixed = _tensors(12, lambda n: "q8_0" if "down_proj" in n else "q4_0", lambda i: (1 + i % 7) / 1024)
    weights_only = _tensors(12, lambda n: "int8/per_channel/sym", lambda i: 0.0, lambda i: 30.0 + i / 10)
    report = dict(document, quantization=[
        {"id": "gguf-q4_0-mixed", "recipe": {}, "bits_per_weight": 5.5, "compress_seconds": 2.0, "tensors": mixed},
        {"id": "onnx-int8", "recipe": {}, "bits_per_weight": 8.0, "compress_seconds": 1.0, "tensors": weights_only}])
    page = render_html(report)
    errors_mixed, bits, errors_int8 = _charts(page)[2:]
    assert errors_mixed.get("aria-label") == "relative output error per tensor of gguf-q4_0-mixed"
    bars = [r for r in errors_mixed.iter("rect")]
    assert len(bars) == 48 and sum(r.get("fill") == charts.HIGHLIGHT_COLOUR for r in bars) == 5
    worst = [r.find("title").text for r in bars if r.get("fill") == charts.HIGHLIGHT_COLOUR]
    assert all(title.endswith(": 0.00684 (output error)") for title in worst)             # i % 7 == 6: 7/1024
    assert ("Most sensitive: <b>model.layers.1.mlp.up_proj.weight</b> 0.00684, <b>model.layers.3.self_attn.v_proj"
            ".weight</b> 0.00684") in page                                               # ties in model order
    assert [t.text for t in errors_mixed.iter("text")][-12:] == [str(layer) for layer in range(12)]
    # no calibration: the weights' noise-to-signal ratio 10^(−SNR/10) instead, on a linear axis (< 10× span)
    first = next(errors_int8.iter("rect")).find("title").text
    assert first == "model.layers.0.self_attn.q_proj.weight: 0.001 (weight error)"
    assert errors_int8.get("aria-label") == "relative weight error per tensor of onnx-int8"
    # only the candidate with two grids gets a bit allocation
    assert bits.get("aria-label") == "bits per weight per tensor of gguf-q4_0-mixed"
    fills = {r.get("fill") for r in bits.iter("rect")}
    assert fills == set(charts.OKABE_ITO[:2]) and "average 5.500" in [t.text for t in bits.iter("text")]
    assert page.count("<h4>Bits per weight</h4>") == 1 and "q4_0 ×36" in page and "q8_0 ×12" in page
    assert "<summary>every tensor of onnx-int8</summary><table>" in page                # the full table, folded


def _histogram_dict(tensor: str, pruned: float, threshold: float, kind: str = "magnitude") -> dict:
    message = _histogram(tensor, threshold, kind, pruned)
    return {"tensor": tensor, "low": message.low, "high": message.high, "counts": list(message.counts),
            "threshold": threshold, "threshold_kind": kind, "pruned_fraction": pruned}


def test_weight_histograms_show_the_cut_for_the_most_pruned_tensors(document):
    histograms = [_histogram_dict(f"model.layers.{i}.mlp.up_proj.weight", 0.3 + 0.05 * i, 0.01 + 0.002 * i)
                  for i in range(9)]
    step = {"index": 1, "kind": "prune", "description": "magnitude 50% global", "parameters": 1000, "nonzero": 500,
            "sparsity": 0.5, "dense_bytes": 4000, "stored_bytes": 3000, "storage": "csr", "quality": None,
            "seconds": 1.0, "note": "", "histograms": histograms}
    float_histogram = {k: v for k, v in _histogram_dict("lm_head.weight", 0, 0, "none").items()
                       if k not in ("tensor", "pruned_fraction")}
    clipped = dict(float_histogram, threshold=0.1, threshold_kind="clip")
    quantized = [{"id": name, "recipe": {}, "bits_per_weight": 4.5, "compress_seconds": 1.0,
                  "tensors": [{"name": "lm_head.weight", "grid": "q4_0", "bits_per_weight": 4.5, "snr_db": 20.0,
                               "output_error": 0.0, "histogram": histogram}]}
                 for name, histogram in (("rtn-a", float_histogram), ("rtn-b", float_histogram), ("mse", clipped))]
    page = render_html(dict(document, pipelines=[{"id": "pruned", "transformed_model": "", "steps": [step]}],
                            quantization=quantized))
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert len(captions) == 6 + 1 + 1                        # 6 of 9 pruned tensors; plain floats once; the clip
    assert captions[0] == "<b>model.layers.8.mlp.up_proj.weight</b> · 4,800 weights · pruned 70.0% at |w| &lt; 0.026"
    assert "the 6 most pruned of 9 tensors" in page
    assert captions[-1].endswith("clipped at ±0.1") and "mse: float weights and the clipping range" in page
    assert page.count("Float weights before quantization") == 1
    first = _charts(page)[2]
    cuts = [float(line.get("x1")) for line in first.iter("line") if line.get("class") == "limit"]
    (band,) = [r for r in first.iter("rect") if r.get("class") == "cut"]
    middle = (40 + 292) / 2                                  # x of w = 0 on [-0.12, 0.12]
    assert len(cuts) == 2 and cuts[0] + cuts[1] == pytest.approx(2 * middle, abs=0.2)
    assert float(band.get("x")) == pytest.approx(cuts[0], abs=0.1)
    heights = [float(r.get("height")) for r in first.iter("rect") if r.get("class") is None]
    assert len(heights) == 48 and max(heights) == pytest.approx(100.0)     # log counts, the peak bin full height


def test_predicted_beside_measured_only_where_the_planner_predicted(document):
    report = json.loads(json.dumps(document))
    rows = _rows(report["devices"][0])
    rows["gguf-q8_0"]["predicted"] = {"memory_bytes": 380 * MB, "generation_tokens_per_s": 50.0,
                                      "prompt_tokens_per_s": 1200.0, "bound": "memory", "basis": "AMD Ryzen 7 profile"}
    rows["gguf-q4_0"]["predicted"] = {"memory_bytes": 100 * MB, "generation_tokens_per_s": 41.0,
                                      "prompt_tokens_per_s": 1300.0, "bound": "compute", "basis": "roofline"}
    page = render_html(report)
    assert _outline(page).table_classes.count("predicted") == 1                           # rpi-emu has none
    table = page[page.index("<table class='predicted'>"):]
    table = table[:table.index("</table>")]
    assert ("<tr><td>gguf-q8_0</td><td>380.0 MB</td><td>400.0 MB</td><td>1.05×</td><td>50.0</td><td>40.0</td>"
            "<td>0.80×</td><td class='text'>memory</td><td class='why'>AMD Ryzen 7 profile</td></tr>") in table
    assert "<td class='off'>3.00×</td>" in table and "<td>0.98×</td>" in table             # 300 MB vs 100 MB
    assert "Predicted against measured" in page


def test_an_older_report_without_the_new_fields_renders(document):
    old = json.loads(json.dumps(document))
    old["quantization"] = [{"id": "gguf-q4_0", "recipe": {}, "bits_per_weight": 4.5, "compress_seconds": 1.0,
                            "tensors": [{"name": "w", "grid": "q4_0", "bits_per_weight": 4.5, "snr_db": 20.0,
                                         "output_error": 0.0}]}]
    old["pipelines"] = [{"id": "p", "transformed_model": "", "steps": [
        {"index": 0, "kind": "source", "description": "", "parameters": 10, "nonzero": 10, "sparsity": 0.0,
         "dense_bytes": 40, "stored_bytes": 40, "storage": "dense", "quality": None, "seconds": 0.0, "note": ""}]}]
    page = render_html(old)
    assert "Quantization, tensor by tensor" in page and "Pipelines, step by step" in page and "<figure>" not in page


def test_page_stays_small_for_a_model_with_hundreds_of_tensors(document):
    histogram = {k: v for k, v in _histogram_dict("w", 0, 0, "none").items() if k not in ("tensor", "pruned_fraction")}
    tensors = _tensors(150, lambda n: "q8_0" if "down" in n else "q4_0", lambda i: 1e-3 * (1 + i % 13))   # 600
    for t in tensors:
        t["histogram"] = dict(histogram, threshold=0.1, threshold_kind="clip")
    report = json.loads(json.dumps(document))
    report["quantization"] = [{"id": f"c{i}", "recipe": {}, "bits_per_weight": 5.5, "compress_seconds": 1.0,
                               "tensors": tensors} for i in range(4)]
    step = {"index": 1, "kind": "prune", "description": "magnitude", "parameters": 1, "nonzero": 1, "sparsity": 0.5,
            "dense_bytes": 1, "stored_bytes": 1, "storage": "dense", "quality": None, "seconds": 1.0, "note": "",
            "histograms": [_histogram_dict(t["name"], 0.5, 0.02) for t in tensors]}
    report["pipelines"] = [{"id": "p", "transformed_model": "", "steps": [step]}]
    page = render_html(report)
    assert len(page.encode()) < 2_000_000, len(page.encode())
    assert page.count("<figure>") == 6 * 5                  # 6 per pruning step and per clipping candidate
    _self_contained(page)
