"""The YAML build spec (docs/SPEC.md) -> a BuildSpec proto, validated before anything is uploaded.

Unknown keys (at any depth) and unknown names of a fixed set raise SpecError naming the field, with
the closest known name as a suggestion ("unknown key 'quantisation' at candidates[0] — did you mean
'quantization'?"); `load` adds the line of the YAML file it is on. Relative paths resolve against the
spec file's directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any

from edgeforge.v1 import common_pb2, coordinator_pb2
from shared.errors import InvalidArgument
from shared.quant.grids import FLOAT_TYPES, GGUF_TYPES
from shared.quant.proto import quantization_from_proto


MAX_SPEC_BYTES = 1 << 20          # a spec is a page of YAML; anything near this size is not one


INT64_MAX = 2 ** 63 - 1


class SpecError(ValueError):
    """A bad spec: `field` is its path ("candidates[0].quantization.type"), `line` the 1-based line of the
    YAML file it is on when the spec came from `load` (None from `parse`, or when the field is absent)."""

    def __init__(self, field: str, message: str, line: int | None = None):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.line = field, message, line

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" + (f" (line {self.line})" if self.line else "")


# section -> {key: type}; nested dicts are described by their own entries.
_KEYS: dict[str, dict[str, type | tuple]] = {
    "": {"name": str, "model": dict, "calibration": dict, "evaluation": dict, "targets": list,
         "constraints": dict, "objective": str, "candidates": list, "benchmark": dict, "priority": int,
         "training": dict},
    "model": {"path": str, "task": str},
    "calibration": {"text_file": str, "file": str, "samples": int, "sequence_length": int},
    "evaluation": {"text_file": str, "file": str, "max_tokens": int, "window_tokens": int, "max_samples": int},
    "training": {"file": str, "text_file": str},
    "targets[]": {"name": str, "selector": dict, "device": str, "each_device": bool, "constraints": dict},
    "constraints": {"max_size_bytes": int, "max_p90_latency_ms": (int, float), "max_quality_loss_pct": (int, float),
                    "max_peak_memory_bytes": int},
    "candidates[]": {"id": str, "format": str, "quantization": dict, "recipe": list, "export": dict, "steps": list},
    "steps[]": {"prune": dict, "distill": dict, "qat": dict, "quantize": dict},
    "prune": {"method": str, "sparsity": (int, float), "scope": str, "n": int, "m": int, "unit": str,
              "schedule": list, "finetune": dict},
    "distill": {"alpha": (int, float), "temperature": (int, float), "training": dict},
    "qat": {"quantization": dict, "activations": bool, "training": dict},
    "training_config": {"steps": int, "batch_size": int, "learning_rate": (int, float), "seed": int},
    "export": {"float_type": str, "onnx_weight_operator": str, "int8_activations": bool, "external_data": bool,
               "coreml": dict},
    "coreml": {"palette_bits": int, "palette_mode": str, "palette_group_size": int, "sparsity": (int, float),
               "deployment_target": str},
    "quantization": {"method": str, "type": str, "bits": int, "granularity": str, "group_size": int,
                     "symmetric": bool, "scale": str, "percentile": (int, float), "gptq": dict, "awq": dict,
                     "mixed_precision": dict},
    "gptq": {"damp_percent": (int, float), "block_size": int, "act_order": bool, "sequential": bool},
    "awq": {"grid": int, "clip": bool},
    "mixed_precision": {"options": list, "max_bits_per_weight": (int, float)},
    "benchmark": {"prompt_tokens": int, "generation_tokens": int, "warmup_runs": int, "timed_runs": int,
                  "threads": int, "min_duration_ms": int, "max_cv_pct": (int, float), "cv_repeats": int,
                  "throughput_prompt_tokens": list, "throughput_generation_tokens": int, "throughput_runs": int,
                  "skip_throughput": bool, "cooldown_ms": int},
}
FORMATS = {"gguf": common_pb2.EXPORT_FORMAT_GGUF, "onnx": common_pb2.EXPORT_FORMAT_ONNX,
           "tflite": common_pb2.EXPORT_FORMAT_TFLITE, "coreml": common_pb2.EXPORT_FORMAT_COREML}
WEIGHT_OPERATORS = {"dequantize_linear": common_pb2.ONNX_WEIGHT_OPERATOR_DEQUANTIZE_LINEAR,
                    "matmul_nbits": common_pb2.ONNX_WEIGHT_OPERATOR_MATMUL_NBITS}
PALETTE_MODES = {"kmeans": common_pb2.PALETTE_MODE_KMEANS, "uniform": common_pb2.PALETTE_MODE_UNIFORM}
TASKS = {"causal-lm": common_pb2.MODEL_TASK_CAUSAL_LM, "image-classification": common_pb2.MODEL_TASK_IMAGE_CLASSIFICATION,
         "text-embedding": common_pb2.MODEL_TASK_TEXT_EMBEDDING}
PRUNE_METHODS = {"magnitude": common_pb2.PRUNE_METHOD_MAGNITUDE, "wanda": common_pb2.PRUNE_METHOD_WANDA,
                 "sparsegpt": common_pb2.PRUNE_METHOD_SPARSEGPT, "structured": common_pb2.PRUNE_METHOD_STRUCTURED}
PRUNE_SCOPES = {"per_layer": common_pb2.PRUNE_SCOPE_PER_LAYER, "global": common_pb2.PRUNE_SCOPE_GLOBAL}
STRUCTURED_UNITS = {"neurons": common_pb2.STRUCTURED_UNIT_NEURONS, "heads": common_pb2.STRUCTURED_UNIT_HEADS}
OBJECTIVES = {"best_quality": coordinator_pb2.OBJECTIVE_BEST_QUALITY,
              "lowest_latency": coordinator_pb2.OBJECTIVE_LOWEST_LATENCY, "smallest": coordinator_pb2.OBJECTIVE_SMALLEST}
METHODS = {"none": common_pb2.QUANT_METHOD_NONE, "rtn": common_pb2.QUANT_METHOD_RTN,
           "imatrix": common_pb2.QUANT_METHOD_IMATRIX, "gptq": common_pb2.QUANT_METHOD_GPTQ,
           "awq": common_pb2.QUANT_METHOD_AWQ}
SCALES = {"minmax": common_pb2.SCALE_SEARCH_MINMAX, "percentile": common_pb2.SCALE_SEARCH_PERCENTILE,
          "mse": common_pb2.SCALE_SEARCH_MSE}
GRANULARITIES = {"per_tensor": common_pb2.GRANULARITY_PER_TENSOR, "per_channel": common_pb2.GRANULARITY_PER_CHANNEL,
                 "per_group": common_pb2.GRANULARITY_PER_GROUP}


@dataclasses.dataclass
class SpecFile:
    """A parsed spec: the proto (artifact fields empty) and the local files to upload into them."""
    spec: coordinator_pb2.BuildSpec
    model_path: Path
    calibration_path: Path | None
    evaluation_path: Path
    training_path: Path | None = None


def _check_keys(section: str, field: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise SpecError(field or "spec", f"must be a mapping, got {type(value).__name__}")
    allowed = _KEYS[section]
    for key, item in value.items():
        path = f"{field}.{key}" if field else str(key)
        if key not in allowed:
            raise SpecError(path, f"unknown key '{key}'{f' at {field}' if field else ''}"
                                  f"{_suggestion(str(key), allowed, 'allowed')}")
        expected = allowed[key]
        if isinstance(item, bool) and expected is not bool:
            raise SpecError(path, f"must be {_type_name(expected)}, got a boolean")
        if not isinstance(item, expected):
            raise SpecError(path, f"must be {_type_name(expected)}, got {type(item).__name__} {item!r}")
    return value


def _type_name(expected) -> str:
    names = {str: "a string", int: "an integer", float: "a number", dict: "a mapping", list: "a list",
             bool: "true or false"}
    if isinstance(expected, tuple):
        return "a number"
    return names[expected]


def _suggestion(value: str, known, listing: str = "") -> str:
    """" — did you mean 'quantization'?" for the closest known name (difflib ratio >= 0.6); else, with
    `listing`, " (allowed: a, b, c)"; else nothing."""
    close = difflib.get_close_matches(value, [str(k) for k in known], n=1, cutoff=0.6)
    if close:
        return f" — did you mean '{close[0]}'?"
    return f" ({listing}: {', '.join(map(str, known))})" if listing else ""


def _choice(table, value: str, field: str):
    """table[value] of a mapping of names (or the value itself from a tuple of names); a name not in it is a
    SpecError listing the names, with the closest as a suggestion."""
    if not isinstance(value, str) or value not in table:
        raise SpecError(field, f"'{value}' is not one of {', '.join(table)}{_suggestion(str(value), table)}")
    return table[value] if isinstance(table, dict) else value


def _positive(value: int | float | None, field: str, upper: float | None = None, lower: float | None = None):
    """Checks value > 0 (or >= lower when given) and <= upper."""
    if value is None:
        return value
    if not math.isfinite(value):                 # YAML's .nan and .inf are floats too
        raise SpecError(field, f"must be a finite number, got {value}")
    if upper is None and isinstance(value, int) and value > INT64_MAX:    # proto fields are 64-bit at most
        raise SpecError(field, f"must fit in 64 bits (at most {INT64_MAX}), got {value}")
    too_low = value < lower if lower is not None else value <= 0
    if too_low or (upper is not None and value > upper):
        low = f"[{lower:g}" if lower is not None else "(0"
        raise SpecError(field, f"must be in {low}, {upper:g}], got {value}" if upper else
                        f"must be positive, got {value}")
    return value


def _file(base: Path, value: str | None, field: str) -> Path:
    if not value:
        raise SpecError(field, "is required")
    path = (base / value).resolve()
    if not path.exists():
        raise SpecError(field, f"{path} does not exist")
    return path


def quantization(raw: dict, field: str, export_format: str) -> common_pb2.QuantizationConfig:
    raw = _check_keys("quantization", field, raw)
    if raw.get("type"):
        _choice((*GGUF_TYPES, *FLOAT_TYPES), raw["type"], f"{field}.type")
    method = raw.get("method", "rtn" if "bits" in raw or raw.get("type", "") not in FLOAT_TYPES else "none")
    proto = common_pb2.QuantizationConfig(
        method=_choice(METHODS, method, f"{field}.method"), gguf_type=raw.get("type", ""), bits=raw.get("bits", 0),
        granularity=_choice(GRANULARITIES, raw["granularity"], f"{field}.granularity") if "granularity" in raw else 0,
        group_size=raw.get("group_size", 0), symmetric=raw.get("symmetric", True),
        scale=_choice(SCALES, raw["scale"], f"{field}.scale") if "scale" in raw else 0,
        percentile=float(raw.get("percentile", 0)))
    if "gptq" in raw:
        gptq = _check_keys("gptq", f"{field}.gptq", raw["gptq"])
        proto.gptq.CopyFrom(common_pb2.GptqOptions(damp_percent=float(gptq.get("damp_percent", 0)),
                                                   block_size=gptq.get("block_size", 0)))
        for key in ("act_order", "sequential"):
            if key in gptq:
                setattr(proto.gptq, key, gptq[key])
    if "awq" in raw:
        awq = _check_keys("awq", f"{field}.awq", raw["awq"])
        proto.awq.CopyFrom(common_pb2.AwqOptions(grid=awq.get("grid", 0)))
        if "clip" in awq:
            proto.awq.clip = awq["clip"]
    if "mixed_precision" in raw:
        mixed = _check_keys("mixed_precision", f"{field}.mixed_precision", raw["mixed_precision"])
        proto.mixed_precision.options.extend(str(option) for option in mixed.get("options", []))
        proto.mixed_precision.max_bits_per_weight = float(mixed.get("max_bits_per_weight", 0))
    try:
        config = quantization_from_proto(proto)
    except InvalidArgument as error:
        raise SpecError(error.field.replace("quantization", field) if error.field else field, error.message)
    if export_format == "onnx" and config.gguf_type in GGUF_TYPES:
        raise SpecError(f"{field}.type", f"{config.gguf_type} is a GGUF block type; for onnx give bits/granularity")
    if export_format == "gguf" and config.grid() is not None and not config.gguf_type:
        raise SpecError(field, f"grid {config.grid().name} is not a llama.cpp block type; for gguf name one with "
                               f"type ({', '.join(GGUF_TYPES)})")
    return proto


def export_options(raw: dict, field: str) -> common_pb2.ExportOptions:
    """The candidate's `export:` block (docs/SPEC.md), checked like the server will."""
    raw = _check_keys("export", field, raw)
    proto = common_pb2.ExportOptions(float_type=raw.get("float_type", ""),
                                     int8_activations=raw.get("int8_activations", False),
                                     external_data=raw.get("external_data", False))
    if "onnx_weight_operator" in raw:
        proto.onnx_weight_operator = _choice(WEIGHT_OPERATORS, raw["onnx_weight_operator"],
                                             f"{field}.onnx_weight_operator")
    if "coreml" in raw:
        coreml = _check_keys("coreml", f"{field}.coreml", raw["coreml"])
        proto.coreml.CopyFrom(common_pb2.CoremlOptions(
            palette_bits=coreml.get("palette_bits", 0), palette_group_size=coreml.get("palette_group_size", 0),
            sparsity=float(coreml.get("sparsity", 0)), deployment_target=coreml.get("deployment_target", "")))
        if "palette_mode" in coreml:
            proto.coreml.palette_mode = _choice(PALETTE_MODES, coreml["palette_mode"], f"{field}.coreml.palette_mode")
    if proto.float_type and proto.float_type not in FLOAT_TYPES:
        raise SpecError(f"{field}.float_type", f"must be one of {', '.join(FLOAT_TYPES)}, got {proto.float_type!r}"
                                               f"{_suggestion(proto.float_type, FLOAT_TYPES)}")
    if not 0 <= proto.coreml.palette_bits <= 8:
        raise SpecError(f"{field}.coreml.palette_bits", f"must be in [0, 8], got {proto.coreml.palette_bits}")
    if not 0 <= proto.coreml.sparsity < 1:
        raise SpecError(f"{field}.coreml.sparsity", f"must be in [0, 1), got {proto.coreml.sparsity}")
    if proto.coreml.palette_group_size < 0:
        raise SpecError(f"{field}.coreml.palette_group_size", "must not be negative")
    return proto


