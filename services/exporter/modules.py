"""Export and evaluation of module bundles — image classifiers and text encoders (shared/models/modules.py)
— to ONNX, TFLite and Core ML, each file validated in its own runtime before it is stored.

Weights: an optional grid (ExportRequest.quantization, round-to-nearest only) rounds the weight of every
Linear and Conv layer (rows = output channels, columns = the rest flattened) with the compressor's RTN
(services/compressor/quant/rtn.py); each format carries those codes as it can: ONNX as DequantizeLinear
over them (onnx_module.py), TFLite as int8 weights of its hybrid kernels (tflite.py), Core ML as
constexpr_blockwise_shift_scale (coreml.py). Embeddings, norms and biases stay float.

Validation runs the file on fixed real inputs — the scikit-image photos of shared/models/vision.py
resized and centre-cropped to the model's input size (grey for 1-channel models), or the sentences of
shared/models/encoder.py — and compares its outputs with the torch module computing with the weights
the file carries (its grid's dequantized values; the float weights when there is no grid). So the
record measures the converter and the runtime, not the grid's rounding: what the grid costs against
the float model is Evaluate's number. For an ONNX-architecture bundle (model.onnx, no torch module) the
reference is the source graph in onnxruntime, its weights replaced by the same dequantized values.
The record (services/exporter/quality.ValidationResult):
- max_abs_diff, mean_abs_diff: over every output element (logits, or embedding components);
- top1_agreement: classifiers, the fraction of samples whose argmax class matches the reference's;
  encoders, the fraction of sentences whose embedding has cosine similarity ≥ MIN_COSINE to the reference;
- positions: samples compared.
A file that does not load, gives non-finite or mis-shaped outputs, or agrees on fewer than
quality.MIN_TOP1 of the samples fails validation and is never stored. Core ML packages are read back
only off macOS (Core ML prediction needs macOS): the record says so and compares nothing.

TFLite signatures have fixed shapes: a module is converted at batch 1 (images (1, C, size, size); text
(1, L) with L the model's fixed `length`, else its `max_tokens`), and runners feed samples one by one,
sentences padded to L (padding is masked, so the embedding does not change).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from services.exporter.base import ExportedFile, ExportFormat, ExportOptions, unsupported_arch, unsupported_op
from services.exporter.quality import ValidationResult
from shared.errors import FailedPrecondition, InvalidArgument
from shared.models import module_quality
from shared.models.module_data import Samples, fit_image
from shared.models.modules import IMAGE_TASK, ONNX_MODEL, LoadedModule, ModuleDir, save_module_dir
from shared.quant.grids import FLOAT_TYPES, Granularity, Grid, Method, QuantizationConfig
from shared.quant.qtensor import GgufTensor, QuantizedTensor

MODULE_FORMATS = (ExportFormat.ONNX, ExportFormat.TFLITE, ExportFormat.COREML)
EVALUATED_FORMATS = (ExportFormat.REFERENCE, ExportFormat.ONNX, ExportFormat.TFLITE)
SUFFIXES = {ExportFormat.ONNX: ".onnx", ExportFormat.TFLITE: ".tflite", ExportFormat.COREML: ".mlpackage"}
_NAMES = {ExportFormat.ONNX: "ONNX", ExportFormat.TFLITE: "TFLite", ExportFormat.COREML: "Core ML",
          ExportFormat.GGUF: "GGUF", ExportFormat.REFERENCE: "the reference"}
MIN_COSINE = 0.99                      # an encoder's sentence "agrees" when its embedding is this close
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
# The same layers in a torch.export graph (an ExportedProgram's module has no nn.Linear children).
WEIGHT_OPS = ("aten.linear.default", "aten.conv1d.default", "aten.conv2d.default", "aten.convolution.default")


@dataclasses.dataclass(frozen=True)
class ModuleExport:
    """A validated file and what proved it."""
    exported: ExportedFile
    validation: ValidationResult
    reference: str                     # what the validation compared with
    inputs: str                        # the validation inputs
    package: dict[str, Any]            # the format's read-back record (Core ML), else {}


# ---------------------------------------------------------------- checks (cheap, before any slow work)

def weight_grid(config: QuantizationConfig | None) -> Grid | None:
    """The grid of ExportRequest.quantization for a module bundle; None keeps float weights."""
    if config is None or (config.method is Method.NONE and not config.gguf_type):
        return None
    if config.gguf_type in FLOAT_TYPES:
        raise InvalidArgument(f"quantization.type {config.gguf_type} is a float type: a module bundle's float "
                              "storage is options.float_type", field="quantization.type")
    if config.method is not Method.RTN:
        raise unsupported_op("module export", f"{config.method.value} quantization: the exporter rounds module "
                                              "weights to nearest (method rtn); calibrated methods are the "
                                              "compressor's, for LMs")
    if config.mixed is not None:
        raise unsupported_op("module export", "mixed precision: one grid for every weight")
    return config.grid()


def check(module_dir: ModuleDir, export_format: ExportFormat, options: ExportOptions, grid: Grid | None) -> None:
    """FailedPrecondition (UNSUPPORTED_ARCH / UNSUPPORTED_OP) for what `export_format` cannot do with this
    module bundle, options and grid — from the manifest and the options alone."""
    from shared.models.decoder_config import ARCHITECTURES
    if export_format is ExportFormat.GGUF:
        raise unsupported_arch("GGUF", module_dir.architecture, ARCHITECTURES)
    if export_format not in MODULE_FORMATS:
        raise InvalidArgument(f"format {export_format.value} cannot be exported", field="format")
    if module_dir.architecture == "onnx" and export_format is not ExportFormat.ONNX:
        raise unsupported_op(_NAMES[export_format], "an ONNX-architecture module bundle: it has no torch module to "
                                                    "convert (export it to ONNX, or import the model as an "
                                                    "ExportedProgram)")
    if options.int8_activations:
        raise unsupported_op(_NAMES[export_format], "int8 activations of a module bundle: the exporter quantizes "
                                                    "module weights only (give a weight grid in quantization)")
    if export_format is ExportFormat.ONNX:
        from services.exporter.formats.onnx_module import check_module_options
        check_module_options(options, grid)
    elif export_format is ExportFormat.TFLITE:
        from services.exporter.formats import tflite
        tflite.check_options(options, decoder=False, calibrated=False)
        if grid is not None:
            tflite.check_grid("the module's weights", grid)
    else:
        from services.exporter.formats import coreml
        from services.exporter.formats.coreml_weights import unsupported_grid
        coreml.check_options(options, quantized=grid is not None)
        reason = unsupported_grid(grid) if grid is not None else None
        if reason:
            raise unsupported_op("Core ML", reason)


def _check_layers(loaded: LoadedModule, export_format: ExportFormat, grid: Grid | None) -> None:
    if export_format is ExportFormat.ONNX and grid is not None and grid.granularity is Granularity.PER_GROUP:
        convolutions = [m for m in loaded.module.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        if convolutions or any(str(n.target).startswith("aten.conv") for n in _graph_calls(loaded.module)):
            raise unsupported_op("ONNX module export", "a per-group grid on Conv weights (their rows span "
                                                       "in·kh·kw; use per_channel)")


# ---------------------------------------------------------------- weights on a grid

def _graph_calls(module: nn.Module) -> list:
    if not isinstance(module, torch.fx.GraphModule):
        return []
    return [node for node in module.graph.nodes if node.op == "call_function"]


def weight_names(module: nn.Module) -> list[str]:
    """Parameter names of the Linear and Conv weights of `module` (nn layers, or for an ExportedProgram's
    graph the weights its aten.linear / aten.conv calls read), without weights tied to an embedding."""
    embedded = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    parameters = dict(module.named_parameters())
    names = [f"{name}.weight" if name else "weight" for name, layer in module.named_modules()
             if isinstance(layer, WEIGHT_LAYERS)]
    names += [node.args[1].target for node in _graph_calls(module)
              if str(node.target) in WEIGHT_OPS and getattr(node.args[1], "op", "") == "get_attr"]
    return [name for name in dict.fromkeys(names) if name in parameters and id(parameters[name]) not in embedded]


def grid_weights(module: nn.Module, grid: Grid) -> dict[str, QuantizedTensor | GgufTensor]:
    """RTN codes of every Linear/Conv weight of `module` on `grid`, as (out, prod(rest)), by parameter name."""
    from services.compressor.quant.rtn import quantize
    parameters = dict(module.named_parameters())
    out = {}
    for name in weight_names(module):
        weight = parameters[name].detach().float()
        matrix = np.ascontiguousarray(weight.reshape(weight.shape[0], -1).numpy())
        grid.check_shape(*matrix.shape, tensor=name)
        out[name] = quantize(matrix, grid)
    return out


def with_weights(module: nn.Module, weights: dict[str, QuantizedTensor]) -> nn.Module:
    """A copy of `module` computing with the dequantized `weights`: what the exported file computes."""
    module = copy.deepcopy(module)
    parameters = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            parameter = parameters[name]
            parameter.copy_(torch.from_numpy(tensor.dequantize()).reshape(parameter.shape))
    return module


# ---------------------------------------------------------------- validation inputs and comparison

def validation_samples(module_dir: ModuleDir) -> tuple[Samples, str]:
    """The fixed real inputs every export of this task is checked on, and their description."""
    if module_dir.task == IMAGE_TASK:
        import skimage.data

        from shared.models.vision import PHOTOS
        size = module_dir.input["image"]["size"]
        photos = np.stack([fit_image(np.ascontiguousarray(getattr(skimage.data, name)()[..., :3]), size)
                           for name in PHOTOS])                                       # (N, size, size, 3) uint8
        return Samples(images=photos), f"{len(PHOTOS)} scikit-image photos ({', '.join(PHOTOS)})"
    from shared.models.encoder import VALIDATION_SENTENCES
    return Samples(sentences=list(VALIDATION_SENTENCES)), \
        f"{len(VALIDATION_SENTENCES)} sentences (shared/models/encoder.py VALIDATION_SENTENCES)"


def compare(task: str, actual: np.ndarray, expected: np.ndarray, runtime: str) -> ValidationResult:
    """The validation record of outputs `actual` against the reference's `expected`, both (N, …)."""
    if actual.shape != expected.shape:
        raise FailedPrecondition(f"{runtime} returned outputs of shape {actual.shape}, expected {expected.shape}",
                                 reason="VALIDATION_FAILED")
    if not np.isfinite(actual).all():
        raise FailedPrecondition(f"{runtime} produced NaN/Inf outputs", reason="VALIDATION_FAILED")
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    diff = np.abs(actual - expected)
    rows_actual, rows_expected = actual.reshape(len(actual), -1), expected.reshape(len(expected), -1)
    if task == IMAGE_TASK:
        agree = rows_actual.argmax(-1) == rows_expected.argmax(-1)
    else:
        norms = np.linalg.norm(rows_actual, axis=-1) * np.linalg.norm(rows_expected, axis=-1)
        agree = (rows_actual * rows_expected).sum(-1) / np.maximum(norms, 1e-30) >= MIN_COSINE
    return ValidationResult(runtime, float(diff.max()), float(diff.mean()), float(agree.mean()), int(agree.size))


