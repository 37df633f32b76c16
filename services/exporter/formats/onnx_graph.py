"""A decoder-only causal LM (llama, qwen2, gemma3) as an ONNX graph with a KV cache, built node by node.

Inputs:  input_ids int64 (batch, sequence);
         past_key_values.{i}.key / .value (batch, kv_heads, past_sequence, head_dim), compute type.
Outputs: logits float32 (batch, sequence, vocab), whatever the compute type;
         present.{i}.key / .value (batch, kv_heads, past_sequence + sequence, head_dim), compute type.
Feed zero-length pasts for the first step, then the presents back as pasts to generate token by token.

Standard opset-21 operators (plus com.microsoft MatMulNBits when asked for), so the float and
DequantizeLinear graphs run in any onnxruntime build, mobile included. How each linear is written
(float, DequantizeLinear over our codes, MatMulNBits, static QDQ inputs) is onnx_weights.py's
business; every quantized weight is dequantized by the runtime to exactly the compressor's values.
With float16 activations the RMS norms still run in float32 (x² of llama's residual stream exceeds
float16's range), as in Hugging Face's LlamaRMSNorm.

Architectures follow shared/models/llama.py (the reference the graph is tested against): qwen2 adds
q/k/v biases; gemma3 scales norms by (1 + weight), normalises each query and key head, norms after
attention and around the MLP, scales embeddings by √d, gates with GELU(tanh), scales scores by
query_pre_attn_scalar^-½, restricts local layers to a sliding window with their own rotary base, and
may soft-cap the logits. The KV cache keeps every position; the window is a mask.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from services.exporter.formats.onnx_builder import GraphBuilder
from services.exporter.formats.onnx_weights import Linears, cast, float_const
from shared.models.decoder_config import DecoderConfig
from shared.quant.qtensor import QuantizedTensor

OPSET = 21


def build_decoder(config: DecoderConfig, tensor: Callable[[str], np.ndarray | QuantizedTensor], g: GraphBuilder,
                linears: Linears):
    """Returns an onnx.ModelProto. `tensor(hf_name)` gives float32 arrays or QuantizedTensors; `g`
    decides where initializers go; `linears` how weights and activations are written."""
    from onnx import TensorProto, helper

    precision = linears.precision
    dtype = np.dtype(precision.compute)
    H, KV, hd, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    group = H // KV
    gemma = getattr(config, "architecture", "llama") == "gemma3"
    norm_offset = np.float32(getattr(config, "norm_offset", 0.0))

    # Positions past..past+seq of this step.
    zero, one, two = g.ints([0]), g.ints([1]), g.ints([2])
    past_len = g.op("Squeeze", [g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), two], axis=0)])
    seq_len = g.op("Squeeze", [g.op("Gather", [g.op("Shape", ["input_ids"]), one], axis=0)])
    total_len = g.op("Add", [past_len, seq_len])
    step = g.scalar("scalar.one", 1, np.int64)
    positions = g.op("Range", [past_len, total_len, step])                            # (seq,)
    key_positions = g.op("Range", [g.scalar("scalar.zero", 0, np.int64), total_len, step])
    distance = g.op("Sub", [g.op("Unsqueeze", [positions, one]),                      # (seq, 1)
                            g.op("Unsqueeze", [key_positions, zero])])                # (1, total) -> (seq, total)

    position_values = g.op("Unsqueeze", [cast(g, positions, np.float32), one])         # (seq, 1)

    def rotary(base: float, name: str) -> tuple[str, str]:
        """cos, sin (1, 1, seq, hd) of the step's positions, computed in the graph as the reference does
        (float32 position × float32 inverse frequency); tables over max_position_embeddings would
        weigh up to half a GB for long-context models."""
        inv_freq = (1.0 / (base ** (np.arange(0, hd, 2, dtype=np.float64) / hd))).astype(np.float32)
        angles = g.op("Mul", [position_values, g.const(name + ".inv_freq", inv_freq)])  # (seq, hd/2)
        angles = g.op("Unsqueeze", [g.op("Concat", [angles, angles], axis=-1), g.ints([0, 1])])   # (1,1,seq,hd)
        cos, sin = g.op("Cos", [angles]), g.op("Sin", [angles])
        return (cast(g, cos, dtype), cast(g, sin, dtype)) if precision.half else (cos, sin)

    def attention_bias(window: int) -> str:
        """(seq, total): 0 where a query may attend a key (causal; within `window` if set), else −max."""
        allowed = g.op("GreaterOrEqual", [distance, g.scalar(g.fresh("scalar.0"), 0, np.int64)])
        if window:
            allowed = g.op("And", [allowed, g.op("Less", [distance, g.scalar(g.fresh("window"), window, np.int64)])])
        return g.op("Where", [allowed, g.scalar(g.fresh("scalar.f0"), 0.0, dtype),
                              g.scalar(g.fresh("scalar.fmin"), np.finfo(dtype).min, dtype)])

    global_rotary = rotary(config.rope_theta, "rope")
    local_rotary = rotary(config.rope_local_base_freq, "rope.local") if gemma else global_rotary
    global_bias = attention_bias(0)
    local_bias = attention_bias(config.sliding_window) if gemma and config.sliding_window else global_bias
    eps = g.scalar("rms.eps", config.rms_norm_eps, np.float32)
    scale = g.scalar("attn.scale", (config.query_pre_attn_scalar if gemma else hd) ** -0.5, dtype)
    last_axis = g.ints([-1])

    def rms_norm(x: str, weight_name: str) -> str:                                    # in float32
        x32 = cast(g, x, np.float32) if precision.half else x
        mean_square = g.op("ReduceMean", [g.op("Mul", [x32, x32]), last_axis], keepdims=1)
        normed = g.op("Mul", [x32, g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean_square, eps])])])])
        normed = cast(g, normed, dtype) if precision.half else normed
        weight = tensor(weight_name) + norm_offset if norm_offset else tensor(weight_name)    # gemma3: (1 + w)
        return g.op("Mul", [normed, float_const(g, weight_name, weight, precision)])

    def linear(x: str, weight_name: str) -> str:
        y = linears(x, weight_name, tensor(weight_name))
        bias_name = weight_name.removesuffix(".weight") + ".bias"
        if getattr(config, "qkv_bias", False) and ".self_attn." in bias_name and ".o_proj." not in bias_name:
            y = g.op("Add", [y, float_const(g, bias_name, tensor(bias_name), precision)])           # qwen2
        return y

    def rotate(x: str, cos: str, sin: str) -> str:                                    # x·cos + rotate_half(x)·sin
        first = g.op("Slice", [x, g.ints([0]), g.ints([hd // 2]), g.ints([3])])
        second = g.op("Slice", [x, g.ints([hd // 2]), g.ints([hd]), g.ints([3])])
        rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=3)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    def heads(x: str, count: int) -> str:                                   # (B,S,count·hd) -> (B,count,S,hd)
        return g.op("Transpose", [g.op("Reshape", [x, g.ints([0, 0, count, hd])])], perm=[0, 2, 1, 3])

    def activation(gate: str) -> str:
        if gemma:
            return g.op("Gelu", [gate], approximate="tanh")
        return g.op("Mul", [gate, g.op("Sigmoid", [gate])])                             # SiLU

    onnx_dtype = precision.onnx_compute()
    embed_name = "model.embed_tokens.weight"
    embedding = float_const(g, embed_name, tensor(embed_name), precision)
    x = g.op("Gather", [embedding, "input_ids"], axis=0)                              # (B, S, d)
    if gemma:
        x = g.op("Mul", [x, g.scalar("embed.scale", np.float32(d ** 0.5), dtype)])
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", config.vocab_size])]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        local = gemma and config.is_sliding(i)
        cos, sin = local_rotary if local else global_rotary
        h = rms_norm(x, p + "input_layernorm.weight")
        q = heads(linear(h, p + "self_attn.q_proj.weight"), H)                       # (B,H,S,hd)
        k = heads(linear(h, p + "self_attn.k_proj.weight"), KV)                      # (B,KV,S,hd)
        v = heads(linear(h, p + "self_attn.v_proj.weight"), KV)
        if gemma:
            q, k = rms_norm(q, p + "self_attn.q_norm.weight"), rms_norm(k, p + "self_attn.k_norm.weight")
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k = g.node("Concat", [past_k, k], f"present.{i}.key", axis=2)
        present_v = g.node("Concat", [past_v, v], f"present.{i}.value", axis=2)
        for name in (past_k, past_v):
            inputs.append(helper.make_tensor_value_info(name, onnx_dtype, ["batch", KV, "past_sequence", hd]))
        for name in (present_k, present_v):
            outputs.append(helper.make_tensor_value_info(name, onnx_dtype, ["batch", KV, "total_sequence", hd]))
        # Grouped-query attention by broadcasting: q (B,KV,group,S,hd) against k,v (B,KV,1,T,hd).
        q5 = g.op("Reshape", [q, g.ints([0, KV, group, -1, hd])])
        k5 = g.op("Unsqueeze", [present_k, two])
        v5 = g.op("Unsqueeze", [present_v, two])
        scores = g.op("Mul", [g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])]), scale])
        weights = g.op("Softmax", [g.op("Add", [scores, local_bias if local else global_bias])], axis=-1)
        y = g.op("Reshape", [g.op("MatMul", [weights, v5]), g.ints([0, H, -1, hd])])  # (B,H,S,hd)
        y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), g.ints([0, 0, H * hd])])
        attended = linear(y, p + "self_attn.o_proj.weight")
        if gemma:                                                                      # norms after, and around the MLP
            x = g.op("Add", [x, rms_norm(attended, p + "post_attention_layernorm.weight")])
            h = rms_norm(x, p + "pre_feedforward_layernorm.weight")
        else:
            x = g.op("Add", [x, attended])
            h = rms_norm(x, p + "post_attention_layernorm.weight")
        gated = g.op("Mul", [activation(linear(h, p + "mlp.gate_proj.weight")), linear(h, p + "mlp.up_proj.weight")])
        y = linear(gated, p + "mlp.down_proj.weight")
        x = g.op("Add", [x, rms_norm(y, p + "post_feedforward_layernorm.weight") if gemma else y])
    h = rms_norm(x, "model.norm.weight")
    flat = g.op("Reshape", [h, g.ints([-1, d])])
    head = embedding if config.tie_word_embeddings else \
        float_const(g, "lm_head.weight", tensor("lm_head.weight"), precision)
    logits = g.op("Gemm", [flat, head], transB=1)                                     # (B·S, vocab)
    if precision.half:
        logits = cast(g, logits, np.float32)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        cap_value = g.scalar("logits.cap", cap, np.float32)
        logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap_value])]), cap_value])
    batch_seq = g.op("Slice", [g.op("Shape", ["input_ids"]), zero, two, zero])
    shape = g.op("Concat", [batch_seq, g.ints([config.vocab_size])], axis=0)
    g.node("Reshape", [logits, shape], "logits")
    opsets = {"": OPSET}
    if any(node.domain == "com.microsoft" for node in g.nodes):
        opsets["com.microsoft"] = 1
    return g.model("decoder", inputs, outputs, opsets)