def parse(raw: Any, base_dir: Path) -> SpecFile:
    """The BuildSpec of a spec file's YAML; SpecError names the first bad field. Any value a proto field
    cannot hold (a range or type the checks above missed) is a SpecError too, never a crash."""
    try:
        return _parse(raw, base_dir)
    except SpecError:
        raise
    except (ValueError, TypeError, OverflowError) as error:
        raise SpecError("spec", f"a value does not fit its field: {error}") from error


def _parse(raw: Any, base_dir: Path) -> SpecFile:
    raw = _check_keys("", "", raw)
    spec = coordinator_pb2.BuildSpec(display_name=raw.get("name", ""))
    model = _check_keys("model", "model", raw.get("model") or {})
    model_path = _file(base_dir, model.get("path"), "model.path")
    spec.model.task = _choice(TASKS, model.get("task", "causal-lm"), "model.task")
    calibration = _check_keys("calibration", "calibration", raw.get("calibration") or {})
    # Image and encoder models need calibration data only for wanda/sparsegpt/structured steps (the
    # coordinator says so when one is missing); a causal LM always has some.
    calibration_path = None
    if calibration or spec.model.task == common_pb2.MODEL_TASK_CAUSAL_LM:
        calibration_path = _data_file(base_dir, calibration, "calibration")
    spec.calibration.samples = _positive(calibration.get("samples", 128), "calibration.samples", 4096)
    spec.calibration.sequence_length = _positive(calibration.get("sequence_length", 512),
                                                 "calibration.sequence_length", 8192, lower=8)
    evaluation = _check_keys("evaluation", "evaluation", raw.get("evaluation") or {})
    evaluation_path = _data_file(base_dir, evaluation, "evaluation")
    if "max_samples" in evaluation:
        spec.evaluation.max_samples = _positive(evaluation["max_samples"], "evaluation.max_samples", 1_000_000)
    training_path = None
    if raw.get("training"):
        training_path = _data_file(base_dir, _check_keys("training", "training", raw["training"]), "training")
    spec.evaluation.max_tokens = _positive(evaluation.get("max_tokens", 4096), "evaluation.max_tokens")
    spec.evaluation.window_tokens = _positive(evaluation.get("window_tokens", 512), "evaluation.window_tokens", 8192,
                                              lower=2)
    targets = raw.get("targets") or []
    if not targets:
        raise SpecError("targets", "at least one target is required, e.g. [{selector: {os: linux}}]")
    for i, target in enumerate(targets):
        target = _check_keys("targets[]", f"targets[{i}]", target)
        selector = target.get("selector") or {}
        if bool(selector) == bool(target.get("device")):
            raise SpecError(f"targets[{i}]", "give exactly one of selector or device")
        proto = spec.targets.add(selector={str(k): str(v) for k, v in selector.items()},
                                 device=target.get("device", ""), name=target.get("name", ""),
                                 each_device=bool(target.get("each_device", False)))
        _constraints(target.get("constraints") or {}, proto.constraints, f"targets[{i}].constraints")
    _constraints(raw.get("constraints") or {}, spec.constraints, "constraints")
    spec.objective = _choice(OBJECTIVES, raw.get("objective", "best_quality"), "objective")
    spec.priority = int(raw.get("priority", 0))
    if not -1000 <= spec.priority <= 1000:
        raise SpecError("priority", f"must be in [-1000, 1000], got {spec.priority}")
    for i, candidate in enumerate(raw.get("candidates") or []):
        field = f"candidates[{i}]"
        candidate = _check_keys("candidates[]", field, candidate)
        export_format = candidate.get("format", "")
        proto = spec.candidates.add(id=candidate.get("id", ""), format=_choice(FORMATS, export_format, f"{field}.format"))
        if "quantization" in candidate and "recipe" in candidate:
            raise SpecError(f"{field}.recipe", "give either quantization or recipe, not both")
        if "quantization" in candidate:
            proto.quantization.CopyFrom(quantization(candidate["quantization"], f"{field}.quantization", export_format))
        for j, step in enumerate(candidate.get("recipe", [])):
            proto.recipe.append(quantization(step, f"{field}.recipe[{j}]", export_format))
        if "export" in candidate:
            proto.export.CopyFrom(export_options(candidate["export"], f"{field}.export"))
        if "steps" in candidate:
            if "quantization" in candidate or "recipe" in candidate:
                raise SpecError(f"{field}.steps", "give steps (ending in a quantize step) instead of quantization/recipe")
            proto.steps.extend(_step(step, f"{field}.steps[{j}]", export_format)
                               for j, step in enumerate(candidate["steps"]))
    benchmark = _check_keys("benchmark", "benchmark", raw.get("benchmark") or {})
    for key, upper in (("prompt_tokens", 8192), ("generation_tokens", 8192), ("warmup_runs", 100),
                       ("timed_runs", 1000), ("threads", 1024), ("throughput_generation_tokens", 8192),
                       ("throughput_runs", 1000)):
        if key in benchmark:
            setattr(spec.benchmark, key, _positive(benchmark[key], f"benchmark.{key}", upper))
    for key, upper in (("min_duration_ms", 3_600_000), ("max_cv_pct", 1000), ("cv_repeats", 100),
                       ("cooldown_ms", 600_000)):               # zero is meaningful: off
        if key in benchmark:
            setattr(spec.benchmark, key, _positive(benchmark[key], f"benchmark.{key}", upper, lower=0))
    for j, tokens in enumerate(benchmark.get("throughput_prompt_tokens", [])):
        spec.benchmark.throughput_prompt_tokens.append(
            _positive(tokens, f"benchmark.throughput_prompt_tokens[{j}]", 32768))
    spec.benchmark.skip_throughput = bool(benchmark.get("skip_throughput", False))
    return SpecFile(spec, model_path, calibration_path, evaluation_path, training_path)