def runtime_name(export_format: ExportFormat) -> str:
    from importlib import metadata
    if export_format is ExportFormat.ONNX:
        return f"onnxruntime@{metadata.version('onnxruntime')}"
    if export_format is ExportFormat.TFLITE:
        return f"ai-edge-litert@{metadata.version('ai-edge-litert')}"
    return f"torch@{torch.__version__}"


# ---------------------------------------------------------------- export

def export(module_dir: ModuleDir, export_format: ExportFormat, options: ExportOptions, grid: Grid | None,
           out_path: Path) -> ModuleExport:
    """Writes the module bundle in `export_format` at `out_path` (a scratch path) and validates the file;
    FailedPrecondition VALIDATION_FAILED when it fails (the caller then stores nothing)."""
    check(module_dir, export_format, options, grid)
    samples, described = validation_samples(module_dir)
    inputs = module_dir.prepare(samples)
    if module_dir.architecture == "onnx":
        return _export_onnx_source(module_dir, options, grid, out_path, inputs, described)
    loaded = exportable(module_dir.load())
    _check_layers(loaded, export_format, grid)
    weights = grid_weights(loaded.module, grid) if grid is not None else {}
    reference = f"the torch module with {'its ' + grid.name if grid else 'float32'} weights"
    if export_format is ExportFormat.COREML:
        from services.exporter.formats.coreml import MACOS_ONLY
        exported = _converted(export_format, module_dir, lambda: _export_coreml(loaded, options, weights, out_path))
        why = MACOS_ONLY if sys.platform != "darwin" else "no Core ML runner for module bundles is wired"
        result = ValidationResult(f"coreml: read back only ({why})", math.nan, math.nan, math.nan, 0)
        return ModuleExport(exported, result, reference, described, exported.provenance["validation"])
    expected = reference_outputs(module_dir, loaded, weights, inputs, out_path.parent)
    if export_format is ExportFormat.ONNX:
        exported = _converted(export_format, module_dir,
                              lambda: _export_onnx(loaded, options, grid, len(weights), out_path))
    else:
        exported = _converted(export_format, module_dir,
                              lambda: _export_tflite(module_dir, loaded, options, weights, out_path))
    actual = module_quality.runner(export_format.value, exported.path, module_dir)(inputs)
    result = _validated(module_dir.task, export_format, actual, expected, reference)
    return ModuleExport(exported, result, reference, described, {})


