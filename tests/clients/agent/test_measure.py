"""The agent's measurement protocol on real files in real runtimes (no mocks).

The tiny llama (random weights) exported by the repo's own exporters as GGUF, ONNX (one file and an
external-data directory) and TFLite (a 64-token signature), and a small CNN exported as ONNX and TFLite,
are measured by clients.agent.measure — through the child-process command line the agent uses, and
in-process — and every result must parse into common_pb2.Measurement. Checked: min run count and min
duration both honoured, the CV repeat logic, llama-bench's pp/tg throughput tests (skipped with a note
where a file cannot hold them), the TFLite no-KV-cache note, the single-inference workload, workload /
file mismatches, Core ML's RuntimeUnavailable off macOS, and the package running standalone as
edgeforge_agent. Small token counts keep the file under a minute on 2 cores.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import json_format
from torch import nn

from clients.agent import drivers
from clients.agent.drivers import (ContextExceeded, CoreMlDriver, ModelMismatch, RuntimeUnavailable, concrete_shape,
                                   runtime_status, synthetic_inputs)
from clients.agent.measure import Config, ConfigError, measure
from edgeforge.v1 import common_pb2

ROOT = Path(__file__).resolve().parents[3]
SHA = "0" * 64
TFLITE_TOKENS = 64
# small LM workload: fast, yet every phase of the protocol runs
LM = {"prompt_tokens": 16, "generation_tokens": 4, "timed_runs": 3, "min_duration_ms": 1,
      "throughput_prompt_tokens": [16, 32], "throughput_generation_tokens": 8, "throughput_runs": 2, "threads": 1}
GENERIC = {"task": "image_classification", "timed_runs": 5, "min_duration_ms": 1, "threads": 1}


class SmallCnn(nn.Module):
    """A MobileNet-like classifier: strided conv, depthwise + pointwise convs, pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6(), nn.Conv2d(16, 16, 3, 1, 1, groups=16),
                                      nn.Conv2d(16, 32, 1), nn.ReLU6())
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):                                                   # (B, 3, 32, 32) -> (B, 10)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("agent-files")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from services.exporter.base import ExportInput
    from shared.models.bundle import ModelDir
    return ExportInput(ModelDir(tiny_model_dir), SHA)


@pytest.fixture(scope="module")
def gguf_file(tiny, out) -> Path:
    from services.exporter.formats.gguf import GgufExporter
    return GgufExporter().export(tiny, out / "tiny.gguf").path


@pytest.fixture(scope="module")
def onnx_file(tiny, out) -> Path:
    from services.exporter.formats.onnx import OnnxExporter
    return OnnxExporter().export(tiny, out / "tiny.onnx").path


@pytest.fixture(scope="module")
def onnx_directory(tiny, out) -> Path:
    """model.onnx + model.onnx.data in a directory, as the agent unpacks a directory export's tar."""
    import dataclasses

    from services.exporter.base import ExportOptions
    from services.exporter.formats.onnx import OnnxExporter
    split = dataclasses.replace(tiny, options=ExportOptions(external_data=True))
    return OnnxExporter().export(split, out / "tiny-split.onnx").path


@pytest.fixture(scope="module")
def tflite_file(tiny, out) -> Path:
    """The tiny llama with a 64-token signature (litert-torch conversion: the slowest fixture, ~20 s)."""
    from services.exporter.formats.tflite import TfliteExporter
    return TfliteExporter(sequence_tokens=TFLITE_TOKENS).export(tiny, out / "tiny.tflite").path


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return SmallCnn().eval(), torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def cnn_onnx(cnn, out) -> Path:
    from services.exporter.base import ExportOptions
    from services.exporter.formats.onnx_module import export_module
    module, image = cnn
    return export_module(module, (image,), ["pixel_values"], ["logits"], {"pixel_values": {0: "batch"}},
                         ExportOptions(), out / "cnn.onnx").path


@pytest.fixture(scope="module")
def cnn_tflite(cnn, out) -> Path:
    from services.exporter.base import ExportOptions
    from services.exporter.formats.tflite import export_module
    module, image = cnn
    return export_module(module, (image,), ExportOptions(), out / "cnn.tflite").path


def parsed(result: dict) -> common_pb2.Measurement:
    """The parent's own reading of the child's line: every key must be a Measurement field."""
    return json_format.ParseDict(json.loads(json.dumps(result)), common_pb2.Measurement())


