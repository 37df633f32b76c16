"""Server-side BuildSpec validation and the candidate plan, against a real artifact store on SQLite."""
from __future__ import annotations

from pathlib import Path

import pytest

from edgeforge.v1 import common_pb2, coordinator_pb2
from services.coordinator.spec import plan, validate
from services.exporter.base import ExportFormat
from shared.errors import InvalidArgument
from shared.quant.grids import GGUF_GRIDS, Granularity, Grid, Method, QuantizationConfig
from shared.store.artifacts import ArtifactStore
from shared.store.database import Database
from shared.store.records import ArtifactKind

DEFAULT_IDS = ["gguf-f16", "gguf-q8_0", "gguf-q4_0", "onnx-f32", "onnx-int8-per_channel-sym"]
GGUF, ONNX = common_pb2.EXPORT_FORMAT_GGUF, common_pb2.EXPORT_FORMAT_ONNX
RTN, NONE = common_pb2.QUANT_METHOD_RTN, common_pb2.QUANT_METHOD_NONE


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    db = Database(tmp_path / "db" / "edgeforge.sqlite")
    yield ArtifactStore(db, tmp_path / "store")
    db.close()


def _put(store: ArtifactStore, tmp_path: Path, name: str, content: bytes, kind: ArtifactKind) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    record = store.put_file(path, kind, display_name=name)
    assert record.name == f"artifacts/{record.sha256}"
    return record.name


@pytest.fixture
def artifacts(store, tmp_path) -> dict[str, str]:
    return {"model": _put(store, tmp_path, "model.gguf", b"GGUF fake model bytes", ArtifactKind.SOURCE_MODEL),
            "calib": _put(store, tmp_path, "calib.txt", b"calibration text\n" * 10, ArtifactKind.DATASET),
            "eval": _put(store, tmp_path, "eval.txt", b"held-out evaluation text\n" * 10, ArtifactKind.DATASET)}


def _spec(artifacts: dict[str, str]) -> coordinator_pb2.BuildSpec:
    spec = coordinator_pb2.BuildSpec(display_name="t")
    spec.model.artifact = artifacts["model"]
    spec.calibration.dataset = artifacts["calib"]
    spec.evaluation.dataset = artifacts["eval"]
    spec.targets.add(selector={"os": "linux"})
    return spec


def _invalid(spec, store) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        validate(spec, store)
    assert info.value.code == "INVALID_ARGUMENT"
    return info.value


def test_empty_candidates_become_the_five_defaults(store, artifacts):
    spec = _spec(artifacts)
    filled, planned = validate(spec, store)
    assert [c.id for c in planned] == DEFAULT_IDS
    assert [c.format for c in planned] == [ExportFormat.GGUF] * 3 + [ExportFormat.ONNX] * 2
    assert [c.float_type for c in planned] == ["f16", "f32", "f32", "f32", "f32"]
    assert [c.quantized for c in planned] == [False, True, True, False, True]
    assert planned[4].quantization == QuantizationConfig(Method.RTN, bits=8, granularity=Granularity.PER_CHANNEL)
    assert planned[1].recipe() == {"format": "gguf", "quantization": {"method": "rtn", "type": "q8_0"},
                                   "float_type": "f32"}
    assert len(filled.candidates) == 5 and not spec.candidates           # the input is not mutated
    assert plan(filled) == planned                                         # the filled spec replans the same


def test_defaults_are_filled(store, artifacts):
    filled, _ = validate(_spec(artifacts), store)
    assert filled.model.task == common_pb2.MODEL_TASK_CAUSAL_LM
    assert (filled.calibration.samples, filled.calibration.sequence_length) == (128, 512)
    assert (filled.evaluation.max_tokens, filled.evaluation.window_tokens) == (4096, 512)
    assert (filled.benchmark.prompt_tokens, filled.benchmark.generation_tokens) == (128, 32)
    assert (filled.benchmark.warmup_runs, filled.benchmark.timed_runs) == (1, 5)
    assert filled.objective == coordinator_pb2.OBJECTIVE_BEST_QUALITY
    assert not filled.constraints.HasField("max_size_bytes")


