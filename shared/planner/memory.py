"""Deployment memory (seed chapter 0, extended): weights at a recipe's bits per weight — scales and
zero points included — plus the KV cache, the activations and the runtime's own overhead.

    weights      = Σ over tensors  elements × bits_per_weight / 8          (bytes)
    group scales = one fp16 scale per group of g weights: 16/g bit/weight (g128: 0.125); an
                   asymmetric grid adds a uint8 zero point per group (edgeforge stores it so): 24/g
    KV cache     = 2 (K and V) × layers × kv_heads × head_dim × context × batch × bytes per element
    activations  = 4 · batch · u · (4·d + 2·ff)       one layer's fp32 work tensors for a u-token micro-batch
                 + 4 · batch · heads · u · context    its attention scores (no flash attention)
                 + 4 · batch · vocab                  the last position's logits
                   (inference keeps no activations across layers; u = min(prompt, 512), llama.cpp's
                   default micro-batch; ff = 4·d when the MLP width is unknown)

llama.cpp's block types carry their scales inside each block (ggml-common.h): q8_0 34 bytes per 32
weights = 8.5 bit/weight, q4_0 18/32 = 4.5, q4_1 20/32 = 5.0, q5_0 5.5, q5_1 6.0, and the K-quants'
256-weight super-blocks q2_k 2.625, q3_k 3.4375, q4_k 4.5, q5_k 5.5, q6_k 6.5625 (shared/quant/grids.py).
With a model's tensor shapes the planner applies the exporter's own per-tensor rules
(shared/quant/rules.py: norms float32, the output projection q6_k, the q4_k_m/q5_k_m upgrades); with
a parameter count alone every weight is stored at the recipe's rate, which is the seed's arithmetic.
"""
from __future__ import annotations

import dataclasses
import math
import re

from shared.errors import InvalidArgument
from shared.memory import GIB
from shared.models.decoder_config import DecoderConfig
from shared.planner.shape import ModelShape
from shared.quant.grids import FLOAT_TYPES, GGUF_BITS, GGUF_MIXES, GGUF_TYPES, Granularity, Method, \
    QuantizationConfig
from shared.quant.rules import tensor_grid

FLOAT_BITS = {"f32": 32, "f16": 16, "bf16": 16}
KV_DTYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}   # llama.cpp cache types
MICRO_BATCH = 512                   # llama.cpp's default n_ubatch: prompt tokens computed together
_GENERIC = re.compile(r"^int([2-8])-(g(\d+)|per_channel|per_tensor)-(sym|asym)$")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A weight storage recipe by the name a candidate id uses: f16, q8_0, q4_k_m, int4-g128-sym …"""
    name: str
    config: QuantizationConfig

    @property
    def is_float(self) -> bool:
        return self.name in FLOAT_BITS

    @property
    def code_bits(self) -> float:
        """Bits of the weight codes alone (no scales): what 'INT4' means in the seed's tables."""
        if self.is_float:
            return FLOAT_BITS[self.name]
        return GGUF_BITS[self.name[:4]] if self.config.gguf_type else self.config.bits


def parse_recipe(name: str) -> Recipe:
    """f32 | f16 | bf16 | a llama.cpp type (q8_0 … q6_k, q4_k_m, q5_k_m) |
    int{bits}-{g<size>|per_channel|per_tensor}-{sym|asym}."""
    name = name.strip().lower()
    if name in FLOAT_TYPES:
        return Recipe(name, QuantizationConfig(method=Method.NONE, gguf_type=name))
    if name in GGUF_TYPES:
        return Recipe(name, QuantizationConfig(method=Method.RTN, gguf_type=name).validated())
    match = _GENERIC.match(name)
    if not match:
        raise InvalidArgument(f"recipe {name[:40]!r} is not one of {', '.join(FLOAT_TYPES + GGUF_TYPES)} or "
                              "int{2-8}-{g<size>|per_channel|per_tensor}-{sym|asym} (e.g. int4-g128-sym)",
                              field="recipe")
    bits, where, group, symmetric = int(match[1]), match[2], int(match[3] or 0), match[4] == "sym"
    granularity = Granularity.PER_GROUP if group else Granularity(where)
    config = QuantizationConfig(bits=bits, granularity=granularity, group_size=group, symmetric=symmetric)
    try:
        return Recipe(name, config.validated())
    except InvalidArgument as error:
        raise InvalidArgument(f"recipe {name!r}: {error.message}", field="recipe") from error


@dataclasses.dataclass(frozen=True)
class WeightBytes:
    total: int                       # every weight, scales and zero points included
    scales: int                      # the part that is scales / zero points / block headers
    basis: str                       # "per tensor" (exporter rules) or "uniform" (the seed's arithmetic)


def weight_bytes(shape: ModelShape, recipe: Recipe) -> WeightBytes:
    """Weight memory of `shape` under `recipe`: per tensor when the shapes are known, else uniform."""
    if shape.decoder is not None:
        return _per_tensor(shape.decoder, recipe)
    bits = uniform_bits_per_weight(recipe, shape)
    total = shape.parameters * bits / 8
    return WeightBytes(round(total), round(shape.parameters * (bits - recipe.code_bits) / 8), "uniform")


def uniform_bits_per_weight(recipe: Recipe, shape: ModelShape) -> float:
    """Average storage per weight when only the parameter count is known."""
    if recipe.is_float:
        return float(FLOAT_BITS[recipe.name])
    if recipe.name in GGUF_MIXES:       # the mix's average over the tensors of the nearest reference model
        reference = nearest_reference(shape.parameters)[1]
        total = _per_tensor(reference, recipe).total
        return 8 * total / reference.parameter_count()
    grid = recipe.config.grid()
    return grid.bits_per_weight(shape.hidden or 4096)        # per-channel: one scale per row of `hidden` weights