def _data_file(base: Path, section: dict, name: str) -> Path:
    """`file:` (any dataset: text, .npz images, .json sentences) or its older spelling `text_file:`."""
    if "file" in section and "text_file" in section:
        raise SpecError(f"{name}.file", "give file or text_file, not both")
    key = "file" if "file" in section else "text_file"
    return _file(base, section.get(key), f"{name}.{key}")


def _training(raw: dict, field: str) -> common_pb2.TrainingConfig:
    raw = _check_keys("training_config", field, raw)
    return common_pb2.TrainingConfig(
        steps=_positive(raw.get("steps", 200), f"{field}.steps", 100_000),
        batch_size=_positive(raw["batch_size"], f"{field}.batch_size", 4096) if "batch_size" in raw else 0,
        learning_rate=float(_positive(raw["learning_rate"], f"{field}.learning_rate", 1.0))
        if "learning_rate" in raw else 0.0, seed=int(raw.get("seed", 0)))


def _step(raw: dict, field: str, export_format: str) -> common_pb2.CompressionStep:
    """One pipeline step: exactly one of prune, distill, qat, quantize (docs/SPEC.md "Pipelines")."""
    raw = _check_keys("steps[]", field, raw)
    if len(raw) != 1:
        raise SpecError(field, f"give exactly one of prune, distill, qat, quantize; got {', '.join(raw) or 'none'}")
    (kind, body), = raw.items()
    body = body or {}
    where = f"{field}.{kind}"
    if kind == "quantize":
        return common_pb2.CompressionStep(quantize=quantization(body, where, export_format))
    if kind == "qat":
        body = _check_keys("qat", where, body)
        proto = common_pb2.QatConfig(activations=body.get("activations", False),
                                     training=_training(body.get("training") or {}, f"{where}.training"))
        if "quantization" not in body:
            raise SpecError(f"{where}.quantization", "is required (the grid trained for)")
        proto.quantization.CopyFrom(quantization(body["quantization"], f"{where}.quantization", export_format))
        return common_pb2.CompressionStep(qat=proto)
    if kind == "distill":
        body = _check_keys("distill", where, body)
        proto = common_pb2.DistillConfig(temperature=float(_positive(body.get("temperature", 4), f"{where}.temperature",
                                                                     100)),
                                         training=_training(body.get("training") or {}, f"{where}.training"))
        if "alpha" in body:
            proto.alpha = float(_positive(body["alpha"], f"{where}.alpha", 1.0, lower=0))
        return common_pb2.CompressionStep(distill=proto)
    body = _check_keys("prune", where, body)
    proto = common_pb2.PruneConfig(method=_choice(PRUNE_METHODS, body.get("method", ""), f"{where}.method"),
                                   sparsity=float(body.get("sparsity", 0)), n=body.get("n", 0), m=body.get("m", 0),
                                   schedule=[float(v) for v in body.get("schedule", [])])
    if not 0 <= proto.sparsity < 1:
        raise SpecError(f"{where}.sparsity", f"must be in [0, 1), got {proto.sparsity}")
    if "scope" in body:
        proto.scope = _choice(PRUNE_SCOPES, body["scope"], f"{where}.scope")
    if "unit" in body:
        proto.unit = _choice(STRUCTURED_UNITS, body["unit"], f"{where}.unit")
    if "finetune" in body:
        proto.finetune.CopyFrom(_training(body["finetune"] or {}, f"{where}.finetune"))
    return common_pb2.CompressionStep(prune=proto)


