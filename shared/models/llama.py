"""The float32 torch reference forward of every decoder architecture (shared/models/decoder_config.py).

It follows Hugging Face's semantics (LlamaForCausalLM, Qwen2ForCausalLM, Gemma3ForCausalLM): RMSNorm
in float32, rotary embeddings applied with `rotate_half` on the two halves of each head,
grouped-query attention, gated MLP. Per architecture:
- qwen2:  biases on the q, k, v projections;
- gemma3: RMSNorm scales by (1 + weight); q_norm/k_norm on each head before rotary; a norm after
  attention and one before and after the MLP; embeddings times sqrt(hidden_size); GELU(tanh) gate;
  scores scaled by query_pre_attn_scalar^-1/2; local layers see the last `sliding_window` tokens
  (themselves included) with rotary base rope_local_base_freq, global layers everything with
  rope_theta; optional final logit soft-capping.
It is edgeforge's "source model": exported files are validated against its logits and its
perplexity is every candidate's baseline.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from shared.errors import InvalidArgument
from shared.models.decoder_config import DecoderConfig

# ---------------------------------------------------------------- reference forward

class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps, self.offset = eps, offset            # gemma3 scales by (1 + weight): offset 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight + self.offset if self.offset else self.weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def sliding_window_mask(tokens: int, window: int, device=None) -> torch.Tensor:
    """(T, T) bool, True where query i may attend key j: j ≤ i and i − j < window."""
    i = torch.arange(tokens, device=device).unsqueeze(1)
    j = torch.arange(tokens, device=device).unsqueeze(0)
    return (j <= i) & (i - j < window)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer: int = 0):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        bias = config.qkv_bias
        self.q_proj = nn.Linear(d, self.heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)
        self.scale: float | None = None                 # None: SDPA's 1/sqrt(head_dim)
        self.window = 0                                 # 0: plain causal attention
        if config.architecture == "gemma3":
            self.q_norm = RMSNorm(hd, config.rms_norm_eps, config.norm_offset)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps, config.norm_offset)
            self.scale = config.query_pre_attn_scalar ** -0.5
            self.window = config.sliding_window if config.is_sliding(layer) else 0

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)      # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)   # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)                                          # (B, H, T, hd)
        v = v.repeat_interleave(group, dim=1)
        if self.window and self.window < T:
            mask = sliding_window_mask(T, self.window, x.device)                       # (T, T)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        elif self.scale is not None:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gelu = config.architecture == "gemma3"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = torch.nn.functional.gelu(gate, approximate="tanh") if self.gelu else torch.nn.functional.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One block. Parameter names equal the HF checkpoint's (after `model.layers.{i}.`)."""

    def __init__(self, config: DecoderConfig, layer: int = 0):
        super().__init__()
        eps, offset = config.rms_norm_eps, config.norm_offset
        self.input_layernorm = RMSNorm(config.hidden_size, eps, offset)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, offset)
        self.sandwich = config.architecture == "gemma3"          # norms after attention and MLP too
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)


def inverse_frequencies(base: float, head_dim: int) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim/2,) float32, computed in float64."""
    return (1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))).float()


class LlamaForCausalLM(nn.Module):
    """Float32 reference of any DecoderConfig architecture. Parameter names equal the HF checkpoint's."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def rotary(self, T: int, base: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, head_dim) for rotary base `base` (default: rope_theta)."""
        inv_freq = inverse_frequencies(self.config.rope_theta if base is None else base, self.config.head_dim)
        angles = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)        # (T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)                                 # (T, hd)
        return angles.cos(), angles.sin()

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) int64 -> final normed hidden states (B, T, d)."""
        config, T = self.config, tokens.shape[1]
        full = self.rotary(T)
        local = self.rotary(T, config.rope_local_base_freq) if config.architecture == "gemma3" else full
        x = self.model.embed_tokens(tokens)
        if config.architecture == "gemma3":
            x = x * torch.tensor(config.hidden_size ** 0.5, dtype=x.dtype)
        for index, layer in enumerate(self.model.layers):
            x = layer(x, *(local if config.is_sliding(index) else full))
        return self.model.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) int64 -> logits (B, T, vocab) float32."""
        logits = self.lm_head(self.hidden_states(tokens))
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits


def build_reference(config: DecoderConfig, read_tensor: Callable[[str], torch.Tensor]) -> LlamaForCausalLM:
    """Builds the reference with weights from `read_tensor(hf_name) -> float32 tensor`."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    expected = config.tensor_shapes()
    state = {}
    for name, shape in expected.items():
        tensor = read_tensor(name)
        if tuple(tensor.shape) != shape:
            raise InvalidArgument(f"tensor {name} has shape {tuple(tensor.shape)}, config.json implies {shape}",
                                  reason="MALFORMED_MODEL", field="model")
        state[name] = tensor
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