def test_given_numbers_are_kept(store, artifacts):
    spec = _spec(artifacts)
    spec.calibration.samples, spec.evaluation.max_tokens, spec.benchmark.timed_runs = 8, 100, 2
    spec.objective = coordinator_pb2.OBJECTIVE_LOWEST_LATENCY
    filled, _ = validate(spec, store)
    assert (filled.calibration.samples, filled.evaluation.max_tokens, filled.benchmark.timed_runs) == (8, 100, 2)
    assert filled.objective == coordinator_pb2.OBJECTIVE_LOWEST_LATENCY


def test_missing_model_artifact(store, artifacts):
    spec = _spec(artifacts)
    spec.model.artifact = ""
    assert _invalid(spec, store).field == "model.artifact"


def test_nonexistent_and_malformed_artifact_names(store, artifacts):
    spec = _spec(artifacts)
    spec.model.artifact = "artifacts/" + "0" * 64
    error = _invalid(spec, store)
    assert error.field == "model.artifact" and error.reason == "RESOURCE_NOT_FOUND"
    spec.model.artifact = "blobs/model.gguf"
    assert _invalid(spec, store).field == "model.artifact"
    spec = _spec(artifacts)
    spec.evaluation.dataset = "artifacts/" + "f" * 64
    assert _invalid(spec, store).field == "evaluation.dataset"


def test_artifact_of_wrong_kind(store, artifacts):
    spec = _spec(artifacts)
    spec.calibration.dataset = artifacts["model"]
    error = _invalid(spec, store)
    assert error.field == "calibration.dataset" and "SOURCE_MODEL" in error.message


def test_same_dataset_for_calibration_and_evaluation(store, artifacts):
    spec = _spec(artifacts)
    spec.evaluation.dataset = artifacts["calib"]
    error = _invalid(spec, store)
    assert error.field == "evaluation.dataset" and "held out" in error.message


@pytest.mark.parametrize("edit, field", [
    (lambda s: s.ClearField("targets"), "targets"),
    (lambda s: s.targets[0].__setattr__("device", "devices/laptop"), "targets[0]"),
    (lambda s: s.targets.add(device="laptop"), "targets[1].device"),
    (lambda s: s.calibration.__setattr__("sequence_length", 4), "calibration"),
    (lambda s: s.evaluation.__setattr__("window_tokens", 9000), "evaluation"),
    (lambda s: s.constraints.__setattr__("max_size_bytes", -1), "constraints.max_size_bytes"),
    (lambda s: s.benchmark.__setattr__("timed_runs", -3), "benchmark.timed_runs"),
    (lambda s: s.__setattr__("objective", 99), "objective"),
    (lambda s: s.model.__setattr__("task", 7), "model.task"),
])
def test_bad_fields_are_named(store, artifacts, edit, field):
    spec = _spec(artifacts)
    edit(spec)
    assert _invalid(spec, store).field == field


def test_duplicate_candidate_ids_rejected(store, artifacts):
    spec = _spec(artifacts)
    spec.candidates.add(id="mine", format=GGUF)
    spec.candidates.add(id="mine", format=ONNX)
    assert _invalid(spec, store).field == "candidates[1].id"
    spec = _spec(artifacts)                                                # derived ids collide too
    for _ in range(2):
        spec.candidates.add(format=GGUF, quantization=common_pb2.QuantizationConfig(method=RTN, gguf_type="q4_0"))
    error = _invalid(spec, store)
    assert error.field == "candidates[1].id" and "gguf-q4_0" in error.message


def test_onnx_with_gguf_block_type_rejected(store, artifacts):
    spec = _spec(artifacts)
    spec.candidates.add(format=ONNX, quantization=common_pb2.QuantizationConfig(method=RTN, gguf_type="q4_0"))
    assert _invalid(spec, store).field == "candidates[0].quantization.type"


