"""ONNX export of any torch module (BERT-style encoders, CNNs), with edgeforge's weight variants.

The graph comes from torch's own exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript),
falling back to the TorchScript exporter if that fails (measured on a small CNN and a 2-layer
encoder: both exporters give the same outputs within 1e-6; dynamo takes 2–8 s warm where
TorchScript takes 0.4–1.6 s, but TorchScript is deprecated, so it is the fallback, and the provenance
says which one wrote the file). The variants are then edits of that ONNX graph:

- weights on a grid: each float MatMul / Gemm / Conv weight initializer (used only as such) is
  rounded onto `weight_grid` by the compressor's RTN (services/compressor/quant/rtn.py, rows = output
  channels) and written as DequantizeLinear over the codes (onnx_weights.py), per-tensor, per-channel,
  or per-group along the input features (MatMul/Gemm only: a Conv weight's rows span in·kh·kw);
- float_type f16: remaining float initializers stored as float16, each Cast to float32 where used
  (the llama graph's decision and measurements, onnx.py);
- external data in a directory (model.onnx + model.onnx.data) when asked for or over 2 GiB.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from services.exporter.base import ExportedFile, ExportOptions, OnnxWeightOperator, unsupported_op
from services.exporter.formats.onnx import (DATA_FILE, MEDIA_TYPE, MEDIA_TYPE_DIRECTORY, MODEL_FILE,
                                            PROTOBUF_LIMIT_BYTES, SIZE_MARGIN_BYTES, _make_directory)
from services.exporter.formats.onnx_builder import GraphBuilder
from services.exporter.formats.onnx_weights import Precision, dequantize_linear, sub_byte_const
from shared.quant.grids import Granularity, Grid
from shared.versions import tool_versions

log = logging.getLogger(__name__)
OPSET = 21                       # DequantizeLinear block_size and INT4 need 21
TORCHSCRIPT_OPSET = 17           # the TorchScript exporter's well-trodden opset, converted to OPSET after
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


def check_module_options(options: ExportOptions, weight_grid: Grid | None) -> None:
    """UNSUPPORTED_OP for what module export cannot do, before the (slow) torch export."""
    if options.float_type not in ("f32", "f16"):
        raise unsupported_op("ONNX", f"float_type {options.float_type} (use f16; see onnx.py)")
    if options.int8_activations:
        raise unsupported_op("ONNX module export", "int8 activations (static QDQ needs the calibrator's ranges, "
                                                  "which it computes for decoder LMs only)")
    if options.onnx_weight_operator is OnnxWeightOperator.MATMUL_NBITS:
        raise unsupported_op("ONNX module export", "MatMulNBits weights (written for llama graphs only; use "
                                                  "DEQUANTIZE_LINEAR)")
    if weight_grid is not None and weight_grid.gguf_type:
        raise unsupported_op("ONNX", f"GGUF block type {weight_grid.gguf_type}")


def to_onnx(module, example_inputs: Sequence, input_names: list[str], output_names: list[str],
            dynamic_axes: dict[str, dict[int, str]]):
    """(onnx.ModelProto at OPSET with its weights loaded, which exporter wrote it)."""
    import onnx
    import torch
    module = module.eval()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "module.onnx"
        common = dict(input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
        try:
            with warnings.catch_warnings():          # dynamic_axes are translated to dynamic shapes; fine here
                warnings.filterwarnings("ignore", message=".*'dynamic_axes' is not recommended")
                torch.onnx.export(module, tuple(example_inputs), str(path), dynamo=True, opset_version=OPSET,
                                  verbose=False, **common)
            exporter = f"torch.onnx dynamo (torch {torch.__version__})"
        except Exception as error:          # torch.export raises many unrelated types on unsupported code
            log.warning("dynamo export failed (%s: %s); using the TorchScript exporter", type(error).__name__, error)
            torch.onnx.export(module, tuple(example_inputs), str(path), dynamo=False,
                              opset_version=TORCHSCRIPT_OPSET, **common)
            exporter = f"torch.onnx TorchScript (torch {torch.__version__}); dynamo failed: {type(error).__name__}"
        model = onnx.load(str(path))                                      # external data, if any, loaded
    _restore_single_assignment(model.graph)
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) != OPSET:
        from onnx import version_converter
        model = version_converter.convert_version(model, OPSET)
    return model, exporter


def _restore_single_assignment(graph) -> None:
    """torch 2.13's dynamo exporter may name an internal value after a requested output (an output
    "embedding" and the value of a module attribute `embed`), leaving two nodes writing one name,
    which ONNX forbids. Nodes come in topological order: every write but the last gets a fresh name,
    and each reader the name of the latest write before it."""
    writes: dict[str, int] = {}
    for node in graph.node:
        for name in node.output:
            writes[name] = writes.get(name, 0) + 1
    if all(count == 1 for count in writes.values()):
        return
    current: dict[str, str] = {}
    seen: dict[str, int] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in current:
                node.input[index] = current[name]
        for index, name in enumerate(node.output):
            seen[name] = seen.get(name, 0) + 1
            if seen[name] < writes[name]:
                renamed = f"{name}__{seen[name]}"
                node.output[index] = current[name] = renamed
            else:
                current.pop(name, None)


def _consumers(graph) -> dict[str, list[tuple[Any, int]]]:
    out: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            out.setdefault(name, []).append((node, index))
    return out


def _weight_matrix(node, array: np.ndarray) -> np.ndarray | None:
    """W (output channels, inputs) of a weight initializer, or None if it is not one we quantize."""
    if node.op_type == "MatMul" and array.ndim == 2:
        return array.T                                                    # B (K, N) -> W (N, K)
    if node.op_type == "Gemm" and array.ndim == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return array if trans_b else array.T
    if node.op_type == "Conv" and array.ndim >= 3:
        return array.reshape(array.shape[0], -1)                          # (O, I/groups · kh · kw)
    return None


def quantize_weights(model, grid: Grid) -> list[str]:
    """Rewrites every float weight of MatMul/Gemm/Conv (used only there) as DequantizeLinear over its
    RTN codes on `grid`. Returns the names quantized."""
    from onnx import helper, numpy_helper
    from services.compressor.quant.rtn import quantize
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    g, done = GraphBuilder(), []
    for name, tensor in list(initializers.items()):
        uses = consumers.get(name, [])
        if len(uses) != 1 or uses[0][0].op_type not in WEIGHT_OPS or uses[0][1] != 1:
            continue                                                      # shared (tied) weights stay float
        node = uses[0][0]
        array = numpy_helper.to_array(tensor)
        if array.dtype != np.float32 or _weight_matrix(node, array) is None:
            continue
        if node.op_type == "Conv" and grid.granularity is Granularity.PER_GROUP:
            raise unsupported_op("ONNX module export", f"a per-group grid on Conv weight {name} (its rows span "
                                                       "in·kh·kw; use per_channel)")
        q = quantize(np.ascontiguousarray(_weight_matrix(node, array)), grid)
        if node.op_type == "Conv":
            weight = _conv_dequantize(g, name, q, array.shape)
        else:
            weight = dequantize_linear(g, name, q, Precision())            # Wᵀ (K, N)
            if node.op_type == "Gemm":
                kept = [a for a in node.attribute if a.name != "transB"]
                del node.attribute[:]
                node.attribute.extend(kept + [helper.make_attribute("transB", 0)])
        node.input[1] = weight
        graph.initializer.remove(tensor)
        done.append(name)
    graph.initializer.extend(g.initializers)
    nodes = list(g.nodes) + list(graph.node)                               # DQ nodes read initializers only
    del graph.node[:]
    graph.node.extend(nodes)
    return done


def _conv_dequantize(g: GraphBuilder, name: str, q, shape: tuple[int, ...]) -> str:
    """A Conv weight (O, I, kh, kw) as DequantizeLinear over codes of that shape, scales per O."""
    grid = q.grid
    signed = grid.symmetric
    codes = (q.codes.astype(np.int16) - (1 << (grid.bits - 1))).astype(np.int8) if signed else q.codes
    zeros = np.zeros(q.scales.shape, np.int8) if signed else q.zero_points()
    codes = codes.reshape(shape)
    per_tensor = grid.granularity is Granularity.PER_TENSOR
    scales = q.scales.astype(np.float32).reshape(()) if per_tensor else q.scales.astype(np.float32)[:, 0]
    zeros = zeros.reshape(()) if per_tensor else zeros[:, 0]
    if grid.bits <= 4:
        inputs = [sub_byte_const(g, name + ".codes", codes, signed), g.const(name + ".scales", scales),
                  sub_byte_const(g, name + ".zeros", zeros, signed)]
    else:
        inputs = [g.const(name + ".codes", codes), g.const(name + ".scales", scales), g.const(name + ".zeros", zeros)]
    return g.op("DequantizeLinear", inputs, name, **({} if per_tensor else {"axis": 0}))


def store_float16(model, keep: set[str]) -> int:
    """Float32 initializers (but `keep`) stored as float16 and Cast back to float32 where used.
    Returns how many were converted."""
    from onnx import TensorProto, helper, numpy_helper
    graph = model.graph
    consumers = _consumers(graph)
    casts, converted = [], 0
    for tensor in graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or tensor.name in keep or tensor.name not in consumers \
                or not tensor.dims:                                       # scalars (clip bounds, eps) stay
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name)
        tensor.CopyFrom(half)
        as_float = tensor.name + ".float32"
        casts.append(helper.make_node("Cast", [tensor.name], [as_float], name=as_float, to=TensorProto.FLOAT))
        for node, index in consumers[tensor.name]:
            node.input[index] = as_float
        converted += 1
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return converted


def export_module(module, example_inputs: Sequence, input_names: list[str], output_names: list[str],
                  dynamic_axes: dict[str, dict[int, str]], options: ExportOptions, out_path: Path, *,
                  weight_grid: Grid | None = None) -> ExportedFile:
    """Exports `module` to ONNX at `out_path` (a file, or a directory with external data)."""
    import torch
    check_module_options(options, weight_grid)
    convolutions = [m for m in module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    if convolutions and weight_grid is not None and weight_grid.granularity is Granularity.PER_GROUP:
        raise unsupported_op("ONNX module export", f"a per-group grid on the module's {len(convolutions)} Conv "
                                                   "weights (their rows span in·kh·kw; use per_channel)")
    model, exporter = to_onnx(module, example_inputs, input_names, output_names, dynamic_axes)
    return write_variant(model, exporter, options, out_path, weight_grid=weight_grid)


def write_variant(model, exporter: str, options: ExportOptions, out_path: Path, *,
                  weight_grid: Grid | None = None) -> ExportedFile:
    """Applies the weight grid and float type to an exported graph (edited in place) and saves it."""
    import onnx
    check_module_options(options, weight_grid)
    exported = {t.name for t in model.graph.initializer}
    quantized = quantize_weights(model, weight_grid) if weight_grid is not None else []
    scales = {t.name for t in model.graph.initializer} - exported         # DequantizeLinear's: stay float32
    halved = store_float16(model, scales) if options.float_type == "f16" else 0
    external = options.external_data or model.ByteSize() + SIZE_MARGIN_BYTES >= PROTOBUF_LIMIT_BYTES
    path = out_path
    if external:
        _make_directory(out_path)
        path = out_path / MODEL_FILE
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=DATA_FILE)
    onnx.checker.check_model(str(path))
    provenance = {"tools": tool_versions("torch", "onnx", "onnxscript", "onnxruntime", "numpy"),
                  "exporter": exporter, "options": options.to_dict(), "opset": OPSET,
                  "weight_grid": weight_grid.name if weight_grid else None,
                  "weights_quantized": len(quantized), "float16_initializers": halved,
                  "weights_quantized_by": "edgeforge RTN at export" if quantized else None,
                  "float_compute": "float32", "external_data": external}
    labels = {"format": "onnx", "opset": str(OPSET), "float_type": options.float_type,
              "weights": weight_grid.name if weight_grid else options.float_type,
              "external_data": str(external).lower()}
    return ExportedFile(out_path, MEDIA_TYPE_DIRECTORY if external else MEDIA_TYPE, labels, provenance)


@dataclasses.dataclass(frozen=True)
class ModuleValidation:
    runtime: str
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float            # argmax over the last axis of the first output (classifiers)
    cosine_similarity: float         # mean over rows of the first output's last axis (embeddings)
    positions: int


def validate_module(module, example_inputs: Sequence, input_names: list[str], path: Path) -> ModuleValidation:
    """onnxruntime on the exported file versus the torch module on the same inputs (first output)."""
    import onnxruntime as ort
    import torch
    from services.exporter.formats.onnx import model_file
    from services.exporter.runtimes import threads
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads()
    session = ort.InferenceSession(str(model_file(Path(path))), options, providers=["CPUExecutionProvider"])
    feeds = {name: value.numpy() for name, value in zip(input_names, example_inputs)}
    actual = session.run(None, feeds)[0].astype(np.float64)
    with torch.inference_mode():
        expected = module.eval()(*example_inputs)
    expected = (expected[0] if isinstance(expected, (tuple, list)) else expected).numpy().astype(np.float64)
    diff = np.abs(actual - expected)
    agree = actual.argmax(-1) == expected.argmax(-1)
    cosine = (actual * expected).sum(-1) / np.maximum(np.linalg.norm(actual, axis=-1) *
                                                      np.linalg.norm(expected, axis=-1), 1e-30)
    return ModuleValidation(f"onnxruntime@{ort.__version__}", float(diff.max()), float(diff.mean()),
                            float(agree.mean()), float(cosine.mean()), int(agree.size))
