"""Finishing a converted TFLite flatbuffer: our carried int8 weights checked (and put behind DEQUANTIZE
where the hybrid kernels cannot take them), float weights stored as float16 when asked, activations
quantized to int8 when asked — through ai-edge-quantizer, the flatbuffer rewriter litert-torch's own
quantization uses.

`CarriedWeight` is one of our quantized weights in TFLite's terms: signed codes (our code − 2^(bits−1))
and per-output-channel (or per-tensor) float32 scales equal to our float16 ones. `tflite_graph` makes
the converter write them (see its module doc); `rewrite` finds each one again by its codes in the op's
layout — FULLY_CONNECTED (out, in); CONV_2D (out, kh, kw, in); DEPTHWISE_CONV_2D (1, kh, kw, channels).

What TFLite's weight quantization can hold (the TFLite quantization spec: int8 weights symmetric, zero
point 0, one scale per tensor or per output channel): our symmetric grids of 2–8 bits per tensor or
per channel — codes below 8 bits are stored in int8 unchanged. TFLite's INT4 type is not used: in
ai-edge-litert 2.3 the builtin hybrid FULLY_CONNECTED gives wrong outputs on INT4 weights (only XNNPACK
gets them right). Asymmetric grids (a zero point per channel), per-group grids (a scale per group of
input columns) and llama.cpp block types are refused by `check_grid`.

Float16: float32 weight constants (rank ≥ 2) of the weight-reading ops are stored as float16 behind a
DEQUANTIZE op — TFLite's float16 weight pattern; vectors (biases, norm scales) stay float32.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Mapping

import numpy as np

from shared.errors import FailedPrecondition
from shared.quant.grids import Granularity, Grid
from shared.quant.qtensor import QuantizedTensor

# Ops whose input 1 is a weight we can carry, and the torch → TFLite layout of that weight.
CARRYING_OPS = {
    "FULLY_CONNECTED": (0, lambda w: w),                                 # (out, in)
    "CONV_2D": (0, lambda w: w.transpose(0, 2, 3, 1)),                   # (out, in, kh, kw) → (out, kh, kw, in)
    "DEPTHWISE_CONV_2D": (3, lambda w: w.transpose(1, 2, 3, 0)),         # (ch, 1, kh, kw) → (1, kh, kw, ch)
}
# Ops whose constant float operands are weights (stored as float16 when asked), by operand index.
FLOAT16_OPS = {"FULLY_CONNECTED": (1,), "CONV_2D": (1,), "DEPTHWISE_CONV_2D": (1,), "EMBEDDING_LOOKUP": (1,),
               "GATHER": (0,), "BATCH_MATMUL": (0, 1)}


def check_grid(name: str, grid: Grid) -> None:
    """Raises FailedPrecondition (UNSUPPORTED_OP) when TFLite cannot hold `grid`'s codes and scales."""
    if grid.gguf_type:
        raise FailedPrecondition(f"TFLite cannot express llama.cpp block type {grid.gguf_type} ({name}); "
                                 "compress onto a generic symmetric int grid", reason="UNSUPPORTED_OP",
                                 field="compressed")
    if grid.granularity is Granularity.PER_GROUP:
        raise FailedPrecondition(
            f"TFLite cannot express per-group grid {grid.name} ({name}): its weight quantization has one scale "
            "per tensor or per output channel (blockwise quantization exists in the schema, but ai-edge-quantizer "
            "writes its scales rounded to bfloat16 precision, so our float16 scales would not survive)",
            reason="UNSUPPORTED_OP", field="compressed")
    if not grid.symmetric:
        raise FailedPrecondition(f"TFLite cannot express asymmetric grid {grid.name} ({name}): TFLite weights are "
                                 "symmetric (zero point 0)", reason="UNSUPPORTED_OP", field="compressed")
    if grid.bits > 8:
        raise FailedPrecondition(f"TFLite integer weights hold at most 8 bits; {name} has {grid.bits}",
                                 reason="UNSUPPORTED_OP", field="compressed")


