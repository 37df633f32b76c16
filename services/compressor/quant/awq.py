"""AWQ (Lin et al. 2023, arXiv:2306.00978): activation-aware scaling and clipping of one decoder block.

Weights that meet large activations matter most. For each set of linears sharing an input x, AWQ
searches a per-input-channel scale s = mean|x|^α (normalised by sqrt(max·min)), α ∈ {0, 1/n, …},
quantizing W·diag(s) and feeding x·diag(s)⁻¹, and keeps the α whose block output is closest to the
float output. The inverse scale is folded into the op that produces x — the RMSNorm weight for
q/k/v and gate/up, the previous linear's rows for o_proj (v_proj, only without grouped-query
attention, as in the reference implementation) and down_proj (up_proj) — so the exported model
has no extra op and is identical in float arithmetic. Then each linear's weights (except q/k,
whose errors the softmax forgives) are clipped per group to the ratio of their max that minimises
the output error on a token sample.

CPU budget: the search runs on at most SEARCH_TOKENS calibration tokens (evenly spaced sequences) and
the clip search on CLIP_TOKENS evenly spaced tokens plus the CLIP_OUTLIERS loudest (the paper uses
128×512 tokens on a GPU). Before GPTQ (recipe awq → gptq) only the scales are applied: clipped weights
would become GPTQ's target, and it compensates rounding itself; measured on SmolLM2 Q4_0, clipping
first made the model unusable (perplexity 17,424), scales alone beat GPTQ alone on the last blocks.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from services.compressor.quant.rtn import quantize
from shared.quant.codecs import codec_for
from shared.quant.grids import AwqOptions, Grid

SEARCH_TOKENS = 2048
CLIP_TOKENS = 512
CLIP_OUTLIERS = 64
CLIP_MAX_SHRINK = 0.5
CLIP_GRID = 20


@dataclasses.dataclass
class AwqReport:
    alphas: dict[str, float]                  # group's first linear -> chosen α
    clip_ratio: dict[str, float]              # linear -> mean chosen clip ratio
    skipped: list[str]                        # groups not scaled, with the reason


def qdq(W: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Quantize-dequantize with the grid's round-to-nearest (what the search scores)."""
    out = quantize(W.detach().cpu().numpy(), grid).dequantize()
    return torch.from_numpy(out).to(W.device)