def reference_outputs(module_dir: ModuleDir, loaded: LoadedModule, weights: dict[str, QuantizedTensor],
                      inputs: dict[str, np.ndarray], scratch: Path) -> np.ndarray:
    """The reference runner's outputs on `inputs` for the bundle with its weights replaced by `weights`'
    dequantized values (saved beside the export in `scratch`): what the file should compute."""
    if not weights:
        return module_quality.runner("reference", None, module_dir)(inputs)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="on-grid-") as directory:
        on_grid = save_module_dir(with_weights(loaded.module, weights), module_dir, Path(directory) / "module")
        return module_quality.runner("reference", None, on_grid)(inputs)


def _converted(export_format: ExportFormat, module_dir: ModuleDir, convert: Callable[[], ExportedFile]) -> ExportedFile:
    """`convert()`, a converter's failure on this model's graph reported as UNSUPPORTED_OP with its message
    (torch.onnx, litert-torch and coremltools raise these plain types for ops they cannot convert)."""
    try:
        return convert()
    except (ValueError, RuntimeError, NotImplementedError, TypeError, AssertionError) as error:
        raise unsupported_op(_NAMES[export_format], f"this {module_dir.architecture} model: its converter failed "
                                                    f"({type(error).__name__}: {str(error)[:300]})") from error


