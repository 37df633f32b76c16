"""The report: report.json carries per target the choice, the Pareto front, why every other candidate lost,
the nearest misses and the warnings (unstable runs, emulation); report.html shows them without needing a
network; the CLI table renders them within 120 columns."""
from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from clients.cli.tables import candidate_table
from edgeforge.v1 import common_pb2, coordinator_pb2
from services.coordinator.report import build_report, render_html
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
    """Sections, headings, table headers, table classes, and anything that would load from elsewhere."""

    def __init__(self):
        super().__init__()
        self.sections, self.headings, self.table_classes, self.th, self.external = 0, [], [], [], []
        self._text_of: list | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections += 1
        if tag == "table":
            self.table_classes.append(attrs.get("class"))
        if tag in ("h2", "h3", "th"):
            self._text_of = self.headings if tag != "th" else self.th
            self._text_of.append("")
        for key in ("src", "href"):
            if key in attrs:
                self.external.append((tag, key, attrs[key]))
        if tag in ("script", "link", "img", "iframe"):
            self.external.append((tag, "", ""))

    def handle_endtag(self, tag):
        if tag in ("h2", "h3", "th"):
            self._text_of = None

    def handle_data(self, data):
        if self._text_of is not None:
            self._text_of[-1] += data


def test_html_has_a_section_per_target_with_front_candidates_and_warnings(document):
    page = render_html(document)
    outline = _Outline()
    outline.feed(page)
    assert outline.sections == 2
    assert [h for h in outline.headings if " — " in h] == ["laptop — devices/laptop-1", "rpi-emu — devices/rpi"]
    assert outline.headings.count("Pareto front") == 2 and outline.headings.count("Candidates") == 2
    assert outline.table_classes == ["pareto", "candidates"] * 2
    assert {"pp128 tok/s", "pp512 tok/s", "tg128 tok/s", "peak memory", "why not chosen"} <= set(outline.th)
    assert outline.th.index("pp128 tok/s") < outline.th.index("pp512 tok/s") < outline.th.index("tg128 tok/s")
    assert outline.external == [] and "http://" not in page and "https://" not in page and "url(" not in page
    assert EMULATION in page and "unstable" in page and "14.5 ⚠ unstable" in page
    assert "No candidate met the constraints" in page and "Nearest misses" in page
    assert "gguf-q4_0: p90 latency 4100.0 ms &gt; max_p90_latency_ms 500.0 ms" in page
    assert "dominated by gguf-q8_0" in page and "max_peak_memory_bytes = 600.0 MB" in page
    assert "Best quality among candidates that meet every constraint" in page


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