def _per_tensor(config: DecoderConfig, recipe: Recipe) -> WeightBytes:
    """The exporter's per-tensor rules: 1-D tensors float32; quantized 2-D tensors at their grid; the other
    2-D tensors (generic grids: embeddings and head) float32, or the float type of a float recipe."""
    total = scales = 0.0
    for name, shape in config.tensor_shapes().items():
        count = math.prod(shape)
        grid = None if recipe.is_float else tensor_grid(name, shape, config, recipe.config)
        if grid is None:
            total += count * (FLOAT_BITS[recipe.name] if recipe.is_float and len(shape) == 2 else 32) / 8
            continue
        bits = grid.bits_per_weight(shape[1])
        total += count * bits / 8
        scales += count * (bits - grid.bits) / 8
    return WeightBytes(round(total), round(scales), "per tensor")


def kv_cache_bytes(shape: ModelShape, context: int, batch: int = 1, dtype: str = "f16") -> int:
    """2 × layers × kv_heads × head_dim × context × batch × bytes; local (sliding-window) layers keep
    only their window."""
    if not shape.causal_lm or not shape.has_kv_shape:
        return 0
    per_token_layer = 2 * shape.kv_heads * shape.head_dim * KV_DTYPE_BYTES[dtype] * batch
    full = shape.layers - shape.sliding_layers
    local = min(context, shape.sliding_window) if shape.sliding_window else context
    return round(per_token_layer * (full * context + shape.sliding_layers * local))


def activation_bytes(shape: ModelShape, prompt_tokens: int, context: int, batch: int = 1) -> int:
    """One layer's fp32 work tensors for a micro-batch, its attention scores, and the logits (module docstring)."""
    d = shape.hidden or round(math.sqrt(shape.parameters / 12 / max(shape.layers, 1)))
    ff = shape.intermediate or 4 * d
    u = max(1, min(prompt_tokens, MICRO_BATCH))
    work = 4 * batch * u * (4 * d + 2 * ff)
    scores = 4 * batch * (shape.heads or 1) * u * context if shape.causal_lm else 4 * batch * (shape.heads or 1) * u * u
    return work + scores + 4 * batch * shape.vocab


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    recipe: str
    weights: WeightBytes
    kv_cache: int
    activations: int

    @property
    def model_bytes(self) -> int:
        """Everything but the runtime's own overhead (which depends on the device)."""
        return self.weights.total + self.kv_cache + self.activations

    def to_dict(self, parameters: int) -> dict:
        return {"recipe": self.recipe, "bits_per_weight": round(8 * self.weights.total / parameters, 4),
                "weights_bytes": self.weights.total, "weights_gib": round(self.weights.total / GIB, 3),
                "scales_bytes": self.weights.scales, "weights_basis": self.weights.basis,
                "kv_cache_bytes": self.kv_cache, "activations_bytes": self.activations,
                "model_bytes": self.model_bytes, "model_gib": round(self.model_bytes / GIB, 3)}


def estimate(shape: ModelShape, recipe: Recipe, *, context: int, batch: int, prompt_tokens: int,
             kv_dtype: str = "f16") -> MemoryEstimate:
    return MemoryEstimate(recipe.name, weight_bytes(shape, recipe), kv_cache_bytes(shape, context, batch, kv_dtype),
                          activation_bytes(shape, prompt_tokens, context, batch))


# Shapes of released models (their config.json), used when only a parameter count is given: the
# nearest by parameters stands in for the shape (the plan says which), and averages a mix's rate.
REFERENCE_MODELS = {
    "SmolLM2-135M": DecoderConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                  tie_word_embeddings=True),
    "SmolLM2-360M": DecoderConfig(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                  num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=8192,
                                  tie_word_embeddings=True),
    "Llama-3.2-1B": DecoderConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                  tie_word_embeddings=True),
    "SmolLM2-1.7B": DecoderConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                                  tie_word_embeddings=True),
    "Llama-3.2-3B": DecoderConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                  num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
                                  tie_word_embeddings=True),
    "Llama-2-7B": DecoderConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "Llama-3.1-8B": DecoderConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072),
    "Llama-2-13B": DecoderConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    "Llama-2-70B": DecoderConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
}


def nearest_reference(parameters: int) -> tuple[str, DecoderConfig]:
    """The reference model whose parameter count is nearest `parameters` (by ratio)."""
    return min(REFERENCE_MODELS.items(), key=lambda item: abs(math.log(item[1].parameter_count() / parameters)))


def with_assumed_shape(shape: ModelShape) -> tuple[ModelShape, str]:
    """`shape` with unknown shape fields taken from the nearest reference model; and a note saying so ('' if none)."""
    if shape.has_kv_shape and shape.hidden:
        return shape, ""
    name, reference = nearest_reference(shape.parameters)
    known = {"layers": reference.num_hidden_layers, "hidden": reference.hidden_size,
             "heads": reference.num_attention_heads, "kv_heads": reference.num_key_value_heads,
             "head_dim": reference.head_dim, "vocab": reference.vocab_size,
             "max_context": reference.max_position_embeddings, "intermediate": reference.intermediate_size}
    filled = {k: v for k, v in known.items() if not getattr(shape, k)}
    if shape.heads and "kv_heads" in filled:          # given heads but no kv_heads: they default to heads
        filled.pop("kv_heads")
    assumed = dataclasses.replace(shape, **filled)
    return assumed, (f"assumed the shape of {name} (the nearest released model by parameters) for "
                     f"{', '.join(sorted(filled))}; give --layers/--hidden/--heads/--kv-heads/--head-dim/--vocab to "
                     "override")
