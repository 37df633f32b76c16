"""Reads an exported ONNX graph back (without loading external weights) and checks that it holds
what the export options asked for: operators, initializer types and bytes, inputs and outputs."""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from services.exporter.base import ExportOptions, OnnxWeightOperator
from shared.errors import FailedPrecondition


def _initializer_bytes(tensor) -> int:
    import onnx
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return next((int(entry.value) for entry in tensor.external_data if entry.key == "length"), 0)
    return len(tensor.raw_data)


def _value_info(value) -> dict[str, Any]:
    import onnx
    kind = value.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in kind.shape.dim]
    return {"name": value.name, "dtype": onnx.TensorProto.DataType.Name(kind.elem_type).lower(), "shape": dims}


def inspect_graph(path: Path, options: ExportOptions) -> dict[str, Any]:
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    ops = collections.Counter(node.op_type for node in graph.node)
    by_type: dict[str, int] = collections.Counter()
    for tensor in graph.initializer:
        by_type[onnx.TensorProto.DataType.Name(tensor.data_type).lower()] += _initializer_bytes(tensor)
    found = {"ops": dict(sorted(ops.items())), "initializer_bytes": dict(sorted(by_type.items())),
             "inputs": [_value_info(v) for v in graph.input], "outputs": [_value_info(v) for v in graph.output],
             "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import}}

    def fail(what: str):
        raise FailedPrecondition(f"{path.name} does not hold {what}; it has ops {dict(ops)} and initializer "
                                 f"bytes {dict(by_type)}", reason="VALIDATION_FAILED")
    if options.float_type == "f16" and by_type.get("float", 0) > by_type.get("float16", 0):
        fail("float16 weights")
    quantized = ops.get("DequantizeLinear", 0) + ops.get("MatMulNBits", 0)
    if options.onnx_weight_operator is OnnxWeightOperator.MATMUL_NBITS and quantized and not ops.get("MatMulNBits"):
        fail("MatMulNBits nodes")
    if options.int8_activations and not ops.get("QuantizeLinear"):
        fail("QuantizeLinear nodes on the linears' inputs")
    return found
