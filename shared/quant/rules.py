"""Which tensors a recipe quantizes, and onto which grid.

GGUF recipes follow llama.cpp's per-tensor type rules (`llama_tensor_get_type` in llama-quant.cpp)
so our files carry the same types as `llama-quantize` would write, for llama, qwen2 and gemma3 alike
(llama.cpp's rules name tensor roles, not architectures: none of its per-architecture exceptions —
Falcon, MoE experts, 70B — applies to these three):
- 1-D tensors stay float32: every norm (gemma3's four per block and its q_norm/k_norm included) and
  qwen2's q/k/v biases.
- The output projection — `output.weight`, or `token_embd.weight` when embeddings are tied (SmolLM2,
  Gemma 3) — gets Q6_K for every type below 8 bits (Q8_0 stays Q8_0), then the row-length fallback:
  Gemma 3 270M's 640-column embeddings become Q8_0. An untied `token_embd.weight` (qwen2) gets the
  recipe's base type like any other weight.
- Every other 2-D weight gets the recipe's type; the mixes (Q4_K_M, Q5_K_M) upgrade some tensors
  (`mix_type`).
- A tensor whose row length the chosen type's blocks do not divide falls back the way llama.cpp
  does (`tensor_type_fallback` in llama-quant.cpp): Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0,
  Q2_K/Q3_K → Q4_0. (Older llama.cpp sent Q2_K/Q3_K to IQ4_NL; the bundled one writes Q4_0, and
  tests/shared/quant/test_kquants.py checks every fallback against it.)
- The mixes (Q4_K_M, Q5_K_M): attn_v and ffn_down get Q6_K in the first and last eighth of the
  layers and in every third layer between (`use_more_bits`, counted per layer since llama.cpp visits
  tensors in layer order). They are checked tensor by tensor against llama.cpp's
  LLAMA_FTYPE_MOSTLY_Q4_K_M / Q5_K_M on SmolLM2 (tests/shared/quant/test_kquants.py), on slices of
  SmolLM2 and Gemma 3 and a qwen2 (tests/services/exporter/test_gguf_bitexact.py), and against the
  types of the released Gemma 3 270M Q4_K_M file.
- The plain K types are "pure": every weight gets the type (llama.cpp's Q2_K, Q3_K_S and Q4_K_S
  ftypes would upgrade some attn_v/ffn_down tensors; `llama-quantize --pure` does not), except the
  output projection, which gets Q6_K as in every llama.cpp mixture (`--pure` plus a tensor-type
  override of the output to Q6_K reproduces these files exactly).
- Float exports (the exporter's float_type F32/F16/BF16, no recipe) store every 2-D tensor in that
  type, embeddings included, and 1-D tensors in float32, as LLAMA_FTYPE_ALL_F32/MOSTLY_F16/MOSTLY_BF16.
Generic integer grids (ONNX candidates) quantize only the transformer blocks' linear weights;
embeddings, the LM head and norms stay float32.
"""
from __future__ import annotations

import re

from shared.models.decoder_config import DecoderConfig, is_linear_weight
from shared.quant.grids import GGUF_BLOCKS, GGUF_GRIDS, Grid, QuantizationConfig

FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q2_k": "q4_0", "q3_k": "q4_0"}


def is_output_projection(name: str, config: DecoderConfig) -> bool:
    return name == "lm_head.weight" or (config.tie_word_embeddings and name == "model.embed_tokens.weight")


def fits(type_name: str, columns: int) -> str:
    """`type_name`, or llama.cpp's fallback when its blocks do not divide the row."""
    while columns % GGUF_BLOCKS[type_name][0]:
        type_name = FALLBACK[type_name]
    return type_name


def _layer(name: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def mix_type(name: str, config: DecoderConfig, mix: str) -> str:
    """llama.cpp's Q4_K_M / Q5_K_M rules for one tensor (before the row-length fallback):
    attn_v and ffn_down get Q6_K in the first and last eighth of the layers and in every third
    layer between ("use_more_bits"); every other weight gets the base type."""
    base = mix[:4]
    layer, n = _layer(name), config.num_hidden_layers
    if layer is not None and (name.endswith("self_attn.v_proj.weight") or name.endswith("mlp.down_proj.weight")):
        if layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2:
            return "q6_k"
    return base


def tensor_grid(name: str, shape: tuple[int, ...], config: DecoderConfig, recipe: QuantizationConfig) -> Grid | None:
    """The grid for one tensor under `recipe`, or None to keep it float."""
    if len(shape) != 2:
        return None
    grid = recipe.grid()
    if grid is None:
        return None
    if not recipe.gguf_type:
        return grid if is_linear_weight(name) else None
    columns = shape[1]
    if is_output_projection(name, config):
        type_name = "q8_0" if recipe.gguf_type == "q8_0" else "q6_k"
    elif recipe.gguf_type.endswith("_m"):
        type_name = mix_type(name, config, recipe.gguf_type)
    else:
        type_name = recipe.gguf_type
    return GGUF_GRIDS[fits(type_name, columns)]
