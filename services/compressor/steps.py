"""Compression pipelines: the prune / distill / qat / quantize steps of a candidate, as validated values.

One place turns the proto `CompressionStep` into these dataclasses and checks them, so the coordinator
(at CreateBuild, before any work) and the compressor (at Transform) refuse the same things with the
same field names. The order rule is the seed's (chapter 7): structured pruning, then distillation, then
quantization — pruning removes capacity, distillation recovers what it cost, and quantization comes
last because fine-tuning would move weights off any grid chosen earlier. Concretely: every prune step
comes before every distill step, a qat step comes after both, and a quantize step can only be last.
"""
from __future__ import annotations

import dataclasses
from typing import Union

from edgeforge.v1 import common_pb2
from shared.errors import InvalidArgument
from shared.quant.grids import Granularity, Method, QuantizationConfig
from shared.quant.proto import quantization_from_proto, quantization_to_proto

CAUSAL_LM, IMAGE_CLASSIFICATION, TEXT_EMBEDDING = "causal_lm", "image_classification", "text_embedding"
TASKS = {common_pb2.MODEL_TASK_CAUSAL_LM: CAUSAL_LM, common_pb2.MODEL_TASK_IMAGE_CLASSIFICATION: IMAGE_CLASSIFICATION,
         common_pb2.MODEL_TASK_TEXT_EMBEDDING: TEXT_EMBEDDING}
_METHODS = {common_pb2.PRUNE_METHOD_MAGNITUDE: "magnitude", common_pb2.PRUNE_METHOD_WANDA: "wanda",
            common_pb2.PRUNE_METHOD_SPARSEGPT: "sparsegpt", common_pb2.PRUNE_METHOD_STRUCTURED: "structured"}
_SCOPES = {common_pb2.PRUNE_SCOPE_UNSPECIFIED: "per_layer", common_pb2.PRUNE_SCOPE_PER_LAYER: "per_layer",
           common_pb2.PRUNE_SCOPE_GLOBAL: "global"}
_UNITS = {common_pb2.STRUCTURED_UNIT_UNSPECIFIED: "neurons", common_pb2.STRUCTURED_UNIT_NEURONS: "neurons",
          common_pb2.STRUCTURED_UNIT_HEADS: "heads"}
# Defaults per task: (batch size, learning rate). An LM step sees 4 sequences of calibration length.
TRAINING_DEFAULTS = {CAUSAL_LM: (4, 1e-5), IMAGE_CLASSIFICATION: (64, 1e-3), TEXT_EMBEDDING: (32, 2e-5)}
MAX_TRAINING_STEPS = 100_000


def quality_loss_pct(quality: common_pb2.Quality) -> float:
    """Degradation versus `quality.baseline` in percent, positive = worse, for either direction of metric."""
    if not quality.baseline:
        return 0.0
    change = quality.baseline - quality.value if quality.higher_is_better else quality.value - quality.baseline
    return 100.0 * change / quality.baseline


def task_name(task: int, field: str = "model.task") -> str:
    if task not in TASKS:
        raise InvalidArgument(f"{field} {task} is unknown; give causal-lm, image-classification or text-embedding",
                              field=field)
    return TASKS[task]


@dataclasses.dataclass(frozen=True)
class Training:
    steps: int = 200
    batch_size: int = 0              # 0: the task's default
    learning_rate: float = 0.0       # 0: the task's default
    seed: int = 0

    def resolved(self, task: str) -> "Training":
        batch, rate = TRAINING_DEFAULTS[task]
        return dataclasses.replace(self, batch_size=self.batch_size or batch, learning_rate=self.learning_rate or rate)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PruneStep:
    method: str                      # magnitude | wanda | sparsegpt | structured
    sparsity: float = 0.0
    scope: str = "per_layer"
    n: int = 0
    m: int = 0
    unit: str = "neurons"            # structured only
    schedule: tuple[float, ...] = ()
    finetune: Training | None = None
    kind = "prune"

    @property
    def calibrated(self) -> bool:
        return self.method in ("wanda", "sparsegpt", "structured")

    def describe(self) -> str:
        if self.method == "structured":
            return f"structured {self.unit} {100 * self.sparsity:g}%"
        amount = f"{self.n}:{self.m}" if self.m else f"{100 * self.sparsity:g}%"
        extra = f" {self.scope}" if self.scope == "global" else ""
        if self.schedule:
            extra += " iterative " + "→".join(f"{100 * s:g}%" for s in self.schedule)
        return f"{self.method} {amount}{extra}" + (" + fine-tune" if self.finetune and not self.schedule else "")

    def to_dict(self) -> dict:
        out = {"prune": self.method, "sparsity": self.sparsity}
        if self.m:
            out.update(n=self.n, m=self.m)
        if self.method == "structured":
            out["unit"] = self.unit
        if self.scope != "per_layer":
            out["scope"] = self.scope
        if self.schedule:
            out["schedule"] = list(self.schedule)
        if self.finetune:
            out["finetune"] = self.finetune.to_dict()
        return out


