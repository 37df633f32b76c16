"""Server-side validation of a BuildSpec and the plan of candidates it implies.

Nothing is trusted from the client: every field is checked again here, before the build exists,
and a bad one is INVALID_ARGUMENT naming the field. Omitted candidates become the default set for
the task; omitted numbers get the documented defaults (docs/SPEC.md).
"""
from __future__ import annotations

import dataclasses

from edgeforge.v1 import common_pb2, coordinator_pb2
from services.exporter.base import ExportFormat
from services.exporter.convert import format_from_proto
from shared.errors import InvalidArgument, NotFound
from shared.quant.grids import FLOAT_TYPES, GGUF_TYPES, Granularity, Method, QuantizationConfig
from shared.quant.proto import quantization_from_proto, quantization_to_proto
from shared.store.artifacts import ArtifactStore
from shared.store.records import ArtifactKind, parse_artifact_name

DEFAULT_CANDIDATES = (
    (ExportFormat.GGUF, QuantizationConfig(Method.NONE, gguf_type="f16")),
    (ExportFormat.GGUF, QuantizationConfig(Method.RTN, gguf_type="q8_0")),
    (ExportFormat.GGUF, QuantizationConfig(Method.RTN, gguf_type="q4_0")),
    (ExportFormat.ONNX, QuantizationConfig(Method.NONE)),
    (ExportFormat.ONNX, QuantizationConfig(Method.RTN, bits=8, granularity=Granularity.PER_CHANNEL)),
)
DEFAULT_BENCHMARK = {"prompt_tokens": 128, "generation_tokens": 32, "warmup_runs": 1, "timed_runs": 5}