@dataclasses.dataclass(frozen=True)
class CarriedWeight:
    """One of our quantized weights in TFLite's terms: signed codes and per-output-channel scales."""
    name: str
    codes: np.ndarray            # int8, the parameter's torch shape; our code − 2^(bits−1)
    scales: np.ndarray           # (out,) or (1,) float32 — our float16 scales, exactly
    bits: int

    @classmethod
    def of(cls, name: str, tensor: QuantizedTensor, shape: tuple[int, ...]) -> "CarriedWeight":
        """`tensor` holds the weight as (rows, columns) = (shape[0], prod(shape[1:]))."""
        check_grid(name, tensor.grid)
        signed = tensor.codes.astype(np.int16) - (1 << (tensor.grid.bits - 1))
        scales = tensor.scales.astype(np.float32).reshape(-1)
        return cls(name, signed.astype(np.int8).reshape(shape), scales, tensor.grid.bits)

    @property
    def restricted(self) -> bool:
        """Whether every code is in [-127, 127], the int8 weight range of the TFLite quantization spec
        that the hybrid kernels assume (GPTQ's clipping can reach -128)."""
        return int(self.codes.min(initial=0)) >= -127

    def dequantized(self) -> np.ndarray:
        """ŵ in float32, bit-identical to QuantizedTensor.dequantize() (one rounding: code·scale)."""
        scales = self.scales.reshape((-1,) + (1,) * (self.codes.ndim - 1))
        return self.codes.astype(np.float32) * scales


@dataclasses.dataclass(frozen=True)
class Rewrite:
    carried: dict[str, str]                # our weight name -> TFLite tensor name holding its codes
    float16_tensors: int
    weight_only: frozenset[str] = frozenset()   # carried behind DEQUANTIZE (codes outside [-127, 127])


def _digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def _op_names(model) -> list[str]:
    """Builtin op names of subgraph 0's operators, from the TFLite schema."""
    from ai_edge_litert import schema_py_generated as schema
    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}

    def code(opcode) -> int:          # ops past 127 keep 127 (PLACEHOLDER_FOR_GREATER_OP_CODES) in the old field
        return max(int(opcode.builtinCode), int(opcode.deprecatedBuiltinCode))
    return [names.get(code(model.operatorCodes[op.opcodeIndex]), "CUSTOM") for op in model.subgraphs[0].operators]


