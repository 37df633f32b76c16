"""ONNX export of a decoder LM: llama, qwen2, gemma3 (graph in onnx_graph.py, linears in onnx_weights.py).

What `ExportOptions` selects:
- float_type f32: float tensors and computation in float32.
  f16: float tensors *stored* as float16, each Cast to float32 where it is used (onnxruntime folds
  the Casts into float32 weights when it loads the file); computation, logits and the KV cache stay
  float32. Measured on SmolLM2-135M, onnxruntime 1.32, AVX2 CPU without native float16 arithmetic:
  a graph computing in float16 ran no faster (prefill 128 tokens 512 vs 513 ms, decode 55.5 vs
  54.9 ms per token, best of 4, one thread), because the CPU provider wrapped it in 427 inserted
  Casts and computed in float32 anyway — while rounding every activation and the KV cache to float16
  and using more memory (RSS 1057 vs 1006 MB). Float16 storage halves the file (542 → 273 MB) at
  float32 accuracy of computation (max |Δlogit| 0.052 against float32, from the weights' rounding).
  bf16: refused (UNSUPPORTED_OP): onnxruntime 1.32's CPU provider has no bfloat16 MatMul or Add
  (NOT_IMPLEMENTED), and bfloat16 storage Cast to float32 would be f16's size with less precision.
- onnx_weight_operator DEQUANTIZE_LINEAR (standard ONNX) or MATMUL_NBITS (onnxruntime's com.microsoft
  MatMulNBits) for quantized linears; either way the runtime dequantizes to exactly our weights.
  What onnxruntime 1.32 then computes (measured on SmolLM2, AVX2, bench/onnx_int8.py): it fuses
  DequantizeLinear → MatMul into MatMulNBits and by default runs it at accuracy level 4, quantizing
  the activations to int8 per block (session config "session.qdq_matmulnbits_accuracy_level": "0"
  keeps them float; services/exporter/runtimes.OnnxRuntime takes it). The MatMulNBits nodes we write
  leave accuracy_level unset (0): float activations, exactly the reference's computation — fast for
  4-bit codes (decode 102 ms/token vs fp32's 120), but 8-bit codes at level 0 hit a slow kernel
  (961 ms/token vs 79 at level 4), so int8 weights are best written with DEQUANTIZE_LINEAR.
- int8_activations: QuantizeLinear/DequantizeLinear on every linear's input with the calibrator's
  (min, max); needs 8-bit linear weights (static QDQ int8, W8A8).
- external_data: weights in `model.onnx.data` beside `model.onnx`, both in a directory at the output
  path; chosen automatically when the model would exceed protobuf's 2 GiB.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from services.exporter.base import (ExportedFile, Exporter, ExportFormat, ExportInput, OnnxWeightOperator,
                                    unsupported_arch, unsupported_op)
from shared.errors import FailedPrecondition, Internal
from shared.models.decoder_config import is_linear_weight
from shared.versions import tool_versions

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/onnx"
MEDIA_TYPE_DIRECTORY = "application/x-edgeforge-onnx-external-data+tar"   # model.onnx + model.onnx.data
PROTOBUF_LIMIT_BYTES = 2 << 30
SIZE_MARGIN_BYTES = 64 << 20          # graph, small constants and the estimate's slack
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")        # what onnx_graph.py builds
# float_type -> (storage, compute) numpy float types.
PRECISIONS = {"f32": (np.float32, np.float32), "f16": (np.float16, np.float32)}
F16_DECISION = ("float16 storage, float32 compute and KV cache: onnxruntime's CPU provider computes float16 "
                "graphs through inserted Casts in float32 anyway (see services/exporter/formats/onnx.py)")


def model_file(path: Path) -> Path:
    """The .onnx file of an export: the path itself, or model.onnx inside an external-data directory."""
    return path / MODEL_FILE if path.is_dir() else path


def estimated_bytes(source: ExportInput, storage_bytes: int) -> int:
    """An upper bound of the initializers' bytes, from the config and the grids (no weights read)."""
    config = source.model.config
    total = 0
    for name, shape in config.tensor_shapes().items():
        count = int(np.prod(shape))
        grid = source.grid(name)
        if grid is None:
            total += count * storage_bytes
        else:
            container = 4 if grid.bits <= 4 else 8
            total += count * container // 8 + count // grid.group_columns(shape[1]) * 5   # + scales, zeros
    return total