def _constraints(raw: dict, proto: coordinator_pb2.Constraints, field: str) -> None:
    raw = _check_keys("constraints", field, raw)
    for key in ("max_size_bytes", "max_p90_latency_ms", "max_quality_loss_pct", "max_peak_memory_bytes"):
        if key in raw:
            setattr(proto, key, _positive(raw[key], f"{field}.{key}"))


def load(path: Path) -> SpecFile:
    """Parses a spec file with yaml.safe_load (no tags that build Python objects), at most MAX_SPEC_BYTES."""
    import yaml
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError("spec", f"{path.name} is {size} bytes; a spec file is at most {MAX_SPEC_BYTES} bytes")
        loader = yaml.SafeLoader(path.read_text())
        try:
            node = loader.get_single_node()               # the node tree keeps each value's line
            raw = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise SpecError("spec", f"{path.name} is not valid YAML: {error}")
    except RecursionError:                      # PyYAML parses nested collections recursively
        raise SpecError("spec", f"{path.name} is not valid YAML: it is nested too deeply")
    except UnicodeDecodeError as error:
        raise SpecError("spec", f"{path.name} is not UTF-8 text (byte {error.start}: {error.reason})")
    except OSError as error:
        raise SpecError("spec", f"cannot read {path}: {error.strerror}")
    try:
        return parse(raw, path.parent)
    except SpecError as error:
        error.line = line_of(node, error.field)
        raise


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def line_of(node, field: str) -> int | None:
    """The 1-based line of `field` ("candidates[0].quantization.type") in a YAML node tree: of its key when
    it is a mapping key (an unknown key's own line), else of the deepest part of the path that exists."""
    import yaml
    line = None
    for name, index in _PATH_PART.findall(field):
        if isinstance(node, yaml.SequenceNode) and index and int(index) < len(node.value):
            node = node.value[int(index)]
            line = node.start_mark.line + 1
        elif isinstance(node, yaml.MappingNode) and name:
            entry = next(((key, value) for key, value in node.value if getattr(key, "value", None) == name), None)
            if entry is None:
                break
            line, node = entry[0].start_mark.line + 1, entry[1]
        else:
            break
    return line
