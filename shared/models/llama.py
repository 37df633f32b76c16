"""The llama architecture: config, tensor names, and the float32 torch reference forward.

The reference follows Hugging Face's LlamaForCausalLM semantics (RMSNorm in float32, rotary
embeddings applied with `rotate_half` on the two halves of each head, grouped-query attention,
SwiGLU MLP). It is edgeforge's "source model": exported files are validated against its logits
and its perplexity is every candidate's baseline.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from shared.errors import InvalidArgument
from shared.models.decoder_config import DecoderConfig

# ---------------------------------------------------------------- reference forward

class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)      # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)   # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)                                          # (B, H, T, hd)
        v = v.repeat_interleave(group, dim=1)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Float32 reference. Parameter names equal the HF checkpoint's tensor names."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64)
                                                / config.head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def rotary(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.outer(torch.arange(T, dtype=torch.float32), self.inv_freq)     # (T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)                                 # (T, hd)
        return angles.cos(), angles.sin()

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) int64 -> final normed hidden states (B, T, d)."""
        cos, sin = self.rotary(tokens.shape[1])
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) int64 -> logits (B, T, vocab) float32."""
        return self.lm_head(self.hidden_states(tokens))


def build_reference(config: DecoderConfig, read_tensor: Callable[[str], torch.Tensor]) -> LlamaForCausalLM:
    """Builds the reference with weights from `read_tensor(hf_name) -> float32 tensor`."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64)
                                            / config.head_dim))
    model.inv_freq = inv_freq.float()
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
