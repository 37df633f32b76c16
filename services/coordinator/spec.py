"""Server-side validation of a BuildSpec and the plan of candidates it implies.

Nothing is trusted from the client: every field is checked again here, before the build exists,
and a bad one is INVALID_ARGUMENT naming the field. Omitted candidates become the default set for
the task; omitted numbers get the documented defaults (docs/SPEC.md).
"""
from __future__ import annotations

import dataclasses
import re

from edgeforge.v1 import common_pb2, coordinator_pb2
from services.compressor.steps import CAUSAL_LM, IMAGE_CLASSIFICATION, Pipeline, TEXT_EMBEDDING, pipeline_from_protos, \
    task_name
from services.coordinator import selectors
from services.exporter.base import CoremlOptions, ExportFormat, ExportOptions, OnnxWeightOperator
from services.exporter.convert import format_from_proto, options_from_proto
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
INT8_PER_CHANNEL = QuantizationConfig(Method.RTN, bits=8, granularity=Granularity.PER_CHANNEL)
# Image and encoder models: float and int8 weights in each format whose runtime runs here or on phones.
DEFAULT_MODULE_CANDIDATES = {
    IMAGE_CLASSIFICATION: ((ExportFormat.ONNX, QuantizationConfig(Method.NONE)), (ExportFormat.ONNX, INT8_PER_CHANNEL),
                           (ExportFormat.TFLITE, QuantizationConfig(Method.NONE)),
                           (ExportFormat.TFLITE, INT8_PER_CHANNEL)),
    TEXT_EMBEDDING: ((ExportFormat.ONNX, QuantizationConfig(Method.NONE)), (ExportFormat.ONNX, INT8_PER_CHANNEL),
                     (ExportFormat.ONNX, QuantizationConfig(Method.RTN, bits=4, granularity=Granularity.PER_GROUP,
                                                            group_size=32))),
}
MODULE_FORMATS = (ExportFormat.ONNX, ExportFormat.TFLITE, ExportFormat.COREML)
DEFAULT_BENCHMARK = {"prompt_tokens": 128, "generation_tokens": 32, "warmup_runs": 1, "timed_runs": 5,
                     "min_duration_ms": 1000, "max_cv_pct": 10.0, "cv_repeats": 2, "throughput_generation_tokens": 128,
                     "throughput_runs": 3, "cooldown_ms": 1000}
DEFAULT_THROUGHPUT_PROMPTS = (128, 512)           # llama-bench's pp512 plus a short prompt
BENCHMARK_LIMITS = {"prompt_tokens": 32768, "generation_tokens": 32768, "warmup_runs": 1000, "timed_runs": 100_000,
                    "min_duration_ms": 3_600_000, "max_cv_pct": 1000.0, "cv_repeats": 100, "threads": 1024,
                    "throughput_generation_tokens": 32768, "throughput_runs": 1000, "cooldown_ms": 600_000}
TARGET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
CONSTRAINTS = ("max_size_bytes", "max_p90_latency_ms", "max_quality_loss_pct", "max_peak_memory_bytes")


@dataclasses.dataclass(frozen=True)
class PlannedCandidate:
    id: str
    format: ExportFormat
    quantization: QuantizationConfig   # the final (quantizing) step
    options: ExportOptions = ExportOptions()
    pre_steps: tuple[QuantizationConfig, ...] = ()
    pipeline: Pipeline | None = None     # prune/distill/qat steps run by Transform before quantization
    task: str = CAUSAL_LM

    @property
    def module(self) -> bool:
        """An image or encoder model: quantized by the exporter's weight grid, not by Compress."""
        return self.task != CAUSAL_LM

    @property
    def float_type(self) -> str:
        """Storage of tensors left float: "f32", "f16" or "bf16"."""
        return self.options.float_type

    @property
    def quantized(self) -> bool:
        return self.quantization.grid() is not None

    def recipe(self) -> dict:
        out = {"format": self.format.value, "quantization": self.quantization.to_dict(),
               "float_type": self.float_type}
        defaults, options = ExportOptions().to_dict(), self.options.to_dict()
        changed = {key: value for key, value in options.items() if key != "float_type" and value != defaults[key]}
        if changed:
            out["export"] = changed
        if self.pre_steps:
            out["recipe"] = [step.to_dict() for step in (*self.pre_steps, self.quantization)]
        if self.pipeline is not None:
            out["steps"] = self.pipeline.to_dicts()
        return out


