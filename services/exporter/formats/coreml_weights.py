"""Our quantized weights in Core ML's iOS18 `constexpr_blockwise_shift_scale` form, and the graph pass
that puts them into a converted program in place of the float constants coremltools wrote.

Core ML computes   w = scale · (data − offset)   with one (scale, offset) per block of `data`, where
the block shape is data.shape / scale.shape (iOS18 MIL, `constexpr_blockwise_shift_scale`). Every grid
we carry is that expression with our own numbers, so nothing is re-quantized:

  generic symmetric b-bit   data = code − 2^(b−1)  as int{b}, no offset, scale = our float16 scale
  generic asymmetric b-bit  data = code as uint{b}, offset = our zero point (uint{b}), scale as above
  GGUF Q8_0                 data = the block's int8 values, scale = its float16 d      (blocks of 32)
  GGUF Q4_0                 data = nibble − 8 as int4,      scale = its float16 d      (blocks of 32)

for b ∈ {4, 8} (Core ML stores 4- and 8-bit integers). Blocks run along the input dimension, as our
groups do; a convolution's (out, in, kh, kw) weight is our (out, in·kh·kw) matrix, so a group of
g = k·kh·kw columns is a block of k input channels. Everything else (3/5/6-bit grids, Q4_1/Q5_x, the
K-quants' 6-bit sub-scales) has no exact Core ML form and is refused by `unsupported_grid`.

Because the codes are integers of at most 8 bits and the scale a float16, (data − offset)·scale is exact
in float32; in a float16 program Core ML's weight is that product rounded once to float16, the same
as our float32 dequantization cast to float16.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging

import numpy as np

from shared.errors import FailedPrecondition
from shared.quant.grids import Granularity, Grid
from shared.quant.qtensor import GgufTensor, QuantizedTensor

log = logging.getLogger(__name__)
CARRIED_GGUF_TYPES = ("q8_0", "q4_0")
CARRIED_BITS = (4, 8)
FLOAT16_MAX = float(np.finfo(np.float16).max)


def unsupported_grid(grid: Grid) -> str | None:
    """Why Core ML cannot store `grid` exactly, or None when it can."""
    if grid.gguf_type:
        if grid.gguf_type in CARRIED_GGUF_TYPES:
            return None
        return (f"GGUF block type {grid.gguf_type} (Core ML's blockwise ops store d·(q − z) blocks of 4/8-bit "
                f"integers: {', '.join(CARRIED_GGUF_TYPES)} only; the K-quants' sub-block scales and the "
                "affine/5-bit types have no exact form)")
    if grid.bits not in CARRIED_BITS:
        return (f"{grid.bits}-bit linear weights ({grid.name}); Core ML stores linear-quantized weights as "
                "4- or 8-bit integers")
    return None


@dataclasses.dataclass(frozen=True)
class BlockwiseWeight:
    """One weight as `constexpr_blockwise_shift_scale` inputs, shaped like the weight itself."""
    data: np.ndarray              # int8/uint8, or int4/uint4 (coremltools' sub-byte numpy dtypes)
    scale: np.ndarray             # float16, same rank as data; block = data.shape / scale.shape
    offset: np.ndarray | None     # same dtype as data, shape of scale; None: symmetric
    grid: str                     # the grid it came from (provenance)

    @property
    def storage(self) -> str:
        """"int4", "uint8", … (the dtype Core ML stores)."""
        return _storage_name(self.data)

    @property
    def block_shape(self) -> tuple[int, ...]:
        return tuple(d // s for d, s in zip(self.data.shape, self.scale.shape))

    def dense(self, dtype=np.float32) -> np.ndarray:
        """scale · (data − offset), blocks broadcast: Core ML's decompression, written out."""
        values = self.data.astype(np.float32)
        if self.offset is not None:
            values = values - _expand(self.offset.astype(np.float32), self.block_shape)
        return (values * _expand(self.scale.astype(np.float32), self.block_shape)).astype(dtype)


def _storage_name(array: np.ndarray) -> str:
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.types.type_int import SUB_BYTE_DTYPE_METADATA_KEY
    sub_byte = (array.dtype.metadata or {}).get(SUB_BYTE_DTYPE_METADATA_KEY)
    if sub_byte is not None:
        return types.builtin_to_string(sub_byte)
    return array.dtype.name


def _expand(values: np.ndarray, block: tuple[int, ...]) -> np.ndarray:
    for axis, size in enumerate(block):
        if size > 1:
            values = np.repeat(values, size, axis=axis)
    return values


def _codes_and_scales(value: QuantizedTensor | GgufTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """(signed codes or unsigned codes, float16 scales (rows, blocks), unsigned zero points or None, bits)."""
    if isinstance(value, GgufTensor):
        rows, columns = value.shape
        kind = value.grid.gguf_type                                               # q8_0 or q4_0 (blockwise checks)
        blocks = value.data.reshape(rows, columns // 32, -1)                      # (rows, blocks, block bytes)
        scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]   # d: the block's first 2 bytes
        if kind == "q8_0":
            codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)           # 32 int8 values
            return codes.reshape(rows, columns), scales, None, 8
        packed = blocks[..., 2:]                                                   # 16 bytes: q[j] | q[j+16] << 4
        nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.int8)
        return (nibbles - 8).reshape(rows, columns), scales, None, 4
    grid = value.grid
    if grid.symmetric:
        signed = value.codes.astype(np.int16) - (1 << (grid.bits - 1))
        return signed.astype(np.int8), value.scales, None, grid.bits
    return value.codes, value.scales, value.zeros, grid.bits