def run_child(module: str, export_format: str, path: Path, config: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-m", module, export_format, str(path), json.dumps(config)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------------- causal LMs

def test_gguf_through_the_child_process_command_line(gguf_file):
    child = run_child("clients.agent.measure", "gguf", gguf_file, {**LM, "task": "causal_lm"}, ROOT)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    measurement = parsed(result)
    assert measurement.runtime == "llama.cpp" and measurement.driver == "local" and measurement.threads == 1
    assert "llama.cpp" in measurement.runtime_versions
    assert len(measurement.latency.samples_ms) == len(measurement.prompt_samples_ms) >= 3
    assert measurement.latency.p50_ms <= measurement.latency.p90_ms <= measurement.latency.p99_ms
    assert measurement.load_ms > 0 and measurement.first_run_ms > 0 and measurement.warmup_runs == 1
    assert measurement.prompt_tokens_per_s > 0 and measurement.generation_tokens_per_s > 0
    assert measurement.peak_rss_bytes > 10 << 20                       # the 12 MB model is mapped
    tests = {t.test: t for t in measurement.throughput}
    assert sorted(tests) == ["pp16", "pp32", "tg8"]
    for test in tests.values():
        assert len(test.samples_ms) == 2 and test.tokens_per_s > 0
        rates = [test.tokens / (ms / 1e3) for ms in test.samples_ms]               # tokens/s of each run
        assert test.tokens_per_s == pytest.approx(np.mean(rates))
        assert test.stddev_tokens_per_s == pytest.approx(np.std(rates, ddof=1))
    # a 2-layer, 64-wide model processes prompts in batches far faster than it generates one by one
    assert tests["pp32"].tokens_per_s > tests["tg8"].tokens_per_s


def test_min_count_and_min_duration_are_both_honoured(onnx_file):
    quiet = {**LM, "skip_throughput": True, "max_cv_pct": 1000}             # one timed phase
    by_count = measure("onnx", onnx_file, {**quiet, "timed_runs": 7, "min_duration_ms": 1})
    assert len(by_count["latency"]["samples_ms"]) == 7 and by_count["attempts"] == 1
    by_time = measure("onnx", onnx_file, {**quiet, "timed_runs": 2, "min_duration_ms": 400})
    samples = by_time["latency"]["samples_ms"]
    assert by_time["duration_ms"] >= 400 and len(samples) > 2 and sum(samples) <= by_time["duration_ms"]
    assert not parsed(by_time).throughput


def test_a_noisy_phase_is_repeated_and_flagged_unstable(onnx_file):
    noisy = measure("onnx", onnx_file, {**LM, "max_cv_pct": 1e-6, "cv_repeats": 2, "skip_throughput": True})
    assert noisy["attempts"] == 3 and noisy["unstable"] and noisy["cv_pct"] > 1e-6
    assert any(note.startswith("unstable") for note in noisy["notes"])
    assert len(noisy["latency"]["samples_ms"]) == 3                    # the last phase only, fresh samples
    calm = measure("onnx", onnx_file, {**LM, "max_cv_pct": 1000, "skip_throughput": True})
    assert calm["attempts"] == 1 and not calm["unstable"]
    assert abs(calm["cv_pct"] - 100 * np.std(calm["latency"]["samples_ms"], ddof=1)
               / np.mean(calm["latency"]["samples_ms"])) < 1e-9
    assert parsed(noisy).unstable and not parsed(calm).unstable


def test_onnx_external_data_directory_measures_like_the_file(onnx_directory):
    result = parsed(measure("onnx", onnx_directory, LM))
    assert onnx_directory.is_dir() and result.runtime == "onnxruntime"
    assert sorted(t.test for t in result.throughput) == ["pp16", "pp32", "tg8"]
    assert all(t.tokens_per_s > 0 for t in result.throughput)


def test_tflite_reruns_the_prefill_and_skips_what_its_signature_cannot_hold(tflite_file):
    config = {**LM, "throughput_prompt_tokens": [16, 128]}            # 128 > the file's 64-token signature
    result = parsed(measure("tflite", tflite_file, config))
    assert result.runtime == "litert" and "litert" in result.runtime_versions
    assert any("no KV cache in this file: each generated token re-runs the 64-token prefill" in n for n in result.notes)
    assert any(n.startswith("pp128 skipped") and "64 tokens" in n for n in result.notes)
    assert sorted(t.test for t in result.throughput) == ["pp16", "tg8"]
    # every step is a whole 64-token prefill: a prompt is one, 4 generated tokens are four
    assert np.median(result.generation_samples_ms) > 2 * np.median(result.prompt_samples_ms)
    with pytest.raises(ContextExceeded, match="64 tokens"):
        measure("tflite", tflite_file, {**LM, "prompt_tokens": 60, "generation_tokens": 8})


# ----------------------------------------------------------------------------------- one inference

@pytest.mark.parametrize("export_format, fixture", [("onnx", "cnn_onnx"), ("tflite", "cnn_tflite")])
def test_a_classifier_runs_one_inference_per_run(request, export_format, fixture):
    result = parsed(measure(export_format, request.getfixturevalue(fixture), GENERIC))
    assert len(result.latency.samples_ms) >= 5 and result.latency.mean_ms > 0
    assert not result.throughput and not result.prompt_samples_ms and result.prompt_tokens_per_s == 0
    assert any(n.startswith("single inference") and "(1, 3, 32, 32)" in n for n in result.notes)


def test_a_workload_on_the_wrong_kind_of_file_fails_clearly(cnn_onnx, tflite_file, gguf_file):
    with pytest.raises(ModelMismatch, match="task causal_lm needs a language-model signature.*pixel_values"):
        measure("onnx", cnn_onnx, {**LM, "task": "causal_lm"})
    with pytest.raises(ModelMismatch, match="causal LM.*measure it with task causal_lm"):
        measure("tflite", tflite_file, GENERIC)
    with pytest.raises(ModelMismatch):
        measure("gguf", gguf_file, GENERIC)


def test_the_package_runs_standalone_as_edgeforge_agent(cnn_onnx, tmp_path):
    """Installed on a device the package is edgeforge_agent, with no clients.*, shared.* or services.*."""
    package = tmp_path / "edgeforge_agent"
    package.mkdir()
    for name in ("__init__.py", "drivers.py", "measure.py"):
        shutil.copy(ROOT / "clients" / "agent" / name, package / name)
    child = run_child("edgeforge_agent.measure", "onnx", cnn_onnx, GENERIC, tmp_path)
    assert child.returncode == 0, child.stderr[-2000:]
    assert parsed(json.loads(child.stdout.splitlines()[-1])).runtime == "onnxruntime"
    refused = run_child("edgeforge_agent.measure", "onnx", cnn_onnx, {"task": "causal_lm"}, tmp_path)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith("measure: ModelMismatch")


# ----------------------------------------------------------------------------------- runtimes, config

@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML predicts on macOS")
def test_core_ml_is_unavailable_off_macos(tmp_path):
    with pytest.raises(RuntimeUnavailable, match=r"Core ML prediction needs macOS \(Apple's Core ML framework\); "
                                                  r"this OS is Linux"):
        CoreMlDriver(tmp_path / "model.mlpackage", 64, 1)
    available, unavailable = runtime_status()
    assert "needs macOS" in unavailable["coreml"] and "coreml" not in available
    assert {"llama.cpp", "onnxruntime", "litert"} <= set(available)
    assert available["onnxruntime"] == __import__("onnxruntime").__version__
    assert drivers.FORMAT_RUNTIME == {"gguf": "llama.cpp", "onnx": "onnxruntime", "tflite": "litert",
                                      "coreml": "coreml"}


def test_config_defaults_and_errors():
    assert Config.from_json({}) == Config()
    assert Config.from_json({"timed_runs": 0, "task": "MODEL_TASK_CAUSAL_LM"}).timed_runs == 5   # proto3: 0 is unset
    assert Config.from_json({"min_duration_ms": 250, "max_cv_pct": 3}).max_cv_pct == 3.0
    explicit = Config.from_json({"min_duration_ms": 0, "cv_repeats": 0, "cooldown_ms": 0})   # proto3 optional
    assert (explicit.min_duration_ms, explicit.cv_repeats, explicit.cooldown_ms) == (0, 0, 0)
    with pytest.raises(ConfigError, match="timed_rums"):
        Config.from_json({"timed_rums": 3})
    with pytest.raises(ConfigError, match="warmup_runs must be ≥ 0"):
        Config.from_json({"warmup_runs": -1})
    with pytest.raises(ConfigError, match="throughput_prompt_tokens"):
        Config.from_json({"throughput_prompt_tokens": [128, 0]})


def test_synthetic_inputs_follow_the_declared_signature():
    assert concrete_shape(["batch", "sequence", 3, None, -1]) == (1, 128, 3, 1, 1)
    specs = [("input_ids", (1, 8), np.int64), ("attention_mask", (1, 8), np.int64),
             ("token_type_ids", (1, 8), np.int32), ("pixel_values", (1, 3, 4, 4), np.float32)]
    feeds = synthetic_inputs(specs)
    assert feeds["input_ids"].min() >= 1 and feeds["input_ids"].max() < 100
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()
    assert feeds["pixel_values"].dtype == np.float32 and feeds["pixel_values"].shape == (1, 3, 4, 4)
    assert all(np.array_equal(value, feeds[name]) for name, value in synthetic_inputs(specs).items())   # fixed