def layouts(weight: CarriedWeight, values: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(op, `values` — the weight's codes or ŵ, torch layout — in that op's layout) for every op that
    could hold `weight`."""
    return [(op, np.ascontiguousarray(layout(values))) for op, (_, layout) in CARRYING_OPS.items()
            if (weight.codes.ndim == 2) == (op == "FULLY_CONNECTED")]


class _Graph:
    """Subgraph 0 of a ModelT with op names and tensor consumers, rebuilt after ops are dropped."""

    def __init__(self, model):
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb
        self.fb, self.model, self.subgraph = fb, model, model.subgraphs[0]
        self.ops = _op_names(model)
        self.consumers: dict[int, list[int]] = {}
        for index, op in enumerate(self.subgraph.operators):
            for tensor in {int(t) for t in op.inputs if t >= 0}:
                self.consumers.setdefault(tensor, []).append(index)

    def data(self, tensor_index: int) -> np.ndarray | None:
        return self.fb.get_tensor_data(self.subgraph.tensors[tensor_index], self.model.buffers)

    def name(self, tensor_index: int) -> str:
        return self.fb.get_tensor_name(self.subgraph.tensors[tensor_index])


def _fold_linear_chains(graph: _Graph, wanted: dict, found: dict, weight_only: set) -> None:
    """`tflite_graph.carry_weights` leaves each linear weight as ŵ → QUANTIZE → DEQUANTIZE →
    FULLY_CONNECTED. The QUANTIZE output becomes a constant holding our codes (its quantization
    parameters are already our scales), the QUANTIZE op and ŵ go, and the FULLY_CONNECTED reads the
    codes directly (hybrid kernel) — or, for a weight with a -128 code, through the DEQUANTIZE."""
    from ai_edge_litert import schema_py_generated as schema
    subgraph, dropped = graph.subgraph, set()
    for index, op in enumerate(subgraph.operators):
        content = graph.data(op.inputs[0]) if graph.ops[index] == "QUANTIZE" else None
        if content is None or content.dtype != np.float32:
            continue
        weight = wanted.get(("FULLY_CONNECTED", content.shape, _digest(content)))
        if weight is None:
            continue
        codes_index = op.outputs[0]
        codes_tensor = subgraph.tensors[codes_index]
        if not np.array_equal(np.asarray(codes_tensor.quantization.scale, np.float32), weight.scales):
            raise FailedPrecondition(f"the converter changed the scales of {weight.name}", reason="VALIDATION_FAILED")
        buffer = schema.BufferT()
        buffer.data = np.ascontiguousarray(weight.codes).reshape(-1).view(np.uint8)
        graph.model.buffers.append(buffer)
        codes_tensor.buffer = len(graph.model.buffers) - 1
        graph.model.buffers[subgraph.tensors[op.inputs[0]].buffer].data = None
        dropped.add(index)
        found[weight.name] = graph.name(codes_index)
        if not weight.restricted:
            weight_only.add(weight.name)
            continue
        for dequantize in graph.consumers.get(codes_index, []):
            value = subgraph.operators[dequantize].outputs[0]
            users = graph.consumers.get(value, [])
            if graph.ops[dequantize] != "DEQUANTIZE" or not all(graph.ops[u] == "FULLY_CONNECTED" for u in users):
                continue
            for user in users:
                subgraph.operators[user].inputs[1] = codes_index
            dropped.add(dequantize)
    subgraph.operators = [op for i, op in enumerate(subgraph.operators) if i not in dropped]
    _drop_unreferenced_tensors(graph.model)


def _drop_unreferenced_tensors(model) -> None:
    """Removes tensors no op, subgraph input/output or signature refers to any more (the folded chains'
    ŵ and DEQUANTIZE outputs), renumbering every reference; their buffers are emptied."""
    subgraph = model.subgraphs[0]
    used = {int(t) for op in subgraph.operators for t in [*op.inputs, *op.outputs] if t >= 0}
    used |= {int(t) for t in [*subgraph.inputs, *subgraph.outputs]}
    keep = sorted(used)
    index = {old: new for new, old in enumerate(keep)}
    for old, tensor in enumerate(subgraph.tensors):
        if old not in index and tensor.buffer:
            model.buffers[tensor.buffer].data = None
    subgraph.tensors = [subgraph.tensors[old] for old in keep]
    for op in subgraph.operators:
        op.inputs = np.array([index[int(t)] if t >= 0 else -1 for t in op.inputs], dtype=np.int32)
        op.outputs = np.array([index[int(t)] for t in op.outputs], dtype=np.int32)
        if op.intermediates is not None and len(op.intermediates):
            raise FailedPrecondition("ops with intermediate tensors are not expected in a converted model")
    subgraph.inputs = np.array([index[int(t)] for t in subgraph.inputs], dtype=np.int32)
    subgraph.outputs = np.array([index[int(t)] for t in subgraph.outputs], dtype=np.int32)
    for signature in model.signatureDefs or []:
        for entry in [*(signature.inputs or []), *(signature.outputs or [])]:
            entry.tensorIndex = index[int(entry.tensorIndex)]


def rewrite(model_bytes: bytes, carried: Iterable[CarriedWeight], float16: bool) -> tuple[bytes, Rewrite]:
    """Puts our codes into the converted model — linear weights from their QUANTIZE/DEQUANTIZE chains,
    conv weights (float constants equal to ŵ) through ai-edge-quantizer's QUANTIZE_TENSOR with our codes
    as its data — and, with `float16`, stores the remaining float weights as float16. A weight with a
    -128 code keeps its codes behind DEQUANTIZE (weight-only): the TFLite quantization spec restricts
    int8 weights to [-127, 127], and ai-edge-litert's builtin hybrid FULLY_CONNECTED gives wrong outputs
    on -128 (GPTQ's clipping can reach it). Raises FailedPrecondition naming a weight the file lacks."""
    from ai_edge_quantizer import model_modifier, qtyping
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb
    model = fb.read_model(bytearray(model_bytes))
    if len(model.subgraphs) != 1:
        raise FailedPrecondition(f"expected one subgraph in the converted model, found {len(model.subgraphs)}")
    carried = list(carried)
    wanted = {(op, value.shape, _digest(value)): weight
              for weight in carried for op, value in layouts(weight, weight.dequantized())}
    found: dict[str, str] = {}
    weight_only: set[str] = set()
    _fold_linear_chains(_Graph(model), wanted, found, weight_only)

    graph = _Graph(model)
    params: dict[str, qtyping.TensorTransformationParams] = {}

    def transform(tensor_index: int, transformation, quant_params) -> None:
        params[graph.name(tensor_index)] = qtyping.TensorTransformationParams(graph.name(tensor_index), consumers=[
            qtyping.OpToTensorParams(op, [transformation], quant_params) for op in graph.consumers[tensor_index]])

    for index, op in enumerate(graph.subgraph.operators):
        if graph.ops[index] not in CARRYING_OPS or len(op.inputs) < 2 or graph.name(op.inputs[1]) in params:
            continue
        content = graph.data(op.inputs[1])
        weight = None if content is None or content.dtype != np.float32 else \
            wanted.get((graph.ops[index], content.shape, _digest(content)))
        if weight is None:
            continue
        dimension, layout = CARRYING_OPS[graph.ops[index]]
        codes = np.ascontiguousarray(layout(weight.codes))
        shape = [1] * codes.ndim
        shape[dimension] = weight.scales.size
        if not weight.restricted:
            weight_only.add(weight.name)
        transform(op.inputs[1], qtyping.QuantTransformation.QUANTIZE_TENSOR if weight.restricted else
                  qtyping.QuantTransformation.ADD_DEQUANTIZE, qtyping.UniformQuantParams(
                      num_bits=8, quantized_dimension=dimension if weight.scales.size > 1 else None,
                      scale=weight.scales.reshape(shape), zero_point=np.zeros(shape, np.int32), symmetric=True,
                      quantized_data=codes))
        found[weight.name] = graph.name(op.inputs[1])
    missing = sorted({w.name for w in carried} - set(found))
    if missing:
        raise FailedPrecondition(f"the converted model holds no weight equal to {', '.join(missing)} (the converter "
                                 "changed it), so its codes cannot be carried", reason="UNSUPPORTED_OP")

    halved = 0
    if float16:
        for index, op in enumerate(graph.subgraph.operators):
            for operand in FLOAT16_OPS.get(graph.ops[index], ()):
                if operand >= len(op.inputs) or op.inputs[operand] < 0 or graph.name(op.inputs[operand]) in params:
                    continue
                content = graph.data(op.inputs[operand])
                if content is None or content.dtype != np.float32 or content.ndim < 2:
                    continue
                transform(op.inputs[operand], qtyping.QuantTransformation.ADD_DEQUANTIZE,
                          qtyping.NonLinearQuantParams(num_bits=16, quantized_data=content.astype(np.float16)))
                halved += 1
    if not params and not found:
        return model_bytes, Rewrite(found, 0)
    # The model modifier applies `params` and serializes the model, ops dropped above included.
    rewritten = model_modifier.ModelModifier(model).modify_model(params, enable_progress_bar=False)
    return bytes(rewritten), Rewrite(found, halved, frozenset(weight_only))


def quantize_activations(model: bytes, signature: str, calibration: Iterable[Mapping[str, np.ndarray]]) -> bytes:
    """Full int8: every activation int8 (asymmetric, per tensor) from ranges measured by running the model
    on `calibration` (feeds by input name), through ai-edge-quantizer's static recipe. Weights we already
    carried keep their codes and scales; each bias becomes int32 at scale input_scale·weight_scale."""
    from ai_edge_quantizer import qtyping, quantizer
    engine = quantizer.Quantizer(bytearray(model))
    engine.add_static_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, activation_num_bits=8,
                             weight_num_bits=8)
    ranges = engine.calibrate({signature: [dict(feeds) for feeds in calibration]}, num_threads=1)
    return bytes(engine.quantize(ranges, enable_progress_bar=False, enable_progress_report=False).quantized_model)
