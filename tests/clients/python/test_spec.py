"""The client's YAML build spec parser: a valid spec becomes the BuildSpec proto; every bad field is a
SpecError naming it."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from clients.python.spec import SpecError, SpecFile, load, parse
from edgeforge.v1 import common_pb2, coordinator_pb2


@pytest.fixture
def base(tmp_path) -> Path:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "calib.txt").write_text("calibration text\n")
    (tmp_path / "data" / "eval.txt").write_text("evaluation text\n")
    return tmp_path


VALID = {
    "name": "tiny-laptop",
    "model": {"path": "models/tiny", "task": "causal-lm"},
    "calibration": {"text_file": "data/calib.txt", "samples": 16, "sequence_length": 128},
    "evaluation": {"text_file": "data/eval.txt", "max_tokens": 2048},
    "targets": [{"selector": {"os": "linux", "cores": 8}}, {"device": "devices/pi5"}],
    "constraints": {"max_size_bytes": 200000000, "max_p90_latency_ms": 2000, "max_quality_loss_pct": 12.5},
    "objective": "lowest_latency",
    "candidates": [
        {"format": "gguf", "quantization": {"method": "none", "type": "f16"}},
        {"id": "q4", "format": "gguf", "quantization": {"type": "q4_0"}},
        {"format": "onnx", "quantization": {"bits": 4, "granularity": "per_group", "group_size": 64,
                                            "symmetric": False}},
        {"format": "onnx"},
    ],
    "benchmark": {"prompt_tokens": 64, "generation_tokens": 16, "threads": 4},
}


def _raw(**changes) -> dict:
    """VALID with top-level keys replaced (None deletes the key)."""
    raw = copy.deepcopy(VALID)
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def _error(raw, base) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(raw, base)
    assert str(info.value).startswith(f"{info.value.field}: ")
    return info.value


def test_valid_spec_becomes_the_proto(base):
    parsed = parse(copy.deepcopy(VALID), base)
    assert isinstance(parsed, SpecFile)
    assert parsed.model_path == (base / "models" / "tiny").resolve()
    assert parsed.calibration_path == (base / "data" / "calib.txt").resolve()
    assert parsed.evaluation_path == (base / "data" / "eval.txt").resolve()
    Q = common_pb2.QuantizationConfig
    expected = coordinator_pb2.BuildSpec(
        display_name="tiny-laptop",
        model=coordinator_pb2.ModelSource(task=common_pb2.MODEL_TASK_CAUSAL_LM),
        calibration=coordinator_pb2.CalibrationConfig(samples=16, sequence_length=128),
        evaluation=coordinator_pb2.EvaluationConfig(max_tokens=2048, window_tokens=512),
        targets=[coordinator_pb2.Target(selector={"os": "linux", "cores": "8"}),
                 coordinator_pb2.Target(device="devices/pi5")],
        constraints=coordinator_pb2.Constraints(max_size_bytes=200000000, max_p90_latency_ms=2000.0,
                                                max_quality_loss_pct=12.5),
        objective=coordinator_pb2.OBJECTIVE_LOWEST_LATENCY,
        candidates=[
            coordinator_pb2.Candidate(format=common_pb2.EXPORT_FORMAT_GGUF, quantization=Q(
                method=common_pb2.QUANT_METHOD_NONE, gguf_type="f16", symmetric=True)),
            coordinator_pb2.Candidate(id="q4", format=common_pb2.EXPORT_FORMAT_GGUF, quantization=Q(
                method=common_pb2.QUANT_METHOD_RTN, gguf_type="q4_0", symmetric=True)),
            coordinator_pb2.Candidate(format=common_pb2.EXPORT_FORMAT_ONNX, quantization=Q(
                method=common_pb2.QUANT_METHOD_RTN, bits=4, granularity=common_pb2.GRANULARITY_PER_GROUP,
                group_size=64, symmetric=False)),
            coordinator_pb2.Candidate(format=common_pb2.EXPORT_FORMAT_ONNX),
        ],
        benchmark=common_pb2.BenchmarkConfig(prompt_tokens=64, generation_tokens=16, threads=4),
    )
    assert parsed.spec == expected
    assert not parsed.spec.candidates[3].HasField("quantization")
    assert parsed.spec.model.artifact == "" and parsed.spec.calibration.dataset == ""   # filled after upload


def test_minimal_spec_gets_defaults(base):
    raw = {"model": {"path": "models/tiny"}, "calibration": {"text_file": "data/calib.txt"},
           "evaluation": {"text_file": "data/eval.txt"}, "targets": [{"device": "devices/x"}]}
    spec = parse(raw, base).spec
    assert spec.model.task == common_pb2.MODEL_TASK_CAUSAL_LM
    assert (spec.calibration.samples, spec.calibration.sequence_length) == (128, 512)
    assert (spec.evaluation.max_tokens, spec.evaluation.window_tokens) == (4096, 512)
    assert spec.objective == coordinator_pb2.OBJECTIVE_BEST_QUALITY
    assert not spec.candidates and not spec.constraints.HasField("max_size_bytes")


def test_unknown_candidate_key_suggests_the_right_one(base):
    raw = _raw(candidates=[{"format": "gguf", "quantisation": {"type": "q8_0"}}])
    error = _error(raw, base)
    assert error.field == "candidates[0].quantisation"
    assert "did you mean 'quantization'" in str(error)


def test_unknown_key_without_near_miss_lists_allowed(base):
    error = _error(_raw(colour="blue"), base)
    assert error.field == "colour" and "allowed:" in str(error) and "did you mean" not in str(error)


@pytest.mark.parametrize("changes, field", [
    (dict(name=5), "name"),
    (dict(targets={"os": "linux"}), "targets"),
    (dict(model="models/tiny"), "model"),
    (dict(calibration={"text_file": "data/calib.txt", "samples": "64"}), "calibration.samples"),
    (dict(calibration={"text_file": "data/calib.txt", "samples": True}), "calibration.samples"),
    (dict(calibration={"text_file": "data/calib.txt", "samples": 64.0}), "calibration.samples"),
    (dict(constraints={"max_p90_latency_ms": "fast"}), "constraints.max_p90_latency_ms"),
    (dict(candidates=[{"format": "gguf", "quantization": {"type": "q8_0", "symmetric": "yes"}}]),
     "candidates[0].quantization.symmetric"),
    (dict(candidates=["gguf"]), "candidates[0]"),
    (dict(targets=["linux"]), "targets[0]"),
])
def test_wrong_types_name_the_field(base, changes, field):
    assert _error(_raw(**changes), base).field == field


@pytest.mark.parametrize("changes, field, hint", [
    (dict(candidates=[{"format": "ggu"}]), "candidates[0].format", "did you mean 'gguf'"),
    (dict(candidates=[{"format": "tensorrt"}]), "candidates[0].format", "is not one of gguf, onnx, tflite, coreml"),
    (dict(candidates=[{"format": "onnx", "export": {"onnx_weight_operator": "matmul_4bit"}}]),
     "candidates[0].export.onnx_weight_operator", "is not one of dequantize_linear, matmul_nbits"),
    (dict(candidates=[{"format": "coreml", "export": {"coreml": {"palette_mode": "kmean"}}}]),
     "candidates[0].export.coreml.palette_mode", "did you mean 'kmeans'"),
    (dict(candidates=[{"format": "coreml", "export": {"coreml": {"sparsity": 1.5}}}]),
     "candidates[0].export.coreml.sparsity", "must be in [0, 1)"),
    (dict(candidates=[{"format": "onnx", "export": {"quantise_activations": True}}]),
     "candidates[0].export.quantise_activations", "did you mean 'int8_activations'"),
    (dict(candidates=[{"format": "onnx", "quantization": {"bits": 8, "granularity": "per_chanel"}}]),
     "candidates[0].quantization.granularity", "did you mean 'per_channel'"),
    (dict(objective="best-quality"), "objective", "did you mean 'best_quality'"),
    (dict(model={"path": "models/tiny", "task": "causal_lm"}), "model.task", "did you mean 'causal-lm'"),
])
def test_bad_enum_values_suggest(base, changes, field, hint):
    error = _error(_raw(**changes), base)
    assert error.field == field and hint in str(error)


@pytest.mark.parametrize("quantization, field", [
    ({"bits": 9, "granularity": "per_channel"}, "candidates[0].quantization.bits"),
    ({"bits": 4, "granularity": "per_group", "group_size": 1}, "candidates[0].quantization.group_size"),
    ({"bits": 8, "granularity": "per_channel", "group_size": 32}, "candidates[0].quantization.group_size"),
    ({"bits": 8}, "candidates[0].quantization.granularity"),
    ({"type": "q4_k_s"}, "candidates[0].quantization.type"),
    ({"type": "q4_k", "scale": "mse"}, "candidates[0].quantization.type"),
    ({"bits": 4, "granularity": "per_group", "group_size": 64}, "candidates[0].quantization"),   # gguf needs a type
    ({"type": "q4_0", "method": "gptq", "gptq": {"damp_percent": 2.0}}, "candidates[0].quantization.gptq.damp_percent"),
    ({"type": "q4_0", "method": "gptq", "gptq": {"damp": 0.1}}, "candidates[0].quantization.gptq.damp"),
    ({"type": "q4_k", "method": "awq", "mixed_precision": {"options": ["q4_k", "q6_k"], "max_bits_per_weight": 5}},
     "candidates[0].quantization.mixed_precision"),
    ({"type": "q4_k", "method": "gptq", "mixed_precision": {"options": ["q4_k", "int4"], "max_bits_per_weight": 5}},
     "candidates[0].quantization.mixed_precision.options"),
    ({"type": "f16", "method": "rtn"}, "candidates[0].quantization.method"),
    ({"method": "gptq", "bits": 4}, "candidates[0].quantization.granularity"),
    ({"method": "imatrix", "type": "f16"}, "candidates[0].quantization.method"),
])
def test_bad_quantization_values(base, quantization, field):
    raw = _raw(candidates=[{"format": "gguf", "quantization": quantization}])
    assert _error(raw, base).field == field


def test_unknown_method_suggests(base):
    raw = _raw(candidates=[{"format": "gguf", "quantization": {"type": "q4_0", "method": "gtpq"}}])
    error = _error(raw, base)
    assert error.field == "candidates[0].quantization.method" and "did you mean 'gptq'" in str(error)


def test_recipe_list_parses_into_steps(base):
    raw = _raw(candidates=[{"format": "gguf", "recipe": [{"method": "awq", "type": "q4_k"},
                                                         {"method": "gptq", "type": "q4_k",
                                                          "gptq": {"act_order": False}}]}])
    spec = parse(raw, base).spec
    steps = spec.candidates[0].recipe
    assert [step.gguf_type for step in steps] == ["q4_k", "q4_k"]
    assert steps[1].gptq.HasField("act_order") and steps[1].gptq.act_order is False
    assert not spec.candidates[0].HasField("quantization")


def test_quantization_and_recipe_together_rejected(base):
    raw = _raw(candidates=[{"format": "gguf", "quantization": {"type": "q4_0"}, "recipe": [{"type": "q4_0"}]}])
    assert _error(raw, base).field == "candidates[0].recipe"


def test_onnx_with_gguf_block_type(base):
    raw = _raw(candidates=[{"format": "onnx", "quantization": {"type": "q8_0"}}])
    error = _error(raw, base)
    assert error.field == "candidates[0].quantization.type" and "GGUF block type" in str(error)


def test_missing_or_empty_targets(base):
    assert _error(_raw(targets=None), base).field == "targets"
    error = _error(_raw(targets=[]), base)
    assert error.field == "targets" and "at least one target" in str(error)


@pytest.mark.parametrize("target", [{"selector": {"os": "linux"}, "device": "devices/pi5"}, {}, {"selector": {}}])
def test_target_needs_exactly_one_of_selector_or_device(base, target):
    error = _error(_raw(targets=[{"device": "devices/ok"}, target]), base)
    assert error.field == "targets[1]" and "exactly one" in str(error)


@pytest.mark.parametrize("section, key, value, field", [
    ("model", "path", "models/missing", "model.path"),
    ("calibration", "text_file", "data/nope.txt", "calibration.text_file"),
    ("evaluation", "text_file", "../elsewhere/eval.txt", "evaluation.text_file"),
])
def test_nonexistent_paths(base, section, key, value, field):
    raw = _raw()
    raw[section][key] = value
    error = _error(raw, base)
    assert error.field == field and "does not exist" in str(error)


@pytest.mark.parametrize("section, field", [("model", "model.path"), ("calibration", "calibration.text_file"),
                                            ("evaluation", "evaluation.text_file")])
def test_missing_required_paths(base, section, field):
    error = _error(_raw(**{section: None}), base)
    assert error.field == field and "is required" in str(error)


@pytest.mark.parametrize("changes, field", [
    (dict(calibration={"text_file": "data/calib.txt", "samples": 0}), "calibration.samples"),
    (dict(calibration={"text_file": "data/calib.txt", "samples": 5000}), "calibration.samples"),
    (dict(evaluation={"text_file": "data/eval.txt", "window_tokens": 10000}), "evaluation.window_tokens"),
    (dict(constraints={"max_size_bytes": -1}), "constraints.max_size_bytes"),
    (dict(benchmark={"timed_runs": 1001}), "benchmark.timed_runs"),
])
def test_out_of_range_numbers(base, changes, field):
    assert _error(_raw(**changes), base).field == field


@pytest.mark.parametrize("raw", [None, [VALID], "name: x", 3])
def test_non_mapping_top_level(base, raw):
    error = _error(raw, base)
    assert error.field == "spec" and "must be a mapping" in str(error)


def test_load_resolves_paths_against_the_spec_file(base):
    (base / "specs").mkdir()
    spec_path = base / "specs" / "build.yaml"
    spec_path.write_text("name: from-yaml\nmodel: {path: ../models/tiny}\n"
                         "calibration: {text_file: ../data/calib.txt}\nevaluation: {text_file: ../data/eval.txt}\n"
                         "targets: [{selector: {os: linux}}]\n"
                         "candidates:\n  - {format: gguf, quantization: {method: rtn, type: q8_0}}\n")
    parsed = load(spec_path)
    assert parsed.spec.display_name == "from-yaml"
    assert parsed.model_path == (base / "models" / "tiny").resolve()
    assert parsed.spec.candidates[0].quantization.gguf_type == "q8_0"


def test_load_invalid_yaml(base):
    spec_path = base / "broken.yaml"
    spec_path.write_text("name: x\nmodel: {path: [unclosed\n")
    with pytest.raises(SpecError) as info:
        load(spec_path)
    assert info.value.field == "spec" and "not valid YAML" in str(info.value)


def test_load_missing_file(base):
    with pytest.raises(SpecError) as info:
        load(base / "absent.yaml")
    assert info.value.field == "spec" and "cannot read" in str(info.value)


def test_load_yaml_typo_is_reported_with_suggestion(base):
    spec_path = base / "typo.yaml"
    spec_path.write_text("name: x\ncalibraton: {text_file: data/calib.txt}\n")
    with pytest.raises(SpecError) as info:
        load(spec_path)
    assert info.value.field == "calibraton" and "did you mean 'calibration'" in str(info.value)


@pytest.mark.parametrize("changes, field, message", [
    (dict(targets=[{"selector": {"os": "linux"}, "constraints": {"max_sise_bytes": 5}}]),
     "targets[0].constraints.max_sise_bytes",
     "unknown key 'max_sise_bytes' at targets[0].constraints — did you mean 'max_size_bytes'?"),
    (dict(candidates=[{"format": "gguf", "steps": [{"quantise": {"type": "q8_0"}}]}]), "candidates[0].steps[0].quantise",
     "unknown key 'quantise' at candidates[0].steps[0] — did you mean 'quantize'?"),
    (dict(candidates=[{"format": "gguf", "quantization": {"type": "q4_0", "method": "gptq",
                                                          "gptq": {"damp_precent": 1}}}]),
     "candidates[0].quantization.gptq.damp_precent",
     "unknown key 'damp_precent' at candidates[0].quantization.gptq — did you mean 'damp_percent'?"),
    (dict(candidates=[{"format": "onnx", "steps": [{"prune": {"method": "wanda", "sparsity": 0.5,
                                                              "finetune": {"step": 10}}}]}]),
     "candidates[0].steps[0].prune.finetune.step",
     "unknown key 'step' at candidates[0].steps[0].prune.finetune — did you mean 'steps'?"),
    (dict(candidates=[{"format": "gguf", "quantization": {"type": "q4_o"}}]), "candidates[0].quantization.type",
     "'q4_o' is not one of q8_0, q4_0"),
    (dict(candidates=[{"format": "gguf", "quantization": {"type": "q4_km"}}]), "candidates[0].quantization.type",
     "did you mean 'q4_k_m'?"),
    (dict(candidates=[{"format": "onnx", "export": {"float_type": "fp16"}}]), "candidates[0].export.float_type",
     "did you mean 'f16'?"),
    (dict(candidates=[{"format": "onnx", "steps": [{"prune": {"method": "wanda", "scope": "globl"}}]}]),
     "candidates[0].steps[0].prune.scope", "did you mean 'global'?"),
])
def test_unknown_names_at_any_depth_suggest_the_fix(base, changes, field, message):
    error = _error(_raw(**changes), base)
    assert error.field == field and message in str(error), str(error)


def test_top_level_unknown_key_has_no_parent_in_the_message(base):
    error = _error(_raw(calibraton={}), base)
    assert error.message == "unknown key 'calibraton' — did you mean 'calibration'?"


def test_load_names_the_line_of_the_bad_field(base):
    spec_path = base / "typo.yaml"
    spec_path.write_text("name: x\nmodel: {path: models/tiny}\ncalibration: {text_file: data/calib.txt}\n"
                         "evaluation: {text_file: data/eval.txt}\ntargets:\n  - selector: {os: linux}\n"
                         "    constraints:\n      max_sise_bytes: 5\ncandidates:\n  - format: gguf\n"
                         "    quantization: {type: q4_o}\n")
    with pytest.raises(SpecError) as info:
        load(spec_path)
    assert info.value.line == 8 and str(info.value).endswith("(line 8)")
    spec_path.write_text(spec_path.read_text().replace("max_sise_bytes", "max_size_bytes"))
    with pytest.raises(SpecError) as info:
        load(spec_path)
    assert info.value.field == "candidates[0].quantization.type" and info.value.line == 11


def test_parse_knows_no_lines(base):
    assert _error(_raw(colour="blue"), base).line is None