def _options_suffix(options: ExportOptions) -> str:
    """What an id adds for export options that change the file: -matmul_nbits, -qdq, -pal4k, -sparse50."""
    parts = []
    if options.onnx_weight_operator is OnnxWeightOperator.MATMUL_NBITS:
        parts.append("matmul_nbits")
    if options.int8_activations:
        parts.append("a8")
    if options.coreml.sparsity:
        parts.append(f"sparse{round(100 * options.coreml.sparsity)}")
    if options.coreml.palette_bits:
        parts.append(f"pal{options.coreml.palette_bits}{options.coreml.palette_mode.value[0]}")
    if options.external_data:
        parts.append("extdata")
    return "".join(f"-{p}" for p in parts)


def _pipeline_prefix(pipeline: Pipeline | None) -> str:
    """What a pipeline adds before the grid: sparsegpt50-, wanda2of4-, structured-neurons25-distill-, qat-."""
    if pipeline is None:
        return ""
    parts = []
    for step in pipeline.transforms:
        if step.kind == "prune":
            amount = f"{step.n}of{step.m}" if step.m else f"{round(100 * step.sparsity)}"
            unit = f"-{step.unit}" if step.method == "structured" else ""
            parts.append(f"{step.method}{unit}{amount}" + ("-iter" if step.schedule else "")
                         + ("-ft" if step.finetune and not step.schedule else ""))
        else:
            parts.append(step.kind)
    return "".join(f"{p}-" for p in parts)


def candidate_id(export_format: ExportFormat, config: QuantizationConfig, options: ExportOptions = ExportOptions(),
                 pre_steps: tuple[QuantizationConfig, ...] = (), pipeline: Pipeline | None = None) -> str:
    """e.g. gguf-q4_0 (RTN), gguf-q4_k-gptq, onnx-int4-g64-sym-awq+gptq, gguf-q4_k_m-gptq-mixed,
    onnx-int4-g32-sym-matmul_nbits, coreml-f16-sparse50-pal4k, gguf-sparsegpt2of4-q4_0,
    onnx-structured-neurons25-distill-int8-per_channel-sym, tflite-qat-int4-per_channel-sym."""
    grid = config.grid()
    prefix = f"{export_format.value}-{_pipeline_prefix(pipeline)}"
    if grid is None:
        return f"{prefix}{options.float_type}{_options_suffix(options)}"
    name = config.gguf_type or grid.name.replace("/", "-")
    methods = [step.method.value for step in (*pre_steps, config)]
    if methods != ["rtn"]:
        name += "-" + "+".join(methods)
    if config.mixed is not None:
        name += "-mixed"
    return f"{prefix}{name}{_options_suffix(options)}"


def _float_type(export_format: ExportFormat, config: QuantizationConfig, export: common_pb2.ExportOptions,
                field: str) -> str:
    """quantization.type f32/f16/bf16 is shorthand for export.float_type; both given must agree."""
    from_type = config.gguf_type if config.gguf_type in FLOAT_TYPES else ""
    if export.float_type and from_type and export.float_type != from_type:
        raise InvalidArgument(f"quantization.type {from_type} and export.float_type {export.float_type} disagree; "
                              "give one", field=f"{field}.export.float_type")
    float_type = export.float_type or from_type
    if not float_type:
        float_type = "f16" if export_format is ExportFormat.GGUF and config.grid() is None else "f32"
    if float_type == "bf16" and export_format is not ExportFormat.GGUF:
        raise InvalidArgument(f"bf16 storage is GGUF only; {export_format.value} takes f32 or f16",
                              field=f"{field}.export.float_type")
    return float_type