@dataclasses.dataclass(frozen=True)
class DistillStep:
    alpha: float | None = None       # None: 0.5 with labels, 1 without (resolved per task)
    temperature: float = 4.0
    training: Training = Training()
    kind = "distill"
    calibrated = False

    def resolved_alpha(self, task: str) -> float:
        if self.alpha is not None:
            return self.alpha
        return 0.5 if task == IMAGE_CLASSIFICATION else 1.0

    def describe(self) -> str:
        alpha = "" if self.alpha is None else f" α={self.alpha:g}"
        return f"distill T={self.temperature:g}{alpha} {self.training.steps} steps"

    def to_dict(self) -> dict:
        return {"distill": {"alpha": self.alpha, "temperature": self.temperature, "training": self.training.to_dict()}}


@dataclasses.dataclass(frozen=True)
class QatStep:
    quantization: QuantizationConfig
    activations: bool = False
    training: Training = Training()
    kind = "qat"
    calibrated = False

    def describe(self) -> str:
        return f"qat {self.quantization.grid().name}{' +a8' if self.activations else ''} {self.training.steps} steps"

    def to_dict(self) -> dict:
        return {"qat": {"quantization": self.quantization.to_dict(), "activations": self.activations,
                        "training": self.training.to_dict()}}


TransformStep = Union[PruneStep, DistillStep, QatStep]


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A candidate's steps: what Transform runs, and the post-training quantization after it (if any)."""
    transforms: tuple[TransformStep, ...]
    quantize: QuantizationConfig | None

    @property
    def qat(self) -> QatStep | None:
        return next((s for s in self.transforms if isinstance(s, QatStep)), None)

    @property
    def calibrated(self) -> bool:
        return any(step.calibrated for step in self.transforms)

    @property
    def trains(self) -> bool:
        return any(isinstance(s, (DistillStep, QatStep)) or (isinstance(s, PruneStep) and s.finetune)
                   for s in self.transforms)

    def to_dicts(self) -> list[dict]:
        out = [step.to_dict() for step in self.transforms]
        if self.quantize is not None:
            out.append({"quantize": self.quantize.to_dict()})
        return out


def training_from_proto(proto: common_pb2.TrainingConfig, field: str) -> Training:
    if not 0 <= proto.steps <= MAX_TRAINING_STEPS:
        raise InvalidArgument(f"{field}.steps must be in [1, {MAX_TRAINING_STEPS}], got {proto.steps}",
                              field=f"{field}.steps")
    if not 0 <= proto.batch_size <= 4096:
        raise InvalidArgument(f"{field}.batch_size must be in [1, 4096], got {proto.batch_size}",
                              field=f"{field}.batch_size")
    if not 0 <= proto.learning_rate <= 1:                 # NaN fails too
        raise InvalidArgument(f"{field}.learning_rate must be in (0, 1], got {proto.learning_rate}",
                              field=f"{field}.learning_rate")
    return Training(proto.steps or 200, proto.batch_size, proto.learning_rate, proto.seed)


def training_to_proto(training: Training) -> common_pb2.TrainingConfig:
    return common_pb2.TrainingConfig(steps=training.steps, batch_size=training.batch_size,
                                     learning_rate=training.learning_rate, seed=training.seed)


def prune_from_proto(proto: common_pb2.PruneConfig, field: str) -> PruneStep:
    if proto.method not in _METHODS:
        raise InvalidArgument(f"{field}.method is required: magnitude, wanda, sparsegpt or structured",
                              field=f"{field}.method")
    if proto.scope not in _SCOPES or proto.unit not in _UNITS:
        bad = "scope" if proto.scope not in _SCOPES else "unit"
        raise InvalidArgument(f"{field}.{bad} {getattr(proto, bad)} is unknown", field=f"{field}.{bad}")
    method = _METHODS[proto.method]
    step = PruneStep(method, proto.sparsity, _SCOPES[proto.scope], proto.n, proto.m, _UNITS[proto.unit],
                     tuple(proto.schedule),
                     training_from_proto(proto.finetune, f"{field}.finetune") if proto.HasField("finetune") else None)
    if step.m or step.n:
        if not 0 < step.n < step.m <= 32:
            raise InvalidArgument(f"{field}: N:M sparsity needs 0 < n < m <= 32, got {step.n}:{step.m}",
                                  field=f"{field}.n")
        if method == "structured":
            raise InvalidArgument(f"{field}: n:m is a pattern of single weights, not of structured units",
                                  field=f"{field}.n")
        step = dataclasses.replace(step, sparsity=1 - step.n / step.m)
    elif not 0 < step.sparsity < 1:                        # NaN fails too
        raise InvalidArgument(f"{field}.sparsity must be in (0, 1), got {step.sparsity}", field=f"{field}.sparsity")
    if step.scope == "global" and method != "magnitude":
        raise InvalidArgument(f"{field}.scope global is for magnitude pruning ({method} compares within each layer)",
                              field=f"{field}.scope")
    if proto.unit and method != "structured":
        raise InvalidArgument(f"{field}.unit applies to structured pruning only", field=f"{field}.unit")
    if step.schedule:
        _check_schedule(step, field)
    return step


