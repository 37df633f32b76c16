"""Which tensors a recipe quantizes, and onto which grid.

GGUF recipes follow llama.cpp's per-tensor type rules (`llama_tensor_get_type` in llama-quant.cpp)
so our files carry the same types as `llama-quantize` would write:
- 1-D tensors (norms) stay float32.
- The output projection — `output.weight`, or `token_embd.weight` when embeddings are tied — gets
  Q6_K for sub-8-bit types, but Q8_0 when its row length is not a multiple of the type's block, and
  Q8_0 again when Q6_K's 256-wide super-blocks do not divide the row (llama.cpp's fallback).
  K-quants arrive later (issue 4); until then a Q6_K choice is written as Q8_0 and logged.
- Every other 2-D weight gets the recipe's type.
Generic integer grids (ONNX/TFLite candidates) quantize only the transformer blocks' linear weights;
embeddings, the LM head and norms stay float32.
"""
from __future__ import annotations

import logging

from shared.models.llama_config import LlamaConfig, is_linear_weight
from shared.quant.grids import GGUF_GRIDS, Grid, QuantizationConfig

log = logging.getLogger(__name__)


def is_output_projection(name: str, config: LlamaConfig) -> bool:
    return name == "lm_head.weight" or (config.tie_word_embeddings and name == "model.embed_tokens.weight")


def tensor_grid(name: str, shape: tuple[int, ...], config: LlamaConfig, recipe: QuantizationConfig) -> Grid | None:
    """The grid for one tensor under `recipe`, or None to keep it float."""
    if len(shape) != 2:
        return None
    grid = recipe.grid()
    if grid is None:
        return None
    if not recipe.gguf_type:
        return grid if is_linear_weight(name) else None
    columns = shape[1]
    if is_output_projection(name, config) and recipe.gguf_type != "q8_0":
        if columns % grid.group_size == 0 and columns % 256 == 0:
            log.warning("llama.cpp would store %s as q6_k; K-quants are not implemented yet, using q8_0", name)
        return GGUF_GRIDS["q8_0"]
    return grid