def blockwise(value: QuantizedTensor | GgufTensor, shape: tuple[int, ...]) -> BlockwiseWeight:
    """Our quantized (rows, columns) weight as Core ML blockwise inputs for a weight of `shape`
    (rows, columns) or a convolution's (rows, in, *kernel) with in·prod(kernel) = columns."""
    from coremltools.converters.mil.mil import types
    reason = unsupported_grid(value.grid)
    if reason:
        raise FailedPrecondition(f"Core ML cannot express {reason}", reason="UNSUPPORTED_OP")
    rows, columns = value.shape
    inner = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    if len(shape) < 2 or shape[0] != rows or int(np.prod(shape[1:])) != columns:
        raise FailedPrecondition(f"a quantized ({rows}, {columns}) weight cannot fill a weight of shape {shape}")
    codes, scales, zeros, bits = _codes_and_scales(value)
    if value.grid.granularity is Granularity.PER_TENSOR and not value.grid.gguf_type:
        scale_shape = (1,) * len(shape)
    else:
        groups = scales.shape[1]
        if (columns // groups) % inner:
            raise FailedPrecondition(f"groups of {columns // groups} columns do not cover whole {shape[2:]} kernels "
                                     f"of a {shape} convolution weight", reason="UNSUPPORTED_OP")
        scale_shape = (rows, groups) + (1,) * (len(shape) - 2)
    signed = zeros is None
    dtype = {(4, True): types.np_int4_dtype, (4, False): types.np_uint4_dtype,
             (8, True): np.dtype(np.int8), (8, False): np.dtype(np.uint8)}[bits, signed]
    data = codes.reshape(shape).astype(dtype)
    offset = None if signed else zeros.reshape(scale_shape).astype(dtype)
    return BlockwiseWeight(data, scales.astype(np.float16).reshape(scale_shape), offset, value.grid.name)


def _digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def op_name(weight_name: str) -> str:
    """The MIL name of a carried weight's op: the parameter name with dots as underscores."""
    return weight_name.replace(".", "_") + "_carried"


def carry_pass(carried: dict[str, BlockwiseWeight], float_dtype: np.dtype):
    """A coremltools graph pass replacing each float constant equal to a carried weight's dense value
    (cast to the program's float type, `float_dtype`) by a constexpr_blockwise_shift_scale op built
    from our data, scale and offset. Constants are found by value, so whatever coremltools named them
    (and a tied embedding / LM head shared by two ops) they are found; every carried weight must be
    found, or the export fails."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    expected: dict[tuple[tuple[int, ...], str], list[str]] = {}
    for name, weight in carried.items():
        key = (weight.data.shape, _digest(weight.dense(float_dtype)))
        expected.setdefault(key, []).append(name)
    shapes = {weight.data.shape for weight in carried.values()}

    class CarryWeights(AbstractGraphPass):
        def __init__(self):
            self.replaced: dict[str, str] = {}                         # our weight name -> MIL op name

        def apply(self, prog):
            for function in prog.functions.values():
                with function:
                    for op in list(function.operations):
                        if op.op_type == "const" and op.outputs[0].val is not None:
                            self._replace(op, function)
            missing = sorted(set(carried) - set(self.replaced))
            if missing:
                raise FailedPrecondition(
                    f"the converted program has no float constant equal to {', '.join(missing[:3])} ({len(missing)} "
                    "carried weights): coremltools folded it into another constant (a slice or product of the "
                    "weight), so it cannot be carried; leave it float", reason="UNSUPPORTED_OP", field="weights")

        def _replace(self, op, block) -> None:
            value = op.outputs[0].val
            if not isinstance(value, np.ndarray) or value.dtype != float_dtype or value.shape not in shapes:
                return
            names = expected.get((value.shape, _digest(value)))
            if not names:
                return
            weight = carried[names[0]]
            if not np.array_equal(weight.dense(float_dtype), value):          # a digest match, confirmed
                return
            scale = weight.scale.astype(float_dtype)
            name = op_name(names[0]) if names[0] not in self.replaced else f"{op_name(names[0])}_{len(self.replaced)}"
            new = mb.constexpr_blockwise_shift_scale(data=weight.data, scale=scale, offset=weight.offset,
                                                     before_op=op, name=name)
            block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new,
                                               no_check_var_types=True)
            block.remove_ops([op])
            for carried_name in names:                              # weights equal to it (tied) share the op
                self.replaced.setdefault(carried_name, new.op.name)
            log.debug("carried %s as %s (%s, block %s)", names, new.op.name, weight.storage, weight.block_shape)

    return CarryWeights()


def finite_multiplier_pass():
    """In a float16 program, replaces ±inf in a constant that a `mul` multiplies by with ±65504.

    torch builds additive attention masks as (1 − mask)·finfo(float32).min; coremltools' float16 cast
    turns the constant into −inf, and 0·(−inf) = NaN at every position the mask keeps. ±65504 (float16's
    largest) masks the same positions (softmax weight exp(−65504) = 0) without the NaN."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    class FiniteMultipliers(AbstractGraphPass):
        def __init__(self):
            self.replaced: list[str] = []

        def apply(self, prog):
            for function in prog.functions.values():
                with function:
                    for op in list(function.operations):
                        if op.op_type == "mul":
                            for var in (op.x, op.y):
                                self._replace(var, function)

        def _replace(self, var, block) -> None:
            source = var.op
            if source is None or source.op_type != "const" or var.val is None:
                return
            value = np.asarray(var.val)
            if value.dtype != np.float16 or not np.isinf(value).any():
                return
            finite = np.clip(value, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
            new = mb.const(val=finite if value.ndim else finite[()], before_op=source, name=source.name + "_finite")
            block.replace_uses_of_var_after_op(anchor_op=source, old_var=var, new_var=new)
            block.remove_ops([source])
            self.replaced.append(source.name)

    return FiniteMultipliers()
