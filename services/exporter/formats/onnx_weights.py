"""How a linear layer's weight and input are written into an ONNX graph.

A weight W (out_features, in_features) enters a graph in one of four ways:

- float: an initializer of Wᵀ in the storage float type, Cast to the compute type where they differ;
- DequantizeLinear (opset 21) over our own codes: per-tensor and per-channel scales, or blocked
  (`block_size`) for per-group grids; codes of ≤ 4 bits in INT4/UINT4, 5–8 bits in INT8/UINT8.
  Symmetric grids are stored signed (code − 2^(bits−1), zero point 0), asymmetric ones unsigned with
  our zero points (under static QDQ symmetric ones too, see `Linears.weight`). Scales stay float32,
  so DequantizeLinear's output is our dequantized weight exactly;
- MatMulNBits (com.microsoft): the matmul itself over our codes re-laid (onnx_nbits.py);
- and, with static activation quantization, the input x passes QuantizeLinear → DequantizeLinear with
  a uint8 scale and zero point from the calibrator's (min, max) for that linear (`activation_qparams`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from services.exporter.base import OnnxWeightOperator
from services.exporter.formats.onnx_builder import GraphBuilder
from services.exporter.formats.onnx_nbits import to_matmul_nbits
from shared.quant.grids import Granularity
from shared.quant.qtensor import QuantizedTensor

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class Precision:
    """Float types of a graph: what float initializers are stored as, and what activations are."""
    storage: type = np.float32
    compute: type = np.float32

    @property
    def mixed(self) -> bool:
        return np.dtype(self.storage) != np.dtype(self.compute)

    @property
    def half(self) -> bool:
        """Whether activations are float16."""
        return np.dtype(self.compute) == np.float16

    def onnx_compute(self) -> int:
        from onnx import helper
        return helper.np_dtype_to_tensor_dtype(np.dtype(self.compute))


def cast(g: GraphBuilder, x: str, to) -> str:
    from onnx import helper
    return g.op("Cast", [x], to=helper.np_dtype_to_tensor_dtype(np.dtype(to)))


def float_const(g: GraphBuilder, name: str, array: np.ndarray, precision: Precision) -> str:
    """A float tensor stored in the storage type, in the compute type where it is used."""
    stored = g.const(name, np.asarray(array).astype(precision.storage, copy=False))
    return cast(g, stored, precision.compute) if precision.mixed else stored


def sub_byte_const(g: GraphBuilder, name: str, array: np.ndarray, signed: bool) -> str:
    """An INT4/UINT4 initializer: two values per byte, the first in the low nibble (ONNX's packing)."""
    import onnx
    flat = (array.astype(np.int16).reshape(-1) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    data_type = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    return g.packed_const(name, data_type, list(array.shape), flat[0::2] | (flat[1::2] << 4))


def dequantize_linear(g: GraphBuilder, name: str, q: QuantizedTensor, precision: Precision,
                      unsigned: bool = False) -> str:
    """Wᵀ (in_features, out_features) as DequantizeLinear over our codes, in the compute type.
    `unsigned`: symmetric grids too as our unsigned codes with zero point 2^(bits−1) (same values)."""
    grid = q.grid
    if grid.symmetric and not unsigned:                                         # signed q, zero point 0
        codes = (q.codes.astype(np.int16) - (1 << (grid.bits - 1))).astype(np.int8)
        zeros = np.zeros(q.scales.shape, dtype=np.int8)
    else:
        codes, zeros = q.codes, q.zero_points()
    signed = codes.dtype == np.int8
    scales = q.scales.astype(np.float32)
    if grid.bits <= 4:
        def integer(tensor_name, array):
            return sub_byte_const(g, tensor_name, array, signed)
    else:
        integer = g.const
    codes_t = np.ascontiguousarray(codes.T)                                     # (in, out)
    if grid.granularity is Granularity.PER_TENSOR:
        inputs = [integer(name + ".codes", codes_t), g.const(name + ".scales", scales.reshape(())),
                  integer(name + ".zeros", zeros.reshape(()))]
        attributes = {}
    elif grid.granularity is Granularity.PER_CHANNEL:
        inputs = [integer(name + ".codes", codes_t), g.const(name + ".scales", scales[:, 0]),   # (out,)
                  integer(name + ".zeros", zeros[:, 0])]
        attributes = {"axis": 1}
    else:
        inputs = [integer(name + ".codes", codes_t),
                  g.const(name + ".scales", np.ascontiguousarray(scales.T)),                  # (in/group, out)
                  integer(name + ".zeros", np.ascontiguousarray(zeros.T))]
        attributes = {"axis": 0, "block_size": grid.group_size}
    weight = g.op("DequantizeLinear", inputs, name, **attributes)
    return cast(g, weight, precision.compute) if precision.half else weight


def matmul_nbits(g: GraphBuilder, x: str, name: str, q: QuantizedTensor, precision: Precision) -> str:
    """x · Wᵀ through one MatMulNBits node over our codes (x in the compute type)."""
    packed = to_matmul_nbits(q, precision.compute)
    inputs = [x, g.const(name + ".B", packed.B), g.const(name + ".scales", packed.scales.reshape(-1))]
    if packed.zero_points is not None:
        inputs.append(g.const(name + ".zero_points", packed.zero_points.reshape(-1)))
    return g.op("MatMulNBits", inputs, name + ".matmul", domain=MS_DOMAIN, K=packed.K, N=packed.N,
                bits=packed.bits, block_size=packed.block_size)


def activation_qparams(low: float, high: float) -> tuple[np.float32, np.uint8]:
    """uint8 affine quantization of [low, high] widened to contain 0 (so zero is exact, as ONNX
    requires for padding and as ReLU-like inputs want): scale = (high − low) / 255, zero = −low/scale."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / 255.0
    if not np.isfinite(scale) or scale <= 0.0:
        return np.float32(1.0), np.uint8(0)
    zero = int(np.clip(round(-low / scale), 0, 255))
    return np.float32(scale), np.uint8(zero)


class Linears:
    """Writes `x · Wᵀ` for every linear of a graph with one precision, weight operator and (optionally)
    static activation ranges; inputs shared by several linears (q, k, v) are quantized once."""

    def __init__(self, g: GraphBuilder, precision: Precision,
                 operator: OnnxWeightOperator = OnnxWeightOperator.DEQUANTIZE_LINEAR,
                 activation_ranges=None):
        self.g, self.precision, self.operator = g, precision, operator
        self.activation_ranges = activation_ranges            # base.ActivationRanges or None
        self._quantized_inputs: dict[str, str] = {}

    def weight(self, name: str, value: np.ndarray | QuantizedTensor) -> str:
        """Wᵀ (in_features, out_features) in the compute type. Under static QDQ, weights are unsigned
        (uint8 codes, zero point 128 for symmetric grids): onnxruntime's fused uint8×int8 kernel on
        x86 without VNNI sums pairs of products in int16 with saturation (vpmaddubsw), which we
        measured as a 19% error on a 256-wide dot product of full-range codes; uint8×uint8 is exact."""
        if isinstance(value, QuantizedTensor):
            return dequantize_linear(self.g, name, value, self.precision,
                                     unsigned=self.activation_ranges is not None)
        return float_const(self.g, name, np.ascontiguousarray(np.asarray(value).T), self.precision)

    def __call__(self, x: str, name: str, value: np.ndarray | QuantizedTensor) -> str:
        """`name`: the weight's HF name ("….q_proj.weight"); its linear is the name without ".weight"."""
        if self.activation_ranges is not None:
            x = self.quantized_input(x, name.removesuffix(".weight"))
        if isinstance(value, QuantizedTensor) and self.operator is OnnxWeightOperator.MATMUL_NBITS:
            return matmul_nbits(self.g, x, name, value, self.precision)
        return self.g.op("MatMul", [x, self.weight(name, value)])

    def quantized_input(self, x: str, linear: str) -> str:
        if x not in self._quantized_inputs:
            scale, zero = activation_qparams(*self.activation_ranges.get(linear))
            s = self.g.const(linear + ".input_scale", scale)
            z = self.g.const(linear + ".input_zero", zero)
            q = self.g.op("QuantizeLinear", [x, s, z], linear + ".input_q")
            self._quantized_inputs[x] = self.g.op("DequantizeLinear", [q, s, z], linear + ".input_dq")
        return self._quantized_inputs[x]