def test_export_options_are_planned_and_misplaced_ones_refused(store, artifacts):
    spec = _spec(artifacts)
    spec.candidates.add(format=ONNX, quantization=common_pb2.QuantizationConfig(method=NONE, gguf_type="f16"))
    spec.candidates.add(format=ONNX, quantization=common_pb2.QuantizationConfig(
        method=common_pb2.QUANT_METHOD_RTN, bits=4, granularity=common_pb2.GRANULARITY_PER_GROUP, group_size=32),
        export=common_pb2.ExportOptions(onnx_weight_operator=common_pb2.ONNX_WEIGHT_OPERATOR_MATMUL_NBITS))
    spec.candidates.add(format=common_pb2.EXPORT_FORMAT_COREML, export=common_pb2.ExportOptions(
        float_type="f16", coreml=common_pb2.CoremlOptions(palette_bits=4, sparsity=0.5)))
    spec.candidates.add(format=common_pb2.EXPORT_FORMAT_GGUF, quantization=common_pb2.QuantizationConfig(
        method=NONE, gguf_type="bf16"))
    _, planned = validate(spec, store)
    assert [c.id for c in planned] == ["onnx-f16", "onnx-int4-g32-sym-matmul_nbits", "coreml-f16-sparse50-pal4k",
                                       "gguf-bf16"]
    assert planned[2].recipe()["export"]["coreml"]["palette_bits"] == 4
    for bad, field in [
            (dict(format=ONNX, quantization=common_pb2.QuantizationConfig(method=NONE, gguf_type="bf16")),
             "candidates[0].export.float_type"),
            (dict(format=ONNX, quantization=common_pb2.QuantizationConfig(method=NONE, gguf_type="f16"),
                  export=common_pb2.ExportOptions(float_type="f32")), "candidates[0].export.float_type"),
            (dict(format=common_pb2.EXPORT_FORMAT_GGUF, export=common_pb2.ExportOptions(
                coreml=common_pb2.CoremlOptions(palette_bits=4))), "candidates[0].export.coreml"),
            (dict(format=common_pb2.EXPORT_FORMAT_COREML, export=common_pb2.ExportOptions(
                coreml=common_pb2.CoremlOptions(palette_bits=9))), "candidates[0].export.coreml.palette_bits"),
            (dict(format=common_pb2.EXPORT_FORMAT_GGUF, export=common_pb2.ExportOptions(int8_activations=True)),
             "candidates[0].export.int8_activations")]:
        spec = _spec(artifacts)
        spec.candidates.add(**bad)
        assert _invalid(spec, store).field == field


def test_reference_and_unspecified_formats_rejected(store, artifacts):
    spec = _spec(artifacts)
    spec.candidates.add(format=common_pb2.EXPORT_FORMAT_REFERENCE)
    assert _invalid(spec, store).field == "candidates[0].format"
    spec = _spec(artifacts)
    spec.candidates.add(format=common_pb2.EXPORT_FORMAT_UNSPECIFIED)
    assert _invalid(spec, store).field == "candidates[0].format"


@pytest.mark.parametrize("quantization, field", [
    (dict(method=RTN, bits=9, granularity=common_pb2.GRANULARITY_PER_CHANNEL), "quantization.bits"),
    (dict(method=RTN, bits=4, granularity=common_pb2.GRANULARITY_PER_GROUP, group_size=1),
     "quantization.group_size"),
    (dict(method=RTN, bits=4, granularity=42), "quantization.granularity"),
    (dict(method=RTN, gguf_type="q3_k"), "quantization.type"),          # a GGUF type on an onnx candidate
    (dict(method=RTN, gguf_type="iq4_nl"), "quantization.type"),
    (dict(method=77, bits=4, granularity=common_pb2.GRANULARITY_PER_CHANNEL), "quantization.method"),
    (dict(method=common_pb2.QUANT_METHOD_GPTQ, bits=4, granularity=common_pb2.GRANULARITY_PER_CHANNEL,
          gptq=common_pb2.GptqOptions(block_size=-1)), "quantization.gptq.block_size"),
])
def test_bad_quantization_fields_are_prefixed_with_the_candidate(store, artifacts, quantization, field):
    spec = _spec(artifacts)
    spec.candidates.add(format=GGUF)
    spec.candidates.add(format=ONNX, quantization=common_pb2.QuantizationConfig(**quantization))
    assert _invalid(spec, store).field == f"candidates[1].{field}"


