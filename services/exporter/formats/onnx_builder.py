"""Builds an ONNX graph node by node, with initializers kept in the graph or streamed to a side file.

`GraphBuilder` accumulates nodes and initializers under unique names. Where the initializers go is
decided before the first one is added:

- in memory (`external=None`): each initializer's bytes live in the ModelProto (raw_data), and the
  model is saved as one `.onnx` file; protobuf caps that at 2 GiB.
- external data (`external=ExternalData(path)`): each initializer of at least `INLINE_MAX_BYTES` is
  written to the side file as soon as it is added and the graph keeps only its location, offset and
  length (the ONNX external-data spec, onnx/docs/ExternalData.md). The weights are never held in
  memory together, let alone twice, and the model has no size limit. Offsets are aligned to 4 KiB
  so that a runtime may map the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

INLINE_MAX_BYTES = 1024             # smaller initializers (shapes, scalars) stay inside the graph
ALIGNMENT_BYTES = 4096


class ExternalData:
    """The side file that initializers are appended to, at aligned offsets."""

    def __init__(self, path: Path):
        self.path = path
        self.location = path.name   # relative to the .onnx file, which lies in the same directory
        self._file = open(path, "wb")
        self.size_bytes = 0

    def append(self, data: memoryview) -> tuple[int, int]:
        """Writes bytes at the next aligned offset; returns (offset, length)."""
        offset = -(-self.size_bytes // ALIGNMENT_BYTES) * ALIGNMENT_BYTES
        if offset > self.size_bytes:
            self._file.write(b"\0" * (offset - self.size_bytes))
        self._file.write(data)
        self.size_bytes = offset + data.nbytes
        return offset, data.nbytes

    def close(self) -> None:
        self._file.close()


class GraphBuilder:
    """Accumulates nodes and initializers; generated names are made unique by a counter."""

    def __init__(self, external: ExternalData | None = None):
        self.nodes, self.initializers, self._count = [], [], 0
        self.external = external
        self.initializer_bytes = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str = "", domain: str = "", **attributes) -> str:
        from onnx import helper
        out = self.fresh(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain or None, **attributes))
        return out

    def node(self, op_type: str, inputs: list[str], output: str, **attributes) -> str:
        """A node whose output has a fixed name (a graph output)."""
        from onnx import helper
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer holding `array` as it is (dtype included)."""
        from onnx import helper
        array = np.ascontiguousarray(array)
        data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        return self._add(name, data_type, list(array.shape), memoryview(array).cast("B"))

    def packed_const(self, name: str, data_type: int, shape: list[int], packed: np.ndarray) -> str:
        """An initializer of a sub-byte type (INT4/UINT4) whose bytes are already packed."""
        return self._add(name, data_type, shape, memoryview(np.ascontiguousarray(packed)).cast("B"))

    def ints(self, values: list[int]) -> str:
        return self.const(self.fresh("const"), np.array(values, dtype=np.int64))

    def scalar(self, name: str, value: float, dtype) -> str:
        return self.const(name, np.array(value, dtype=dtype))

    def _add(self, name: str, data_type: int, shape: list[int], data: memoryview) -> str:
        import onnx
        tensor = onnx.TensorProto(name=name, dims=shape, data_type=data_type)
        if self.external is not None and data.nbytes >= INLINE_MAX_BYTES:
            offset, length = self.external.append(data)
            for key, value in (("location", self.external.location), ("offset", offset), ("length", length)):
                tensor.external_data.add(key=key, value=str(value))
            tensor.data_location = onnx.TensorProto.EXTERNAL
        else:
            tensor.raw_data = data.tobytes()
        self.initializers.append(tensor)
        self.initializer_bytes += data.nbytes
        return name

    def model(self, graph_name: str, inputs: list, outputs: list, opsets: dict[str, int]):
        """The onnx.ModelProto (IR version 10: opset 21 and sub-byte types)."""
        from onnx import helper
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, version)
                                                        for domain, version in opsets.items()],
                                  producer_name="edgeforge")
        model.ir_version = 10
        return model