def _check_export_options(export_format: ExportFormat, options: ExportOptions, field: str) -> None:
    """Options that belong to another format are refused rather than silently ignored."""
    if options.onnx_weight_operator is not OnnxWeightOperator.DEQUANTIZE_LINEAR and export_format is not ExportFormat.ONNX:
        raise InvalidArgument(f"onnx_weight_operator applies to onnx, not {export_format.value}",
                              field=f"{field}.onnx_weight_operator")
    if options.external_data and export_format is not ExportFormat.ONNX:
        raise InvalidArgument(f"external_data applies to onnx, not {export_format.value}", field=f"{field}.external_data")
    if options.int8_activations and export_format not in (ExportFormat.ONNX, ExportFormat.TFLITE):
        raise InvalidArgument(f"int8_activations applies to onnx (static QDQ) and tflite (full int8), not "
                              f"{export_format.value}", field=f"{field}.int8_activations")
    if options.coreml != CoremlOptions() and export_format is not ExportFormat.COREML:
        raise InvalidArgument(f"coreml options apply to coreml, not {export_format.value}", field=f"{field}.coreml")


def _check_model_format(store: ArtifactStore, sha256: str, task: str) -> None:
    """A causal LM must be a GGUF file or a model bundle (tar with config.json): check before starting.
    Image and encoder models come in more forms (ONNX, .pt2, BERT or module bundles); the compressor's
    ImportModel reads them and fails the build with the precise reason."""
    import tarfile
    if task != CAUSAL_LM:
        return
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
    if spec.model.task == common_pb2.MODEL_TASK_UNSPECIFIED:
        spec.model.task = common_pb2.MODEL_TASK_CAUSAL_LM
    task = task_name(spec.model.task)
    _check_model_format(store, parse_artifact_name(spec.model.artifact), task)
    if spec.calibration.dataset or task == CAUSAL_LM:
        _artifact(store, spec.calibration.dataset, "calibration.dataset", (ArtifactKind.DATASET,))
    _artifact(store, spec.evaluation.dataset, "evaluation.dataset", (ArtifactKind.DATASET,))
    if spec.calibration.dataset == spec.evaluation.dataset:
        raise InvalidArgument("calibration and evaluation data are the same artifact; evaluation text must be "
                              "held out or quality numbers are optimistic", field="evaluation.dataset")
    if spec.training.dataset:
        _artifact(store, spec.training.dataset, "training.dataset", (ArtifactKind.DATASET,))
        if spec.training.dataset == spec.evaluation.dataset:
            raise InvalidArgument("training and evaluation data are the same artifact; a model fine-tuned on its "
                                  "evaluation data scores optimistically", field="training.dataset")
    if spec.evaluation.max_samples < 0:
        raise InvalidArgument(f"evaluation.max_samples must not be negative, got {spec.evaluation.max_samples}",
                              field="evaluation.max_samples")
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
    names = set()
    for i, target in enumerate(spec.targets):
        if bool(target.selector) == bool(target.device):
            raise InvalidArgument("give exactly one of selector or device", field=f"targets[{i}]")
        if target.device and not target.device.startswith("devices/"):
            raise InvalidArgument(f"device must look like devices/{{id}}, got {target.device!r}",
                                  field=f"targets[{i}].device")
        selectors.parse(target.selector, f"targets[{i}].selector")
        target.name = target.name or f"targets-{i}"
        if not TARGET_NAME.match(target.name):
            raise InvalidArgument(f"target name must be 1-63 lowercase letters, digits, '-' or '_', got "
                                  f"{target.name[:80]!r}", field=f"targets[{i}].name")
        if target.name in names:
            raise InvalidArgument(f"target name {target.name!r} appears twice", field=f"targets[{i}].name")
        names.add(target.name)
        _check_constraints(target.constraints, f"targets[{i}].constraints")
    _check_constraints(spec.constraints, "constraints")
    if spec.objective == coordinator_pb2.OBJECTIVE_UNSPECIFIED:
        spec.objective = coordinator_pb2.OBJECTIVE_BEST_QUALITY
    elif spec.objective not in coordinator_pb2.Objective.values():
        raise InvalidArgument(f"objective {spec.objective} is unknown", field="objective")
    if not -1000 <= spec.priority <= 1000:
        raise InvalidArgument(f"priority must be in [-1000, 1000], got {spec.priority}", field="priority")
    for key, limit in BENCHMARK_LIMITS.items():
        value = getattr(spec.benchmark, key)
        if not 0 <= value <= limit:
            raise InvalidArgument(f"benchmark.{key} must be in [0, {limit}], got {value}", field=f"benchmark.{key}")
        optional = spec.benchmark.DESCRIPTOR.fields_by_name[key].has_presence
        if key in DEFAULT_BENCHMARK and not (spec.benchmark.HasField(key) if optional else value):
            setattr(spec.benchmark, key, DEFAULT_BENCHMARK[key])
    for j, tokens in enumerate(spec.benchmark.throughput_prompt_tokens):
        if not 1 <= tokens <= 32768:
            raise InvalidArgument(f"benchmark.throughput_prompt_tokens[{j}] must be in [1, 32768], got {tokens}",
                                  field=f"benchmark.throughput_prompt_tokens[{j}]")
    if not spec.benchmark.throughput_prompt_tokens:
        spec.benchmark.throughput_prompt_tokens.extend(DEFAULT_THROUGHPUT_PROMPTS)
    if not spec.candidates:
        for export_format, config in DEFAULT_MODULE_CANDIDATES.get(task, DEFAULT_CANDIDATES):
            from services.exporter.convert import format_to_proto
            spec.candidates.add(format=format_to_proto(export_format), quantization=quantization_to_proto(config))
    planned = plan(spec)
    for i, candidate in enumerate(planned):
        pipeline = candidate.pipeline
        if pipeline is not None and not spec.calibration.dataset and (pipeline.calibrated or pipeline.trains
                                                                       and not spec.training.dataset):
            needs = "wanda, sparsegpt and structured pruning" if pipeline.calibrated else "training steps"
            raise InvalidArgument(f"candidates[{i}] has {needs}, which need calibration.dataset"
                                  + ("" if pipeline.calibrated else " or training.dataset"),
                                  reason="MISSING_CALIBRATION", field="calibration.dataset")
    for candidate, planned_candidate in zip(spec.candidates, planned):
        candidate.id = planned_candidate.id
    return spec, planned