class OnnxExporter(Exporter):
    format = ExportFormat.ONNX
    suffix = ".onnx"

    def check(self, source: ExportInput) -> None:
        from services.exporter.formats.onnx_nbits import why_not_expressible
        options, config = source.options, source.model.config
        architecture = getattr(config, "architecture", "llama")
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise unsupported_arch("ONNX", architecture, SUPPORTED_ARCHITECTURES)
        if options.float_type not in PRECISIONS:
            raise unsupported_op("ONNX", f"float_type {options.float_type} (onnxruntime's CPU provider has no "
                                         "bfloat16 MatMul/Add kernels, and bfloat16 storage would be f16's size "
                                         "with less precision; use f16)")
        for name, shape in config.tensor_shapes().items():
            grid = source.grid(name)
            if grid is None:
                continue
            if grid.gguf_type:
                raise unsupported_op("ONNX", f"{name} on GGUF block type {grid.gguf_type} (compress with a "
                                             "generic grid: bits, granularity, group_size)")
            if not is_linear_weight(name):
                continue                                       # written dequantized (exact) as float
            if options.onnx_weight_operator is OnnxWeightOperator.MATMUL_NBITS:
                reason = why_not_expressible(grid, shape[1])
                if reason:
                    raise unsupported_op("ONNX MatMulNBits", f"{name}: {reason}")
        if options.int8_activations:
            self._check_int8_activations(source)

    @staticmethod
    def _check_int8_activations(source: ExportInput) -> None:
        if source.options.onnx_weight_operator is OnnxWeightOperator.MATMUL_NBITS:
            raise unsupported_op("ONNX", "int8 activations with MatMulNBits (its input is float); use "
                                         "onnx_weight_operator DEQUANTIZE_LINEAR for static QDQ int8")
        for name in source.model.config.tensor_shapes():
            if not is_linear_weight(name):
                continue
            grid = source.grid(name)
            if grid is None or grid.bits != 8:
                raise unsupported_op("ONNX", f"int8 activations with {name} on "
                                             f"{'float' if grid is None else grid.name} weights (static QDQ int8 "
                                             "needs 8-bit linear weights: compress with bits 8 per_channel)")
            source.activations.get(name.removesuffix(".weight"))      # MISSING_CALIBRATION if absent

    def export(self, source: ExportInput, out_path: Path) -> ExportedFile:
        import onnx
        from services.exporter.formats.onnx_builder import ExternalData, GraphBuilder
        from services.exporter.formats.onnx_graph import OPSET, build_decoder
        from services.exporter.formats.onnx_weights import Linears, Precision
        self.check(source)
        options = source.options
        storage, compute = PRECISIONS[options.float_type]
        estimate = estimated_bytes(source, np.dtype(storage).itemsize)
        external = options.external_data or estimate + SIZE_MARGIN_BYTES >= PROTOBUF_LIMIT_BYTES
        path = out_path
        data = None
        if external:
            _make_directory(out_path)
            path, data = out_path / MODEL_FILE, ExternalData(out_path / DATA_FILE)
        g = GraphBuilder(data)
        linears = Linears(g, Precision(storage, compute), options.onnx_weight_operator,
                          source.activations if options.int8_activations else None)

        def tensor(name: str):
            return source.tensor(name) if is_linear_weight(name) else source.dequantized(name)
        try:
            model = build_decoder(source.model.config, tensor, g, linears)
        finally:
            if data is not None:
                data.close()
        if data is None and model.ByteSize() >= PROTOBUF_LIMIT_BYTES:
            raise Internal(f"the ONNX graph is {model.ByteSize()} bytes, over protobuf's 2 GiB limit, though "
                           f"estimated at {estimate}; export with external_data")
        onnx.save_model(model, str(path))
        del model
        onnx.checker.check_model(str(path))                   # by path: follows external data, any size
        log.info("wrote %s: %d initializer bytes%s", out_path, g.initializer_bytes,
                 " (external data)" if external else "")
        labels = {"format": "onnx", "opset": str(OPSET), "float_type": options.float_type,
                  "weight_operator": options.onnx_weight_operator.value,
                  "int8_activations": str(options.int8_activations).lower(),
                  "external_data": str(external).lower()}
        return ExportedFile(out_path, MEDIA_TYPE_DIRECTORY if external else MEDIA_TYPE, labels,
                            self._provenance(source, storage, compute, external, g.initializer_bytes))

    @staticmethod
    def _provenance(source: ExportInput, storage, compute, external: bool, initializer_bytes: int) -> dict:
        options = source.options
        out: dict[str, Any] = {
            "tools": tool_versions("onnx", "onnxruntime", "numpy"),
            "options": options.to_dict(),
            "opset": 21, "ir_version": 10,
            "float_storage": np.dtype(storage).name, "float_compute": np.dtype(compute).name,
            "kv_cache_dtype": np.dtype(compute).name, "logits_dtype": "float32",
            "external_data": external, "initializer_bytes": initializer_bytes,
        }
        if options.float_type == "f16":
            out["float16_decision"] = F16_DECISION
        if options.int8_activations:
            out["activation_quantization"] = {"scheme": "uint8 affine per tensor, calibrator (min, max) "
                                                        "widened to include 0",
                                              "calibration": source.activations.source}
        return out

    def read_back(self, exported: ExportedFile, source: ExportInput) -> dict[str, Any]:
        """The written graph (without its weights): operators, initializer types and sizes, I/O, and a
        check that it holds what the options asked for."""
        from services.exporter.formats.onnx_inspect import inspect_graph
        return inspect_graph(model_file(exported.path), source.options)


def _make_directory(path: Path) -> None:
    """The output directory of an external-data export, at the caller's path (an empty placeholder
    file there is replaced)."""
    if path.is_file():
        if path.stat().st_size:
            raise FailedPrecondition(f"{path} exists and is not empty", field="out_path")
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise FailedPrecondition(f"{path} is not an empty directory", field="out_path")
