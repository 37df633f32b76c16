"""TFLite export through litert-torch and ai-edge-quantizer (no TensorFlow), validated with ai-edge-litert.

Two entry points share one pipeline (`tflite_graph.convert` → `tflite_weights.rewrite` →
optionally `tflite_weights.quantize_activations`):

- `TfliteExporter.export`: the causal LM of an ExportInput, as edgeforge's torch reference built from
  the weights the file must compute with (`ExportInput.dequantized`), converted with one signature of
  a fixed length, `sequence_tokens` (default 512, the context the exporter service validates with):
  input `args_0` int32 (1, T) token ids, output `output_0` float32 (1, T, vocab) logits of a prefill
  from an empty context. There is no KV cache; `TfliteRuntime` pads shorter sequences on the right
  (causal attention: padding never changes earlier positions).
- `export_module`: any torch module (MobileNetV2, the MiniLM encoder) at its example inputs' shapes.

Variants (ExportOptions):
- float32: as converted.
- `float_type="f16"`: float weights (rank ≥ 2) stored float16 behind DEQUANTIZE; compute stays float32.
- dynamic-range int8: weights we quantized (the LM's compressed linears on a symmetric per-channel or
  per-tensor grid; a module's `weights`) are carried as our int8 codes and scales; the interpreter's
  hybrid kernels quantize activations on the fly.
- full int8 (`int8_activations`): modules only, with calibration inputs: activations int8 from
  ranges measured by ai-edge-quantizer, the model's inputs and outputs int8 with their scales.

litert-torch replaces TensorFlow's converter here, and ai-edge-litert replaces tflite-runtime as the
interpreter: tflite-runtime 2.14 (what the design named) is built against numpy 1 and fails to import
under numpy 2 (`_ARRAY_API not found`, ASSETS.md); ai-edge-litert is its successor from the same
team. docs/ARCHITECTURE.md ("TFLite") says more.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from services.exporter.base import (ExportedFile, Exporter, ExportFormat, ExportInput, ExportOptions, unsupported_arch,
                                    unsupported_op)
from services.exporter.formats import tflite_graph, tflite_weights
from services.exporter.formats.tflite_weights import CarriedWeight, check_grid
from shared.errors import FailedPrecondition, InvalidArgument
from shared.quant.grids import Granularity, Grid
from shared.quant.qtensor import QuantizedTensor
from shared.versions import tool_versions

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/x-tflite"
SEQUENCE_TOKENS = 512
INT8_PER_CHANNEL = Grid(8, Granularity.PER_CHANNEL)
LIBRARIES = ("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "litert-converter", "torch", "numpy")


def check_options(options: ExportOptions, *, decoder: bool, calibrated: bool) -> None:
    """FailedPrecondition (UNSUPPORTED_OP) for options TFLite export cannot honour."""
    if options.float_type == "bf16":
        raise unsupported_op("TFLite", "bfloat16 weights (its float kernels take float32; float16 weights are "
                                       "stored behind DEQUANTIZE): use float_type f16 or f32")
    if options.int8_activations and decoder:
        raise unsupported_op("TFLite", "full-int8 decoders: int8 activations need the range of every activation "
                                       "(attention scores, softmax, norms, rotary), and the calibration "
                                       "statistics hold only the linears' input ranges; use dynamic-range int8")
    if options.int8_activations and not calibrated:
        raise FailedPrecondition("full int8 needs calibration inputs to measure activation ranges",
                                 reason="MISSING_CALIBRATION", field="calibration")


def module_weights(module: torch.nn.Module, grid: Grid = INT8_PER_CHANNEL) -> dict[str, QuantizedTensor]:
    """Our round-to-nearest codes (`shared.quant.codecs`) for the weight of every Linear and Conv2d in
    `module`, each as (out, prod(rest)): how a caller asks for an int8 module."""
    from shared.quant.codecs import codec_for
    from shared.quant.qtensor import assemble
    check_grid("module weights", grid)
    out = {}
    for name, parameter in module.named_parameters():
        owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        if not name.endswith("weight") or not isinstance(owner, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        rows = parameter.shape[0]
        W = parameter.detach().float().numpy().reshape(rows, -1)
        codec = codec_for(grid, W.shape[1])
        fit, codes = codec.rtn(W)
        out[name] = assemble(grid, codec, [fit], codes)
    return out


@dataclasses.dataclass
class Variant:
    """What `finish` made, for labels and provenance."""
    carried: int = 0
    weight_only: int = 0                 # of the carried, those behind DEQUANTIZE (a -128 code)
    float16_tensors: int = 0
    int8_activations: bool = False
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.int8_activations:
            return "int8-full"
        if self.carried:
            kind = "int8-weight-only" if self.weight_only == self.carried else "int8-dynamic"
            return kind + ("+f16" if self.float16_tensors else "")
        return "f16" if self.float16_tensors else "f32"


def finish(model: bytes, carried: Sequence[CarriedWeight], options: ExportOptions, out_path: Path,
           calibration: Iterable[Mapping[str, np.ndarray]] | None = None, variant: Variant | None = None) -> Variant:
    """Puts our codes into the converted flatbuffer (`tflite_weights.rewrite`), stores the other weights
    as float16 when asked, quantizes activations when asked, and writes the file."""
    variant = variant or Variant()
    started = time.perf_counter()
    model, rewrite = tflite_weights.rewrite(model, carried, float16=options.float_type == "f16")
    variant.carried, variant.float16_tensors = len(rewrite.carried), rewrite.float16_tensors
    variant.weight_only = len(rewrite.weight_only)
    variant.seconds["weights"] = time.perf_counter() - started
    if options.int8_activations:
        started = time.perf_counter()
        model = tflite_weights.quantize_activations(model, tflite_graph.SIGNATURE, calibration or ())
        variant.int8_activations = True
        variant.seconds["int8_activations"] = time.perf_counter() - started
    out_path.write_bytes(model)
    return variant


def _provenance(options: ExportOptions, variant: Variant, extra: dict[str, Any]) -> dict[str, Any]:
    return {"tflite": {"converter": "litert_torch.signature(...).convert() (default flags)",
                       "quantizer": "ai_edge_quantizer model_modifier / static a8w8 recipe",
                       "signature": tflite_graph.SIGNATURE, "variant": variant.name,
                       "carried_weights": variant.carried, "carried_weight_only": variant.weight_only,
                       "float16_weights": variant.float16_tensors,
                       "graph_rewrites": ["fold_constants", "expand_unit_repeats"],
                       "seconds": {k: round(v, 2) for k, v in variant.seconds.items()},
                       "options": options.to_dict(), **extra},
            "versions": tool_versions(*LIBRARIES)}


@dataclasses.dataclass(frozen=True)
class ConvertedModule:
    """A module converted by litert-torch (computing with our weights, if any), before `finish`."""
    flatbuffer: bytes
    carried: tuple[CarriedWeight, ...]
    input_shapes: dict[str, list[int]]
    convert_seconds: float


def convert_module(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
                   weights: Mapping[str, QuantizedTensor] | None = None) -> ConvertedModule:
    """Converts a copy of `module` whose parameters named in `weights` (name -> our quantized weight,
    e.g. `module_weights(module)`) hold their dequantized values, so the file computes with them."""
    module = copy.deepcopy(module).eval()
    carried = []
    with torch.no_grad():
        for name, tensor in (weights or {}).items():
            parameter = module.get_parameter(name)
            weight = CarriedWeight.of(name, tensor, tuple(parameter.shape))
            parameter.copy_(torch.from_numpy(weight.dequantized()))
            carried.append(weight)
    started = time.perf_counter()
    flatbuffer = tflite_graph.convert(module, example_inputs, {w.name: w for w in carried})
    return ConvertedModule(flatbuffer, tuple(carried),
                           {f"args_{i}": list(x.shape) for i, x in enumerate(example_inputs)},
                           time.perf_counter() - started)


def export_converted(converted: ConvertedModule, options: ExportOptions, out_path: Path,
                     calibration: Iterable[Sequence[torch.Tensor]] | None = None) -> ExportedFile:
    """One variant of a converted module; with `options.int8_activations`, `calibration` (input tuples
    like the example inputs) sets the activation ranges."""
    calibration = list(calibration) if calibration is not None else None
    check_options(options, decoder=False, calibrated=bool(calibration))
    if options.int8_activations and not converted.carried:
        raise InvalidArgument("full int8 needs int8 weights: convert with weights (e.g. module_weights(module))",
                              field="weights")
    feeds = None
    if calibration:
        feeds = [{f"args_{i}": _input_array(x) for i, x in enumerate(inputs)} for inputs in calibration]
    variant = finish(converted.flatbuffer, converted.carried, options, out_path, feeds,
                     Variant(seconds={"convert": converted.convert_seconds}))
    return ExportedFile(out_path, MEDIA_TYPE, {"format": "tflite", "variant": variant.name},
                        _provenance(options, variant, {"input_shapes": converted.input_shapes,
                                                       "calibration_samples": len(feeds or ())}))


def export_module(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], options: ExportOptions,
                  out_path: Path, weights: Mapping[str, QuantizedTensor] | None = None,
                  calibration: Iterable[Sequence[torch.Tensor]] | None = None) -> ExportedFile:
    """Exports `module` at the shapes of `example_inputs`: `convert_module` then `export_converted`."""
    check_options(options, decoder=False, calibrated=calibration is not None)
    return export_converted(convert_module(module, example_inputs, weights), options, out_path, calibration)


def _input_array(x: torch.Tensor) -> np.ndarray:
    """The array a converted signature takes: int64 becomes int32 (litert-torch's default)."""
    array = x.detach().numpy()
    return array.astype(np.int32) if array.dtype == np.int64 else array


def carried_llm_weights(source: ExportInput) -> list[CarriedWeight]:
    """The compressed model's quantized weights (its linears), as TFLite will hold them."""
    out = []
    for name, shape in source.model.config.tensor_shapes().items():
        if source.grid(name) is not None:
            out.append(CarriedWeight.of(name, source.compressed.read(name), shape))
    return out


class TfliteExporter(Exporter):
    format = ExportFormat.TFLITE
    suffix = ".tflite"

    def __init__(self, sequence_tokens: int = SEQUENCE_TOKENS):
        self.sequence_tokens = sequence_tokens

    def check(self, source: ExportInput) -> None:
        from shared.models.decoder_config import ARCHITECTURES
        config = source.model.config
        if config.architecture not in ARCHITECTURES:
            raise unsupported_arch("TFLite", config.architecture, ARCHITECTURES)
        check_options(source.options, decoder=True, calibrated=source.activations is not None)
        if self.sequence_tokens > config.max_position_embeddings:
            raise unsupported_op("TFLite", f"a {self.sequence_tokens}-token signature for a model of "
                                           f"{config.max_position_embeddings} positions")
        if source.compressed is not None:
            for plan in source.compressed.plans:
                if plan.grid is not None:
                    check_grid(plan.name, plan.grid)

    def export(self, source: ExportInput, out_path: Path) -> ExportedFile:
        from shared.models.llama import build_reference
        self.check(source)
        started = time.perf_counter()
        carried = carried_llm_weights(source)
        model = build_reference(source.model.config, lambda name: torch.from_numpy(source.dequantized(name)))
        tokens = torch.zeros((1, self.sequence_tokens), dtype=torch.int64)
        flatbuffer = tflite_graph.convert(model, (tokens,), {w.name: w for w in carried})
        del model
        variant = Variant(seconds={"convert": time.perf_counter() - started})
        finish(flatbuffer, carried, source.options, out_path, None, variant)
        log.info("wrote %s (%s, %d carried weights) in %.1f s", out_path.name, variant.name, variant.carried,
                 sum(variant.seconds.values()))
        return ExportedFile(out_path, MEDIA_TYPE,
                            {"format": "tflite", "variant": variant.name, "sequence_tokens": str(self.sequence_tokens)},
                            _provenance(source.options, variant, {"sequence_tokens": self.sequence_tokens,
                                                                  "recipe": source.recipe}))

    def read_back(self, exported: ExportedFile, source: ExportInput) -> dict[str, Any]:
        """Ops, weight dtypes, signature shapes and size of the file as ai-edge-litert reads it; raises
        VALIDATION_FAILED unless every quantized weight holds exactly our codes and scales."""
        summary = describe(exported.path)
        mismatched = verify_carried(exported.path, carried_llm_weights(source))
        if mismatched:
            raise FailedPrecondition(f"{exported.path.name} does not hold our codes/scales for "
                                     f"{', '.join(mismatched[:5])}", reason="VALIDATION_FAILED")
        return summary


def _reader(path: Path):
    """ai-edge-litert's interpreter over the file as written (no delegate repacks its tensors)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    return Interpreter(str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)


def describe(path: Path) -> dict[str, Any]:
    """What the file holds: ops and signature as ai-edge-litert's interpreter reads them, and the
    dtypes of its constant tensors from the flatbuffer."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb
    interpreter = _reader(path)
    ops = Counter(op["op_name"] for op in interpreter._get_ops_details())
    model = fb.read_model(path)
    constants = Counter(fb.TENSOR_CODE_TO_TYPE[t.type].lower() for g in model.subgraphs for t in g.tensors
                        if model.buffers[t.buffer].data is not None and len(model.buffers[t.buffer].data))

    def signature(details):
        return [{"name": d["name"], "shape": d["shape"].tolist(), "dtype": np.dtype(d["dtype"]).name,
                 "quantization": [float(v) for v in d["quantization"]]} for d in details]
    return {"size_bytes": path.stat().st_size, "ops": dict(sorted(ops.items())),
            "constant_dtypes": dict(sorted(constants.items())),
            "inputs": signature(interpreter.get_input_details()),
            "outputs": signature(interpreter.get_output_details())}


def int8_weights(path: Path) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(codes, scales, quantized dimension) of every int8 weight read back from the file."""
    interpreter = _reader(path)
    weights = []
    ops = interpreter._get_ops_details()
    candidates = {int(op["inputs"][1]) for op in ops if op["op_name"] in tflite_weights.CARRYING_OPS
                  and len(op["inputs"]) > 1} | {int(op["inputs"][0]) for op in ops if op["op_name"] == "DEQUANTIZE"}
    for index in sorted(candidates):
        detail = interpreter._get_tensor_details(index, 0)
        if np.dtype(detail["dtype"]) != np.int8:
            continue
        quantization = detail["quantization_parameters"]
        weights.append((interpreter.get_tensor(index), quantization["scales"], quantization["quantized_dimension"]))
    return weights


def verify_carried(path: Path, carried: Sequence[CarriedWeight]) -> list[str]:
    """Names of our weights the file does not hold bit for bit (codes and scales), in any op's layout."""
    held = {(codes.shape, codes.tobytes(), scales.astype(np.float32).tobytes())
            for codes, scales, _ in int8_weights(path)}
    return [weight.name for weight in carried
            if not any((codes.shape, codes.tobytes(), weight.scales.tobytes()) in held
                       for _, codes in tflite_weights.layouts(weight, weight.codes))]