def test_explicit_candidates_plan(store, artifacts):
    spec = _spec(artifacts)
    spec.candidates.add(format=ONNX)                                        # no quantization: float
    spec.candidates.add(format=ONNX, quantization=common_pb2.QuantizationConfig(
        method=RTN, bits=4, granularity=common_pb2.GRANULARITY_PER_GROUP, group_size=64, symmetric=False))
    spec.candidates.add(id="small", format=GGUF, quantization=common_pb2.QuantizationConfig(
        method=RTN, gguf_type="q4_0"))
    filled, planned = validate(spec, store)
    assert [(c.id, c.format, c.float_type) for c in planned] == [
        ("onnx-f32", ExportFormat.ONNX, "f32"), ("onnx-int4-g64-asym", ExportFormat.ONNX, "f32"),
        ("small", ExportFormat.GGUF, "f32")]
    assert [c.quantization.grid() for c in planned] == [
        None, Grid(4, Granularity.PER_GROUP, 64, False), GGUF_GRIDS["q4_0"]]
    assert planned[0].recipe() == {"format": "onnx", "quantization": {"method": "none"}, "float_type": "f32"}
    assert planned[1].recipe()["quantization"] == {"method": "rtn", "bits": 4, "granularity": "per_group",
                                                   "symmetric": False, "group_size": 64}
    assert len(filled.candidates) == 3                                      # no defaults added


def test_recipe_candidates_plan_pre_steps(store, artifacts):
    spec = _spec(artifacts)
    awq = common_pb2.QuantizationConfig(method=common_pb2.QUANT_METHOD_AWQ, gguf_type="q4_k")
    gptq = common_pb2.QuantizationConfig(method=common_pb2.QUANT_METHOD_GPTQ, gguf_type="q4_k")
    spec.candidates.add(format=GGUF, recipe=[awq, gptq])
    spec.candidates.add(format=GGUF, quantization=gptq)
    _, planned = validate(spec, store)
    assert [c.id for c in planned] == ["gguf-q4_k-awq+gptq", "gguf-q4_k-gptq"]
    assert [s.method.value for s in planned[0].pre_steps] == ["awq"] and planned[0].quantization.method.value == "gptq"
    assert [step["method"] for step in planned[0].recipe()["recipe"]] == ["awq", "gptq"]


@pytest.mark.parametrize("steps, field", [
    ([dict(method=common_pb2.QUANT_METHOD_GPTQ, gguf_type="q4_k"), dict(method=RTN, gguf_type="q4_k")],
     "candidates[0].recipe[0].method"),                               # only AWQ may precede the last step
    ([dict(method=common_pb2.QUANT_METHOD_AWQ, gguf_type="q4_0"), dict(method=RTN, gguf_type="q4_k")],
     "candidates[0].recipe[0]"),                                      # AWQ searched for another grid
    ([dict(method=common_pb2.QUANT_METHOD_AWQ, gguf_type="q4_0"), dict(method=RTN, gguf_type="q9_0")],
     "candidates[0].recipe[1].type"),
])
def test_bad_recipes_name_the_step(store, artifacts, steps, field):
    spec = _spec(artifacts)
    spec.candidates.add(format=GGUF, recipe=[common_pb2.QuantizationConfig(**step) for step in steps])
    assert _invalid(spec, store).field == field


@pytest.mark.parametrize("quantization", [
    dict(method=RTN, bits=8, granularity=common_pb2.GRANULARITY_PER_CHANNEL, symmetric=True),
    dict(method=RTN, bits=4, granularity=common_pb2.GRANULARITY_PER_GROUP, group_size=128, symmetric=True),
])
def test_gguf_with_grid_that_has_no_block_type_rejected(store, artifacts, quantization):
    spec = _spec(artifacts)
    spec.candidates.add(format=GGUF, quantization=common_pb2.QuantizationConfig(**quantization))
    assert _invalid(spec, store).field.startswith("candidates[0].quantization")