def _check_schedule(step: PruneStep, field: str) -> None:
    if step.method != "magnitude" or step.m:
        raise InvalidArgument(f"{field}.schedule is iterative magnitude pruning: method magnitude, no n:m",
                              field=f"{field}.schedule")
    values = step.schedule
    if any(not 0 < s < 1 for s in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise InvalidArgument(f"{field}.schedule must increase strictly within (0, 1), got {list(values)}",
                              field=f"{field}.schedule")
    if abs(values[-1] - step.sparsity) > 1e-9:
        raise InvalidArgument(f"{field}.schedule must end at sparsity {step.sparsity:g}, ends at {values[-1]:g}",
                              field=f"{field}.schedule")
    if step.finetune is None:
        raise InvalidArgument(f"{field}.schedule needs finetune (iterative pruning fine-tunes between steps)",
                              field=f"{field}.finetune")


def distill_from_proto(proto: common_pb2.DistillConfig, field: str) -> DistillStep:
    alpha = proto.alpha if proto.HasField("alpha") else None
    if alpha is not None and not 0 <= alpha <= 1:
        raise InvalidArgument(f"{field}.alpha must be in [0, 1], got {alpha}", field=f"{field}.alpha")
    temperature = proto.temperature or 4.0
    if not 0 < temperature <= 100:
        raise InvalidArgument(f"{field}.temperature must be in (0, 100], got {temperature}",
                              field=f"{field}.temperature")
    return DistillStep(alpha, temperature, training_from_proto(proto.training, f"{field}.training"))


def qat_from_proto(proto: common_pb2.QatConfig, field: str) -> QatStep:
    if not proto.HasField("quantization"):
        raise InvalidArgument(f"{field}.quantization (the grid trained for) is required", field=f"{field}.quantization")
    config = quantization_from_proto(proto.quantization, f"{field}.quantization")
    if config.method is not Method.RTN or config.grid() is None or config.gguf_type or config.mixed is not None:
        raise InvalidArgument(f"{field}.quantization must be a generic RTN grid (bits, granularity; the exporter "
                              "rounds onto it), got " + (config.gguf_type or config.method.value),
                              field=f"{field}.quantization")
    return QatStep(config, proto.activations, training_from_proto(proto.training, f"{field}.training"))


def step_from_proto(proto: common_pb2.CompressionStep, field: str) -> TransformStep | QuantizationConfig:
    which = proto.WhichOneof("step")
    if which == "prune":
        return prune_from_proto(proto.prune, f"{field}.prune")
    if which == "distill":
        return distill_from_proto(proto.distill, f"{field}.distill")
    if which == "qat":
        return qat_from_proto(proto.qat, f"{field}.qat")
    if which == "quantize":
        return quantization_from_proto(proto.quantize, f"{field}.quantize")
    raise InvalidArgument(f"{field} is empty: give one of prune, distill, qat, quantize", field=field)


def step_to_proto(step: TransformStep | QuantizationConfig) -> common_pb2.CompressionStep:
    if isinstance(step, QuantizationConfig):
        return common_pb2.CompressionStep(quantize=quantization_to_proto(step))
    if isinstance(step, PruneStep):
        methods, scopes, units = ({v: k for k, v in table.items()} for table in (_METHODS, _SCOPES, _UNITS))
        proto = common_pb2.PruneConfig(method=methods[step.method], sparsity=step.sparsity, n=step.n, m=step.m,
                                       scope=scopes[step.scope], schedule=list(step.schedule))
        if step.method == "structured":
            proto.unit = units[step.unit]
        if step.finetune:
            proto.finetune.CopyFrom(training_to_proto(step.finetune))
        return common_pb2.CompressionStep(prune=proto)
    if isinstance(step, DistillStep):
        proto = common_pb2.DistillConfig(temperature=step.temperature, training=training_to_proto(step.training))
        if step.alpha is not None:
            proto.alpha = step.alpha
        return common_pb2.CompressionStep(distill=proto)
    return common_pb2.CompressionStep(qat=common_pb2.QatConfig(
        quantization=quantization_to_proto(step.quantization), activations=step.activations,
        training=training_to_proto(step.training)))


# What each task's Transform can do (services/compressor/transform.py); refused up front otherwise.
SUPPORTED = {
    CAUSAL_LM: {"prune": ("magnitude", "wanda", "sparsegpt", "structured"), "units": ("neurons",),
                "distill": True, "qat": False, "schedule": False},
    IMAGE_CLASSIFICATION: {"prune": ("magnitude", "wanda", "sparsegpt", "structured"), "units": ("neurons",),
                           "distill": True, "qat": True, "schedule": True},
    TEXT_EMBEDDING: {"prune": ("magnitude", "wanda", "sparsegpt", "structured"), "units": ("neurons", "heads"),
                     "distill": True, "qat": True, "schedule": True},
}


def pipeline_from_protos(protos, task: str, field: str) -> Pipeline:
    """Validated pipeline of a candidate's `steps` for a model of `task` (see the module docstring)."""
    steps = [step_from_proto(proto, f"{field}[{i}]") for i, proto in enumerate(protos)]
    order = {"prune": 0, "distill": 1, "qat": 2}
    last = -1
    for i, step in enumerate(steps):
        where = f"{field}[{i}]"
        if isinstance(step, QuantizationConfig):
            if i != len(steps) - 1:
                raise InvalidArgument(f"{where}: quantize must be the last step (fine-tuning after it would move "
                                      "the weights off the grid)", field=where)
            continue
        rank = order[step.kind]
        if rank < last:
            raise InvalidArgument(f"{where}: {step.kind} after {[k for k, v in order.items() if v == last][0]}; the "
                                  "order is prune → distill → qat/quantize (seed chapter 7)", field=where)
        last = max(last, rank)
        _check_supported(step, task, where)
    transforms = tuple(s for s in steps if not isinstance(s, QuantizationConfig))
    quantize = steps[-1] if steps and isinstance(steps[-1], QuantizationConfig) else None
    qats = [s for s in transforms if isinstance(s, QatStep)]
    if len(qats) > 1:
        raise InvalidArgument(f"{field}: at most one qat step", field=field)
    if qats:
        if quantize is None:
            quantize = qats[0].quantization          # the exporter rounds onto the trained grid
        elif quantize.grid() != qats[0].quantization.grid():
            raise InvalidArgument(f"{field}: the quantize grid {quantize.grid().name} differs from the qat grid "
                                  f"{qats[0].quantization.grid().name}; QAT trains for the grid it is exported at",
                                  field=f"{field}[{len(steps) - 1}].quantize")
    return Pipeline(transforms, quantize)


def _check_supported(step: TransformStep, task: str, where: str) -> None:
    can = SUPPORTED[task]
    label = task.replace("_", "-")
    if isinstance(step, PruneStep):
        if step.method not in can["prune"]:
            raise InvalidArgument(f"{where}: {step.method} pruning is not available for {label} models",
                                  reason="UNSUPPORTED_OP", field=f"{where}.prune.method")
        if step.method == "structured" and step.unit not in can["units"]:
            raise InvalidArgument(f"{where}: structured {step.unit} pruning is available for {label} models only "
                                  f"as {', '.join(can['units'])}", reason="UNSUPPORTED_OP", field=f"{where}.prune.unit")
        if (step.schedule or step.finetune) and not can["schedule"]:
            raise InvalidArgument(f"{where}: fine-tuning after pruning is not available for {label} models (use a "
                                  "distill step: logit distillation from the source model)", reason="UNSUPPORTED_OP",
                                  field=f"{where}.prune.finetune")
    elif isinstance(step, DistillStep):
        if task != IMAGE_CLASSIFICATION and step.resolved_alpha(task) != 1:
            raise InvalidArgument(f"{where}: {label} training data has no labels, so alpha must be 1 (pure "
                                  f"distillation), got {step.alpha:g}", field=f"{where}.distill.alpha")
    elif isinstance(step, QatStep) and not can["qat"]:
        raise InvalidArgument(f"{where}: qat is not available for {label} models (GPTQ/AWQ recover most of what "
                              "QAT would on CPU budgets)", reason="UNSUPPORTED_OP", field=f"{where}.qat")


def default_int8() -> QuantizationConfig:
    return QuantizationConfig(Method.RTN, bits=8, granularity=Granularity.PER_CHANNEL)