def exportable(loaded: LoadedModule) -> LoadedModule:
    """`loaded` with a module the format libraries can call .eval() on: an ExportedProgram's graph
    refuses .train()/.eval() (its mode was fixed when it was exported), so there they do nothing."""
    module = loaded.module
    if isinstance(module, torch.fx.GraphModule):
        module.train = types.MethodType(lambda self, mode=True: self, module)
        module.eval = types.MethodType(lambda self: self, module)
    return loaded


def _validated(task: str, export_format: ExportFormat, actual: np.ndarray, expected: np.ndarray,
               reference: str) -> ValidationResult:
    """compare(); FailedPrecondition VALIDATION_FAILED unless the file passed."""
    result = compare(task, np.asarray(actual), expected, runtime_name(export_format))
    if not result.passed:
        raise FailedPrecondition(
            f"{export_format.value} file failed validation in {result.runtime} against {reference}: agreement "
            f"{result.top1_agreement:.2f} over {result.positions} samples, max |Δ| {result.max_abs_diff:.3g}",
            reason="VALIDATION_FAILED")
    return result


def _export_onnx(loaded: LoadedModule, options: ExportOptions, grid: Grid | None, expected_weights: int,
                 out_path: Path) -> ExportedFile:
    from services.exporter.formats.onnx_module import export_module
    exported = export_module(loaded.module, loaded.example_inputs, loaded.input_names, loaded.output_names,
                             loaded.dynamic_axes, options, out_path, weight_grid=grid)
    quantized = exported.provenance["weights_quantized"]
    if grid is not None and quantized != expected_weights:
        # The graph's weights and the module's layers no longer correspond (e.g. a weight the exporter
        # shared between two ops stays float): the torch reference would not compute like the file.
        raise FailedPrecondition(f"the ONNX graph holds {quantized} weights on {grid.name}, the module has "
                                 f"{expected_weights} Linear/Conv weights", reason="VALIDATION_FAILED")
    return exported


def tflite_example(module_dir: ModuleDir, loaded: LoadedModule) -> tuple[torch.Tensor, ...]:
    """Batch-1 inputs at the file's fixed shape: one image, or one sentence padded to L tokens."""
    if module_dir.task == IMAGE_TASK:
        return tuple(x[:1] for x in loaded.example_inputs)
    text = module_dir.input["text"]
    length = text.get("length") or text["max_tokens"]
    arrays = {name: np.zeros((1, length), dtype=np.int64) for name in loaded.input_names}
    arrays["attention_mask"][0, :2] = 1
    return tuple(torch.from_numpy(arrays[name]) for name in loaded.input_names)


def _export_tflite(module_dir: ModuleDir, loaded: LoadedModule, options: ExportOptions,
                   weights: dict[str, QuantizedTensor], out_path: Path) -> ExportedFile:
    from services.exporter.formats import tflite
    return tflite.export_module(loaded.module, tflite_example(module_dir, loaded), options, out_path,
                                weights=weights or None)


def _export_coreml(loaded: LoadedModule, options: ExportOptions, weights: dict[str, QuantizedTensor],
                   out_path: Path) -> ExportedFile:
    from services.exporter.formats import coreml
    module = copy.deepcopy(loaded.module)                 # export_module overwrites carried parameters
    examples = {name: x[:1] for name, x in zip(loaded.input_names, loaded.example_inputs)}
    return coreml.export_module(module, examples, options, out_path, weights=weights,
                                output_names=tuple(loaded.output_names))