def _check_constraints(constraints: coordinator_pb2.Constraints, field: str) -> None:
    for key in CONSTRAINTS:
        if constraints.HasField(key) and not getattr(constraints, key) >= 0:     # NaN fails too
            raise InvalidArgument(f"{field}.{key} must not be negative, got {getattr(constraints, key)}",
                                  field=f"{field}.{key}")


def effective_constraints(spec: coordinator_pb2.BuildSpec, target: coordinator_pb2.Target) -> coordinator_pb2.Constraints:
    """The build's budgets, each replaced by the target's where the target sets it."""
    merged = coordinator_pb2.Constraints()
    merged.CopyFrom(spec.constraints)
    merged.MergeFrom(target.constraints)         # optional scalars: only the fields set on the target
    return merged


def plan(spec: coordinator_pb2.BuildSpec) -> list[PlannedCandidate]:
    from services.compressor.compress import check_steps
    planned, seen = [], set()
    task = task_name(spec.model.task or common_pb2.MODEL_TASK_CAUSAL_LM)
    for i, candidate in enumerate(spec.candidates):
        field = f"candidates[{i}]"
        export_format = format_from_proto(candidate.format, f"{field}.format")
        if export_format is ExportFormat.REFERENCE:
            raise InvalidArgument("reference is not an export format", field=f"{field}.format")
        if task != CAUSAL_LM and export_format not in MODULE_FORMATS:
            raise InvalidArgument(f"{export_format.value} is for causal LMs; a {task.replace('_', '-')} model exports "
                                  f"as {', '.join(f.value for f in MODULE_FORMATS)}", field=f"{field}.format")
        pipeline = None
        if candidate.steps:
            if candidate.recipe or candidate.HasField("quantization"):
                raise InvalidArgument("give steps (ending in a quantize step) instead of quantization/recipe",
                                      field=f"{field}.steps")
            pipeline = pipeline_from_protos(candidate.steps, task, f"{field}.steps")
            steps = [pipeline.quantize or QuantizationConfig(Method.NONE)]
            _check_pipeline_quantization(steps[0], task, f"{field}.steps")
        elif candidate.recipe:
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
        if task != CAUSAL_LM:
            _check_module_quantization(config, pre_steps, field)
        if export_format is ExportFormat.ONNX and config.gguf_type in GGUF_TYPES:
            raise InvalidArgument(f"{config.gguf_type} is a GGUF block type; give onnx bits/granularity",
                                  field=f"{field}.quantization.type")
        if export_format is ExportFormat.GGUF and config.grid() is not None and not config.gguf_type:
            raise InvalidArgument(f"grid {config.grid().name} is not a llama.cpp block type; a GGUF candidate names "
                                  f"one (quantization.type: {', '.join(GGUF_TYPES)})", field=f"{field}.quantization")
        export = common_pb2.ExportOptions()
        export.CopyFrom(candidate.export)
        export.float_type = _float_type(export_format, config, candidate.export, field)
        options = options_from_proto(export, f"{field}.export")
        _check_export_options(export_format, options, f"{field}.export")
        candidate_name = candidate.id or candidate_id(export_format, config, options, pre_steps, pipeline)
        if candidate_name in seen:
            raise InvalidArgument(f"candidate id {candidate_name!r} appears twice", field=f"{field}.id")
        seen.add(candidate_name)
        planned.append(PlannedCandidate(candidate_name, export_format, config, options, pre_steps, pipeline, task))
    return planned