def _sample_sequences(count: int, tokens_per_sequence: int, budget: int) -> list[int]:
    keep = max(1, min(count, budget // tokens_per_sequence))
    return sorted({int(i) for i in np.linspace(0, count - 1, keep)})


def search_scale(x: torch.Tensor, linears: list[torch.nn.Linear], grids: list[Grid],
                 inspect: Callable[[torch.Tensor], torch.Tensor], steps: int) -> tuple[torch.Tensor, float]:
    """Best s for linears fed by x (sequences, tokens, features); `inspect(x)` is the module output."""
    mean_abs = x.abs().reshape(-1, x.shape[-1]).mean(0)
    with torch.inference_mode():
        reference = inspect(x)
    originals = [linear.weight.data.clone() for linear in linears]
    best = (float("inf"), torch.ones_like(mean_abs), 0.0)
    try:
        for i in range(steps):
            alpha = i / steps
            s = mean_abs.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for linear, weight, grid in zip(linears, originals, grids):
                linear.weight.data = qdq(weight * s, grid) / s
            with torch.inference_mode():
                loss = float((inspect(x) - reference).pow(2).mean())
            if loss < best[0]:
                best = (loss, s.clone(), alpha)
    finally:
        for linear, weight in zip(linears, originals):
            linear.weight.data = weight
    return best[1], best[2]


def clip_search(W: torch.Tensor, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, float]:
    """Per (row, group) clip of W to ±r·max|W_g| minimising ‖x_g W_gᵀ − x_g Q(W_g)ᵀ‖² over a token sample."""
    rows, columns = W.shape
    codec = codec_for(grid, columns)
    group = codec.sub
    groups = columns // group
    xg = x.reshape(-1, groups, group)                                   # (tokens, groups, group)
    Wg = W.reshape(rows, groups, group)
    reference = torch.einsum("tgc,rgc->rtg", xg, Wg)                    # per-group partial outputs
    top = Wg.abs().amax(-1, keepdim=True)                               # (rows, groups, 1)
    best_err = torch.full((rows, groups), float("inf"), device=W.device)
    best_max = top.clone()
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        limit = top * (1 - i / CLIP_GRID)
        clipped = torch.maximum(torch.minimum(Wg, limit), -limit).reshape(rows, columns)
        q = qdq(clipped, grid).reshape(rows, groups, group)
        err = (torch.einsum("tgc,rgc->rtg", xg, q) - reference).pow(2).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.unsqueeze(-1), limit, best_max)
    clipped = torch.maximum(torch.minimum(Wg, best_max), -best_max).reshape(rows, columns)
    ratio = float((best_max / top.clamp(min=1e-12)).mean())
    return clipped, ratio


def clip_sample(x: torch.Tensor) -> torch.Tensor:
    """CLIP_TOKENS evenly spaced tokens plus the CLIP_OUTLIERS with the largest inputs. Rare tokens with
    massive activations (the BOS "attention sink") decide which weights must not be clipped; an even
    sample alone misses them, and clipping for the common tokens then breaks the rare ones."""
    even = torch.linspace(0, x.shape[0] - 1, min(CLIP_TOKENS, x.shape[0])).long()
    loud = x.abs().amax(-1).topk(min(CLIP_OUTLIERS, x.shape[0])).indices
    return x[torch.unique(torch.cat([even, loud]))]


def attention_core(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The attention block's output before o_proj, (B, T, heads·head_dim)."""
    from shared.models.llama import rotate_half
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.kv_heads, attn.head_dim).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    group = attn.heads // attn.kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, -1)


@torch.inference_mode()
def _inputs(block, hidden: torch.Tensor, cos, sin) -> dict[str, torch.Tensor]:
    """The float inputs of each linear group on the sampled sequences."""
    x1 = block.input_layernorm(hidden)
    y = attention_core(block.self_attn, x1, cos, sin)
    h2 = hidden + block.self_attn.o_proj(y)
    x2 = block.post_attention_layernorm(h2)
    mlp = block.mlp
    a = torch.nn.functional.silu(mlp.gate_proj(x2)) * mlp.up_proj(x2)
    return {"qkv": x1, "o": y, "gate_up": x2, "down": a}


def awq_block(block, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              grid_of: Callable[[str], Grid], options: AwqOptions, prefix: str) -> AwqReport:
    """Scales and clips block's float weights in place (output-preserving up to the clipping)."""
    chosen = _sample_sequences(hidden.shape[0], hidden.shape[1], SEARCH_TOKENS)
    sample = hidden[chosen]
    inputs = _inputs(block, sample, cos, sin)
    attn, mlp = block.self_attn, block.mlp
    report = AwqReport({}, {}, [])
    name = lambda suffix: f"{prefix}{suffix}.weight"                    # noqa: E731

    def apply(linears, s, fold_into):
        for linear in linears:
            linear.weight.data = linear.weight.data * s
        if isinstance(fold_into, torch.nn.Linear):                      # previous linear: its output rows
            fold_into.weight.data = fold_into.weight.data / s.unsqueeze(1)
        else:                                                           # RMSNorm weight
            fold_into.weight.data = fold_into.weight.data / s

    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    s, alpha = search_scale(inputs["qkv"], qkv, [grid_of(name(f"self_attn.{p}")) for p in ("q_proj", "k_proj",
                                                                                          "v_proj")],
                            lambda x: attention_core(attn, x, cos, sin), options.grid)
    apply(qkv, s, block.input_layernorm)
    report.alphas[name("self_attn.q_proj")] = alpha
    if attn.v_proj.weight.shape[0] == attn.o_proj.weight.shape[1]:
        s, alpha = search_scale(inputs["o"], [attn.o_proj], [grid_of(name("self_attn.o_proj"))], attn.o_proj,
                                options.grid)
        apply([attn.o_proj], s, attn.v_proj)
        report.alphas[name("self_attn.o_proj")] = alpha
    else:
        report.skipped.append(f"{name('self_attn.o_proj')}: grouped-query attention (v_proj has "
                              f"{attn.v_proj.weight.shape[0]} outputs, o_proj {attn.o_proj.weight.shape[1]} inputs)")
    gate_up = [mlp.gate_proj, mlp.up_proj]
    s, alpha = search_scale(inputs["gate_up"], gate_up, [grid_of(name("mlp.gate_proj")), grid_of(name("mlp.up_proj"))],
                            mlp, options.grid)
    apply(gate_up, s, block.post_attention_layernorm)
    report.alphas[name("mlp.gate_proj")] = alpha
    s, alpha = search_scale(inputs["down"], [mlp.down_proj], [grid_of(name("mlp.down_proj"))], mlp.down_proj,
                            options.grid)
    apply([mlp.down_proj], s, mlp.up_proj)
    report.alphas[name("mlp.down_proj")] = alpha

    if options.clip:
        inputs = _inputs(block, sample, cos, sin)                       # after scaling
        for key, linears in (("qkv", [("self_attn.v_proj", attn.v_proj)]), ("o", [("self_attn.o_proj", attn.o_proj)]),
                             ("gate_up", [("mlp.gate_proj", mlp.gate_proj), ("mlp.up_proj", mlp.up_proj)]),
                             ("down", [("mlp.down_proj", mlp.down_proj)])):
            x = clip_sample(inputs[key].reshape(-1, inputs[key].shape[-1]))
            for suffix, linear in linears:
                clipped, ratio = clip_search(linear.weight.data, x, grid_of(name(suffix)))
                linear.weight.data = clipped
                report.clip_ratio[name(suffix)] = ratio
    return report