# ---------------------------------------------------------------- ONNX-architecture bundles

def _export_onnx_source(module_dir: ModuleDir, options: ExportOptions, grid: Grid | None, out_path: Path,
                        inputs: dict[str, np.ndarray], described: str) -> ModuleExport:
    """The bundle's own graph at opset 21, its weights on `grid`, validated against the source graph
    (its weights replaced by the dequantized values) in onnxruntime."""
    import onnx
    from onnx import version_converter

    from services.exporter.formats.onnx_module import OPSET, check_module_options, write_variant
    check_module_options(options, grid)
    source = module_dir.path / ONNX_MODEL
    from shared.untrusted import load_onnx
    model = load_onnx(source)                # size, no external data, standard domains, onnx.checker
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    if opset != OPSET:
        try:
            model = version_converter.convert_version(model, OPSET)
        except Exception as error:        # the converter raises its own untyped errors per op adapter
            raise unsupported_op("ONNX", f"the source graph at opset {OPSET} (converting from {opset} "
                                         f"failed: {error})") from error
    exported = write_variant(model, f"source ONNX graph ({source.name}, opset {opset} → {OPSET})", options,
                             out_path, weight_grid=grid)
    with tempfile.TemporaryDirectory() as scratch:
        reference_path = Path(scratch) / "reference.onnx"
        onnx.save_model(dequantized_graph(exported.path), str(reference_path))
        expected = np.asarray(module_quality.runner("onnx", reference_path, module_dir)(inputs))
    actual = module_quality.runner("onnx", exported.path, module_dir)(inputs)
    reference = f"the source ONNX graph in onnxruntime with {'its ' + grid.name if grid else 'float32'} weights"
    result = _validated(module_dir.task, ExportFormat.ONNX, actual, expected, reference)
    return ModuleExport(exported, result, reference, described, {})


def dequantized_graph(path: Path):
    """The ONNX model at `path` with every DequantizeLinear of constant inputs replaced by a float
    initializer holding its output (computed by onnxruntime's DequantizeLinear alone): the float graph
    that computes with the same weights."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from services.exporter.formats.onnx import model_file
    model = onnx.load(str(model_file(Path(path))))
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "DequantizeLinear" and all(i in constants for i in n.input if i)]
    if not nodes:
        return model
    used = {i for n in nodes for i in n.input if i}
    outputs = [helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes]
    alone = helper.make_model(helper.make_graph(nodes, "dequantize", [], outputs,
                                                [constants[name] for name in used]),
                              opset_imports=model.opset_import, ir_version=model.ir_version)
    session = ort.InferenceSession(alone.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(None, {})
    replaced = {n.output[0] for n in nodes}
    kept = [n for n in graph.node if not (n.op_type == "DequantizeLinear" and n.output[0] in replaced)]
    del graph.node[:]
    graph.node.extend(kept)
    still_read = {i for n in kept for i in n.input}
    for tensor in [t for t in graph.initializer if t.name in used and t.name not in still_read]:
        graph.initializer.remove(tensor)
    graph.initializer.extend(numpy_helper.from_array(value, node.output[0]) for node, value in zip(nodes, values))
    return model


# ---------------------------------------------------------------- evaluation

def check_evaluation(export_format: ExportFormat) -> None:
    """UNSUPPORTED_OP for a format module bundles are not evaluated in."""
    if export_format not in EVALUATED_FORMATS:
        why = "Core ML prediction needs macOS, and no Core ML runner is wired" \
            if export_format is ExportFormat.COREML else "it holds decoder LMs only"
        raise unsupported_op(f"{_NAMES[export_format]} evaluation", f"a module bundle ({why})")


def evaluate(export_format: ExportFormat, path: Path, module_dir: ModuleDir, reference_dir: ModuleDir,
             samples: Samples, max_samples: int) -> tuple[dict, str]:
    """module_quality.evaluate of the file (or for REFERENCE the bundle) at `path` against the float
    model `reference_dir` on `samples`. Returns (the evaluation, the runtime that computed it)."""
    check_evaluation(export_format)
    if reference_dir.task != module_dir.task:
        raise InvalidArgument(f"the reference model is a {reference_dir.task} model, the evaluated one a "
                              f"{module_dir.task} model", field="tokenizer_model")
    run = module_quality.runner(export_format.value, path, module_dir)
    reference_run = module_quality.runner(ExportFormat.REFERENCE.value, reference_dir.path, reference_dir)
    result = module_quality.evaluate(module_dir.task, run, reference_run, module_dir, samples, max_samples or None)
    return result, runtime_name(export_format)