def _check_pipeline_quantization(config: QuantizationConfig, task: str, field: str) -> None:
    """After prune/distill steps the model is no longer the one the build's statistics describe: methods that
    read those statistics (IMATRIX, GPTQ without sequential calibration, mixed precision) are refused;
    GPTQ sequential and AWQ run the transformed model on the calibration text themselves."""
    if task != CAUSAL_LM:
        return
    stale = config.method is Method.IMATRIX or config.mixed is not None or (
        config.method is Method.GPTQ and not config.gptq.sequential)
    if stale:
        raise InvalidArgument(f"{field}: {config.method.value}{' mixed precision' if config.mixed else ''} reads the "
                              "calibration statistics of the source model, not of the pruned one; use rtn, awq or "
                              "gptq with sequential calibration after prune/distill steps", field=field)


def _check_module_quantization(config: QuantizationConfig, pre_steps: tuple, field: str) -> None:
    """Image and encoder weights are rounded by the exporter (RTN onto a generic grid)."""
    if pre_steps or config.method not in (Method.NONE, Method.RTN) or config.gguf_type not in ("", *FLOAT_TYPES) \
            or config.mixed is not None:
        raise InvalidArgument(f"{field}: image and encoder models are quantized by the exporter's round-to-nearest "
                              "onto a generic grid (bits, granularity); GGUF types, GPTQ/AWQ/IMATRIX and recipes are "
                              "for causal LMs", reason="UNSUPPORTED_OP", field=f"{field}.quantization")