@dataclasses.dataclass(frozen=True)
class PlannedCandidate:
    id: str
    format: ExportFormat
    quantization: QuantizationConfig   # the final (quantizing) step
    float_type: str                     # storage of tensors left float: "f16" or "f32"
    pre_steps: tuple[QuantizationConfig, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.quantization.grid() is not None

    def recipe(self) -> dict:
        out = {"format": self.format.value, "quantization": self.quantization.to_dict(),
               "float_type": self.float_type}
        if self.pre_steps:
            out["recipe"] = [step.to_dict() for step in (*self.pre_steps, self.quantization)]
        return out


def candidate_id(export_format: ExportFormat, config: QuantizationConfig, float_type: str,
                 pre_steps: tuple[QuantizationConfig, ...] = ()) -> str:
    """e.g. gguf-q4_0 (RTN), gguf-q4_k-gptq, onnx-int4-g64-sym-awq+gptq, gguf-q4_k_m-gptq-mixed."""
    grid = config.grid()
    if grid is None:
        return f"{export_format.value}-{float_type}"
    name = config.gguf_type or grid.name.replace("/", "-")
    methods = [step.method.value for step in (*pre_steps, config)]
    if methods != ["rtn"]:
        name += "-" + "+".join(methods)
    if config.mixed is not None:
        name += "-mixed"
    return f"{export_format.value}-{name}"


def _float_type(export_format: ExportFormat, config: QuantizationConfig, field: str) -> str:
    if config.gguf_type in FLOAT_TYPES:
        if export_format is ExportFormat.ONNX and config.gguf_type != "f32":
            raise InvalidArgument("onnx writes float32 at this version; f16 comes with the exporter issue",
                                  field=f"{field}.quantization.type")
        return config.gguf_type
    if config.grid() is None:
        return "f16" if export_format is ExportFormat.GGUF else "f32"
    return "f32"


def _check_model_format(store: ArtifactStore, sha256: str) -> None:
    """A source model must be a GGUF file or a model bundle (tar with config.json): check before starting."""
    import tarfile
    path = store.path(sha256)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return
    try:
        with tarfile.open(path, "r:") as tar:
            if "config.json" in tar.getnames():
                return
    except tarfile.TarError:
        pass
    raise InvalidArgument(f"model artifacts/{sha256} is neither a GGUF file (magic b'GGUF', got {magic!r}) nor a "
                          "model bundle (tar of an HF directory with config.json)", reason="UNKNOWN_MODEL_FORMAT",
                          field="model.artifact")


def _artifact(store: ArtifactStore, name: str, field: str, kinds: tuple[ArtifactKind, ...]) -> None:
    if not name:
        raise InvalidArgument(f"{field} is required (an uploaded artifact, artifacts/{{sha256}})", field=field)
    sha = parse_artifact_name(name, field)
    try:
        record = store.get(sha)
    except NotFound:
        raise InvalidArgument(f"{field} {name} does not exist; upload it first", reason="RESOURCE_NOT_FOUND",
                              field=field)
    if record.kind not in kinds:
        raise InvalidArgument(f"{field} {name} is a {record.kind.value}, expected {'/'.join(k.value for k in kinds)}",
                              field=field)


def validate(spec: coordinator_pb2.BuildSpec, store: ArtifactStore) -> tuple[coordinator_pb2.BuildSpec,
                                                                            list[PlannedCandidate]]:
    """Returns the spec with defaults filled in and the candidate plan, or raises InvalidArgument."""
    spec = coordinator_pb2.BuildSpec.FromString(spec.SerializeToString())
    _artifact(store, spec.model.artifact, "model.artifact", (ArtifactKind.SOURCE_MODEL, ArtifactKind.MODEL))
    _check_model_format(store, parse_artifact_name(spec.model.artifact))
    if spec.model.task == common_pb2.MODEL_TASK_UNSPECIFIED:
        spec.model.task = common_pb2.MODEL_TASK_CAUSAL_LM
    elif spec.model.task != common_pb2.MODEL_TASK_CAUSAL_LM:
        raise InvalidArgument(f"model.task {spec.model.task} is not supported (causal-lm only)", field="model.task")
    _artifact(store, spec.calibration.dataset, "calibration.dataset", (ArtifactKind.DATASET,))
    _artifact(store, spec.evaluation.dataset, "evaluation.dataset", (ArtifactKind.DATASET,))
    if spec.calibration.dataset == spec.evaluation.dataset:
        raise InvalidArgument("calibration and evaluation data are the same artifact; evaluation text must be "
                              "held out or quality numbers are optimistic", field="evaluation.dataset")
    spec.calibration.samples = spec.calibration.samples or 128
    spec.calibration.sequence_length = spec.calibration.sequence_length or 512
    if not (1 <= spec.calibration.samples <= 4096 and 8 <= spec.calibration.sequence_length <= 8192):
        raise InvalidArgument("calibration.samples must be in [1, 4096] and sequence_length in [8, 8192]",
                              field="calibration")
    spec.evaluation.max_tokens = spec.evaluation.max_tokens or 4096
    spec.evaluation.window_tokens = spec.evaluation.window_tokens or 512
    if spec.evaluation.max_tokens < 1 or not 2 <= spec.evaluation.window_tokens <= 8192:
        raise InvalidArgument("evaluation.max_tokens must be positive and window_tokens in [2, 8192]",
                              field="evaluation")
    if not spec.targets:
        raise InvalidArgument("at least one target is required", field="targets")
    for i, target in enumerate(spec.targets):
        if bool(target.selector) == bool(target.device):
            raise InvalidArgument("give exactly one of selector or device", field=f"targets[{i}]")
        if target.device and not target.device.startswith("devices/"):
            raise InvalidArgument(f"device must look like devices/{{id}}, got {target.device!r}",
                                  field=f"targets[{i}].device")
    for key in ("max_size_bytes", "max_p90_latency_ms", "max_quality_loss_pct"):
        if spec.constraints.HasField(key) and getattr(spec.constraints, key) < 0:
            raise InvalidArgument(f"constraints.{key} must not be negative", field=f"constraints.{key}")
    if spec.objective == coordinator_pb2.OBJECTIVE_UNSPECIFIED:
        spec.objective = coordinator_pb2.OBJECTIVE_BEST_QUALITY
    elif spec.objective not in (coordinator_pb2.OBJECTIVE_BEST_QUALITY, coordinator_pb2.OBJECTIVE_LOWEST_LATENCY):
        raise InvalidArgument(f"objective {spec.objective} is unknown", field="objective")
    for key, default in DEFAULT_BENCHMARK.items():
        value = getattr(spec.benchmark, key)
        if value < 0:
            raise InvalidArgument(f"benchmark.{key} must not be negative", field=f"benchmark.{key}")
        setattr(spec.benchmark, key, value or default)
    if not spec.candidates:
        for export_format, config in DEFAULT_CANDIDATES:
            from services.exporter.convert import format_to_proto
            spec.candidates.add(format=format_to_proto(export_format), quantization=quantization_to_proto(config))
    planned = plan(spec)
    for candidate, planned_candidate in zip(spec.candidates, planned):
        candidate.id = planned_candidate.id
    return spec, planned


def plan(spec: coordinator_pb2.BuildSpec) -> list[PlannedCandidate]:
    from services.compressor.compress import check_steps
    planned, seen = [], set()
    for i, candidate in enumerate(spec.candidates):
        field = f"candidates[{i}]"
        export_format = format_from_proto(candidate.format, f"{field}.format")
        if export_format is ExportFormat.REFERENCE:
            raise InvalidArgument("reference is not an export format", field=f"{field}.format")
        if candidate.recipe:
            if candidate.HasField("quantization"):
                raise InvalidArgument("give either quantization or recipe, not both", field=f"{field}.recipe")
            steps = [quantization_from_proto(step, f"{field}.recipe[{j}]") for j, step in enumerate(candidate.recipe)]
            try:
                steps = check_steps(steps)
            except InvalidArgument as error:
                raise InvalidArgument(error.message, field=f"{field}.{error.field or 'recipe'}")
        else:
            quantization = candidate.quantization
            if not candidate.HasField("quantization") or quantization.method == common_pb2.QUANT_METHOD_UNSPECIFIED \
                    and not quantization.gguf_type and not quantization.bits:
                quantization = common_pb2.QuantizationConfig(method=common_pb2.QUANT_METHOD_NONE)
            steps = [quantization_from_proto(quantization, f"{field}.quantization")]
        config, pre_steps = steps[-1], tuple(steps[:-1])
        if export_format is ExportFormat.ONNX and config.gguf_type in GGUF_TYPES:
            raise InvalidArgument(f"{config.gguf_type} is a GGUF block type; give onnx bits/granularity",
                                  field=f"{field}.quantization.type")
        if export_format is ExportFormat.GGUF and config.grid() is not None and not config.gguf_type:
            raise InvalidArgument(f"grid {config.grid().name} is not a llama.cpp block type; a GGUF candidate names "
                                  f"one (quantization.type: {', '.join(GGUF_TYPES)})", field=f"{field}.quantization")
        float_type = _float_type(export_format, config, field)
        candidate_name = candidate.id or candidate_id(export_format, config, float_type, pre_steps)
        if candidate_name in seen:
            raise InvalidArgument(f"candidate id {candidate_name!r} appears twice", field=f"{field}.id")
        seen.add(candidate_name)
        planned.append(PlannedCandidate(candidate_name, export_format, config, float_type, pre_steps))
    return planned
