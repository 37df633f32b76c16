"""A llama causal LM as an ONNX graph with a KV cache, built node by node with onnx.helper.

Inputs:  input_ids int64 (batch, sequence);
         past_key_values.{i}.key / .value float32 (batch, kv_heads, past_sequence, head_dim).
Outputs: logits float32 (batch, sequence, vocab);
         present.{i}.key / .value float32 (batch, kv_heads, past_sequence + sequence, head_dim).
Feed zero-length pasts for the first step, then the presents back as pasts to generate token by token.

Standard opset-21 operators only, so it runs in any onnxruntime build (mobile included). Linear
weights are either float initializers or DequantizeLinear nodes over our own integer codes
(per-channel int8/uint8, or blocked int4/uint4 for per-group grids): onnxruntime dequantizes exactly
the values the compressor chose, nothing is re-quantized.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from shared.models.decoder_config import DecoderConfig
from shared.quant.grids import Granularity
from shared.quant.qtensor import QuantizedTensor

OPSET = 21
FLOAT_MIN = float(np.finfo(np.float32).min)


class GraphBuilder:
    """Accumulates nodes and initializers; names are made unique by a counter."""

    def __init__(self):
        self.nodes, self.initializers, self._count = [], [], 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str = "", **attributes) -> str:
        from onnx import helper
        out = self.fresh(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attributes))
        return out

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, values: list[int]) -> str:
        return self.const(self.fresh("const"), np.array(values, dtype=np.int64))


def int4_const(g: GraphBuilder, name: str, array: np.ndarray, signed: bool) -> str:
    """An INT4/UINT4 initializer: two values per byte, the first in the low nibble (ONNX's packing)."""
    import onnx
    flat = (array.astype(np.int16).reshape(-1) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    tensor = onnx.TensorProto(name=name, dims=list(array.shape),
                              data_type=onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4)
    tensor.raw_data = (flat[0::2] | (flat[1::2] << 4)).tobytes()
    g.initializers.append(tensor)
    return name


def linear_weight(g: GraphBuilder, name: str, value: np.ndarray | QuantizedTensor) -> str:
    """A tensor equal to Wᵀ (in_features, out_features), for MatMul(x, Wᵀ)."""
    if not isinstance(value, QuantizedTensor):
        return g.const(name, np.ascontiguousarray(value.T, dtype=np.float32))
    grid = value.grid
    offset = 1 << (grid.bits - 1)
    if grid.symmetric:
        codes = (value.codes.astype(np.int16) - offset).astype(np.int8)          # signed q
        zeros = np.zeros(value.scales.shape, dtype=np.int8)
    else:
        codes, zeros = value.codes, value.zeros
    scales = value.scales.astype(np.float32)
    make = (lambda tensor_name, array: int4_const(g, tensor_name, array, grid.symmetric)) if grid.bits == 4 \
        else g.const
    if grid.granularity is Granularity.PER_TENSOR:
        q = make(name + ".codes", np.ascontiguousarray(codes.T))
        s = g.const(name + ".scales", scales.reshape(()))
        z = make(name + ".zeros", zeros.reshape(()))
        return g.op("DequantizeLinear", [q, s, z], name)
    if grid.granularity is Granularity.PER_CHANNEL:
        q = make(name + ".codes", np.ascontiguousarray(codes.T))                    # (in, out)
        s = g.const(name + ".scales", scales[:, 0])                                  # (out,)
        z = make(name + ".zeros", zeros[:, 0])
        return g.op("DequantizeLinear", [q, s, z], name, axis=1)
    q = make(name + ".codes", np.ascontiguousarray(codes.T))                        # (in, out)
    s = g.const(name + ".scales", np.ascontiguousarray(scales.T))                    # (in/group, out)
    z = make(name + ".zeros", np.ascontiguousarray(zeros.T))
    return g.op("DequantizeLinear", [q, s, z], name, axis=0, block_size=grid.group_size)


def build_llama(config: DecoderConfig, tensor: Callable[[str], np.ndarray | QuantizedTensor]):
    """Returns an onnx.ModelProto. `tensor(hf_name)` gives float32 arrays or QuantizedTensors."""
    import onnx
    from onnx import TensorProto, helper

    g = GraphBuilder()
    H, KV, hd, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    group = H // KV
    L = config.num_hidden_layers

    # Rotary tables for every position, gathered by the step's positions.
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    angles = np.outer(np.arange(config.max_position_embeddings, dtype=np.float32), inv_freq.astype(np.float32))
    angles = np.concatenate([angles, angles], axis=-1)                                # (positions, hd)
    cos_table = g.const("rope.cos", np.cos(angles).astype(np.float32))
    sin_table = g.const("rope.sin", np.sin(angles).astype(np.float32))

    # Positions past..past+seq and the causal bias (seq, total).
    zero, one, two = g.ints([0]), g.ints([1]), g.ints([2])
    past_len = g.op("Squeeze", [g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), two], axis=0)])
    seq_len = g.op("Squeeze", [g.op("Gather", [g.op("Shape", ["input_ids"]), one], axis=0)])
    total_len = g.op("Add", [past_len, seq_len])
    step = g.const("scalar.one", np.array(1, dtype=np.int64))
    positions = g.op("Range", [past_len, total_len, step])                            # (seq,)
    cos = g.op("Unsqueeze", [g.op("Gather", [cos_table, positions], axis=0), g.ints([0, 1])])   # (1,1,seq,hd)
    sin = g.op("Unsqueeze", [g.op("Gather", [sin_table, positions], axis=0), g.ints([0, 1])])
    key_positions = g.op("Range", [g.const("scalar.zero", np.array(0, dtype=np.int64)), total_len, step])
    allowed = g.op("LessOrEqual", [g.op("Unsqueeze", [key_positions, zero]),          # (1, total)
                                   g.op("Unsqueeze", [positions, one])])              # (seq, 1)
    bias = g.op("Where", [allowed, g.const("scalar.f0", np.array(0.0, dtype=np.float32)),
                          g.const("scalar.fmin", np.array(FLOAT_MIN, dtype=np.float32))])  # (seq, total)
    eps = g.const("rms.eps", np.array(config.rms_norm_eps, dtype=np.float32))
    scale = g.const("attn.scale", np.array(1.0 / np.sqrt(hd), dtype=np.float32))
    last_axis = g.ints([-1])

    def rms_norm(x: str, weight_name: str) -> str:
        mean_square = g.op("ReduceMean", [g.op("Mul", [x, x]), last_axis], keepdims=1)
        normed = g.op("Mul", [x, g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean_square, eps])])])])
        return g.op("Mul", [normed, g.const(weight_name, tensor(weight_name))])

    def linear(x: str, weight_name: str) -> str:
        return g.op("MatMul", [x, linear_weight(g, weight_name, tensor(weight_name))])

    def rotate(x: str) -> str:                                                        # x·cos + rotate_half(x)·sin
        first = g.op("Slice", [x, g.ints([0]), g.ints([hd // 2]), g.ints([3])])
        second = g.op("Slice", [x, g.ints([hd // 2]), g.ints([hd]), g.ints([3])])
        rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=3)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    def heads(x: str, count: int) -> str:                                             # (B,S,count·hd) -> (B,count,S,hd)
        return g.op("Transpose", [g.op("Reshape", [x, g.ints([0, 0, count, hd])])], perm=[0, 2, 1, 3])

    embed_name = "model.embed_tokens.weight"
    embedding = g.const(embed_name, tensor(embed_name))
    x = g.op("Gather", [embedding, "input_ids"], axis=0)                              # (B, S, d)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", config.vocab_size])]
    for i in range(L):
        p = f"model.layers.{i}."
        h = rms_norm(x, p + "input_layernorm.weight")
        q = rotate(heads(linear(h, p + "self_attn.q_proj.weight"), H))              # (B,H,S,hd)
        k = rotate(heads(linear(h, p + "self_attn.k_proj.weight"), KV))             # (B,KV,S,hd)
        v = heads(linear(h, p + "self_attn.v_proj.weight"), KV)
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        g.nodes.append(helper.make_node("Concat", [past_k, k], [present_k], axis=2, name=present_k))
        g.nodes.append(helper.make_node("Concat", [past_v, v], [present_v], axis=2, name=present_v))
        for name in (past_k, past_v):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", KV, "past_sequence", hd]))
        for name in (present_k, present_v):
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", KV, "total_sequence", hd]))
        # Grouped-query attention by broadcasting: q (B,KV,group,S,hd) against k,v (B,KV,1,T,hd).
        q5 = g.op("Reshape", [q, g.ints([0, KV, group, -1, hd])])
        k5 = g.op("Unsqueeze", [present_k, two])
        v5 = g.op("Unsqueeze", [present_v, two])
        scores = g.op("Mul", [g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])]), scale])
        weights = g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1)            # (B,KV,group,S,T)
        y = g.op("Reshape", [g.op("MatMul", [weights, v5]), g.ints([0, H, -1, hd])])  # (B,H,S,hd)
        y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), g.ints([0, 0, d])])
        x = g.op("Add", [x, linear(y, p + "self_attn.o_proj.weight")])
        h = rms_norm(x, p + "post_attention_layernorm.weight")
        gate = linear(h, p + "mlp.gate_proj.weight")
        up = linear(h, p + "mlp.up_proj.weight")
        x = g.op("Add", [x, linear(g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up]),
                                   p + "mlp.down_proj.weight")])
    h = rms_norm(x, "model.norm.weight")
    flat = g.op("Reshape", [h, g.ints([-1, d])])
    head = embedding if config.tie_word_embeddings else g.const("lm_head.weight", tensor("lm_head.weight"))
    logits = g.op("Gemm", [flat, head], transB=1)                                     # (B·S, vocab)
    batch_seq = g.op("Slice", [g.op("Shape", ["input_ids"]), zero, two, zero])
    shape = g.op("Concat", [batch_seq, g.ints([config.vocab_size])], axis=0)
    g.nodes.append(helper.make_node("Reshape", [logits, shape], ["logits"], name="logits"))
    graph = helper.make_graph(g.nodes, "llama", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeforge")
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=False)
    return model
