"""Decoder-only transformer configs and tensor names for the three architectures edgeforge runs
(no torch here: the compressor and exporters stream weights with numpy; shared/models/llama.py
holds the torch reference forward).

- llama  (HF LlamaForCausalLM): RMSNorm, rotary, grouped-query attention, SwiGLU MLP.
- qwen2  (HF Qwen2ForCausalLM): llama plus biases on the q, k and v projections.
- gemma3 (HF Gemma3ForCausalLM, model_type gemma3_text): an explicit head_dim; RMSNorm scaling by
  (1 + weight); RMSNorm of each query and key head (q_norm, k_norm); norms after attention and after
  the MLP as well as before them; embeddings scaled by sqrt(hidden_size); a GELU(tanh)-gated MLP;
  attention scores scaled by query_pre_attn_scalar^-1/2; local layers (sliding window, rotary base
  rope_local_base_freq) and global layers (full attention, rotary base rope_theta) in `layer_types`,
  five local to one global in every released checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import json
from pathlib import Path
from typing import Any

from shared.errors import InvalidArgument

ARCHITECTURES = ("llama", "qwen2", "gemma3")
HF_NAMES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
            "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}          # architecture -> (HF class, model_type)
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SLIDING, FULL = "sliding_attention", "full_attention"               # gemma3 layer types (HF's names)
GEMMA3_PATTERN = 6                   # HF's default sliding_window_pattern: every 6th layer is global


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int                 # model width d
    intermediate_size: int           # MLP width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0      # rotary base (gemma3: of the global layers)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    architecture: str = "llama"      # one of ARCHITECTURES
    head_dim: int = 0                # 0: hidden_size // num_attention_heads (gemma3 states its own)
    # gemma3 only
    query_pre_attn_scalar: float = 0.0       # scores scaled by its inverse square root; 0: head_dim
    sliding_window: int = 0                  # tokens a local layer attends to (itself included); 0: all
    layer_types: tuple[str, ...] = ()        # SLIDING / FULL per layer; () for gemma3: HF's 5:1 default
    rope_local_base_freq: float = 10000.0    # rotary base of the local layers
    final_logit_softcapping: float | None = None   # logits = cap·tanh(logits / cap) when set

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise InvalidArgument(f"architecture {str(self.architecture)[:40]!r} is not one of {ARCHITECTURES}",
                                  reason="UNKNOWN_MODEL_FORMAT", field="model")
        for name, upper in _SIZE_LIMITS.items():          # sizes come from untrusted files: bound them first
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= upper:
                raise InvalidArgument(f"model config {name} is {str(value)[:40]}; expected an integer in [1, {upper}]",
                                      reason="MALFORMED_MODEL", field="model")
        if not (isinstance(self.head_dim, int) and 0 <= self.head_dim <= _SIZE_LIMITS["hidden_size"]) or \
                self.num_attention_heads % self.num_key_value_heads:
            raise InvalidArgument(f"model config head_dim {str(self.head_dim)[:40]} or heads {self.num_attention_heads}/"
                                  f"{self.num_key_value_heads} (key/value) do not fit", reason="MALFORMED_MODEL",
                                  field="model")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0 and math.isfinite(self.rope_theta)
                and self.rope_theta > 0):
            raise InvalidArgument(f"model config rms_norm_eps {self.rms_norm_eps} and rope_theta {self.rope_theta} must "
                                  "be finite and positive", reason="MALFORMED_MODEL", field="model")
        if self.head_dim == 0 and self.num_attention_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.architecture == "gemma3":
            if not self.layer_types:
                object.__setattr__(self, "layer_types", gemma3_layer_types(self.num_hidden_layers, GEMMA3_PATTERN))
            if not self.query_pre_attn_scalar:
                object.__setattr__(self, "query_pre_attn_scalar", float(self.head_dim))
            object.__setattr__(self, "layer_types", tuple(self.layer_types))

    @property
    def qkv_bias(self) -> bool:
        """Whether q, k and v projections carry biases (qwen2)."""
        return self.architecture == "qwen2"

    @property
    def norm_offset(self) -> float:
        """RMSNorm multiplies by (norm_offset + weight): 1 for gemma3, 0 elsewhere."""
        return 1.0 if self.architecture == "gemma3" else 0.0

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == SLIDING

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> "DecoderConfig":
        """From a Hugging Face config.json dict; rejects what this reference does not implement."""
        architecture = _architecture(raw)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if not isinstance(raw.get(k), int) or raw[k] <= 0]
        if missing:
            raise InvalidArgument(f"config.json lacks positive integers for {missing}",
                                  reason="MALFORMED_MODEL", field="model")
        gemma = architecture == "gemma3"
        defaults = _HF_DEFAULTS[architecture]
        rope_theta, local_theta = _rope_bases(raw, architecture)
        common = dict(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            rms_norm_eps=float(raw.get("rms_norm_eps", defaults["rms_norm_eps"])), rope_theta=rope_theta,
            max_position_embeddings=int(raw.get("max_position_embeddings", defaults["max_position_embeddings"])),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
            bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
            architecture=architecture)
        if not gemma:
            config = cls(**common)
            if raw.get("head_dim") not in (None, config.head_dim):
                raise InvalidArgument("config.json head_dim differs from hidden_size / heads; not supported",
                                      reason="UNSUPPORTED_OP", field="model")
        else:
            layers = raw["num_hidden_layers"]
            pattern = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", GEMMA3_PATTERN))
            layer_types = tuple(raw.get("layer_types") or gemma3_layer_types(layers, int(pattern)))
            if len(layer_types) != layers or set(layer_types) - {SLIDING, FULL}:
                raise InvalidArgument(f"config.json layer_types must name {SLIDING} or {FULL} for each of the "
                                      f"{layers} layers", reason="MALFORMED_MODEL", field="model")
            config = cls(**common, head_dim=int(raw.get("head_dim", 256)),
                         query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar", 256)),
                         sliding_window=int(raw.get("sliding_window", 4096) or 0), layer_types=layer_types,
                         rope_local_base_freq=local_theta,
                         final_logit_softcapping=raw.get("final_logit_softcapping"))
        if config.head_dim <= 0 or config.num_attention_heads % config.num_key_value_heads or \
                (not gemma and config.hidden_size % config.num_attention_heads):
            raise InvalidArgument("hidden_size must divide into heads and heads into key/value heads",
                                  reason="MALFORMED_MODEL", field="model")
        return config

    def to_hf(self) -> dict[str, Any]:
        """A config.json that Hugging Face's class for the architecture (and from_hf) reads back."""
        hf_class, model_type = HF_NAMES[self.architecture]
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name in _COMMON_FIELDS}
        out = {"architectures": [hf_class], "model_type": model_type, "torch_dtype": "float32"}
        if self.architecture == "llama":
            return {**out, "hidden_act": "silu", **fields}
        if self.architecture == "qwen2":
            return {**out, "hidden_act": "silu", "use_sliding_window": False, **fields}
        return {**out, "hidden_activation": "gelu_pytorch_tanh", **fields, "head_dim": self.head_dim,
                "query_pre_attn_scalar": _number(self.query_pre_attn_scalar), "sliding_window": self.sliding_window,
                "layer_types": list(self.layer_types), "rope_local_base_freq": self.rope_local_base_freq,
                "final_logit_softcapping": self.final_logit_softcapping, "attn_logit_softcapping": None,
                "attention_bias": False, "rope_scaling": None}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the model needs, by HF name, with its shape."""
        d, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, d),
                                              "model.norm.weight": (d,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
            if self.architecture == "gemma3":
                shapes.update({p + "pre_feedforward_layernorm.weight": (d,),
                               p + "post_feedforward_layernorm.weight": (d,)})
            shapes.update({p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                           p + "self_attn.v_proj.weight": (kv, d)})
            if self.qkv_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                               p + "self_attn.v_proj.bias": (kv,)})
            shapes[p + "self_attn.o_proj.weight"] = (d, q)
            if self.architecture == "gemma3":
                shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
            shapes.update({p + "mlp.gate_proj.weight": (self.intermediate_size, d),
                           p + "mlp.up_proj.weight": (self.intermediate_size, d),
                           p + "mlp.down_proj.weight": (d, self.intermediate_size)})
        return shapes

    def parameter_count(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total


_COMMON_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id")
# Upper bounds on sizes read from untrusted config.json / GGUF metadata: far above any released model
# (Llama 3.1 405B: 126 layers, width 16,384, MLP 53,248, 128 heads, vocabulary 128,256; Gemma 3: 262,144
# tokens), low enough that tensor_shapes() and the name tables stay small.
_SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 19,
                "num_hidden_layers": 1024, "num_attention_heads": 4096, "num_key_value_heads": 4096,
                "max_position_embeddings": 1 << 24}
# Defaults of HF's config classes for keys a config.json may omit.
_HF_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "qwen2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": False},
    "gemma3": {"rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "tie_word_embeddings": True},
}


def _number(value: float) -> int | float:
    """An integral float as an int (HF's Gemma3TextConfig types query_pre_attn_scalar as int)."""
    return int(value) if float(value).is_integer() else value


def gemma3_layer_types(layers: int, pattern: int) -> tuple[str, ...]:
    """HF's layout: layer i is global when (i + 1) is a multiple of `pattern`, else local."""
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(layers))


def _architecture(raw: dict[str, Any]) -> str:
    model_type = raw.get("model_type", "llama")
    hf_class = (raw.get("architectures") or [None])[0]
    for architecture, (cls_name, type_name) in HF_NAMES.items():
        if model_type == type_name and hf_class in (None, cls_name):
            break
    else:
        supported = ", ".join(f"{a} ({c})" for a, (c, _) in HF_NAMES.items())
        raise InvalidArgument(f"config.json describes {model_type!r}/{hf_class!r}; supported: {supported}",
                              reason="UNKNOWN_MODEL_FORMAT", field="model")
    unsupported = {"llama": ("attention_bias", "mlp_bias"), "qwen2": ("use_sliding_window",),
                   "gemma3": ("attention_bias", "attn_logit_softcapping", "use_bidirectional_attention")}
    for key in unsupported[architecture]:
        if raw.get(key):
            raise InvalidArgument(f"config.json sets {key}, which the {architecture} reference does not implement",
                                  reason="UNSUPPORTED_OP", field="model")
    activation = raw.get("hidden_activation" if architecture == "gemma3" else "hidden_act")
    expected = "gelu_pytorch_tanh" if architecture == "gemma3" else "silu"
    if activation not in (None, expected):
        raise InvalidArgument(f"config.json activation {activation!r} is not {architecture}'s {expected!r}",
                              reason="UNSUPPORTED_OP", field="model")
    return architecture


def _rope_bases(raw: dict[str, Any], architecture: str) -> tuple[float, float]:
    """(rotary base, gemma3's local-layer base) from either the classic keys (rope_theta,
    rope_local_base_freq, rope_scaling) or transformers 5's rope_parameters; only unscaled rotary."""
    gemma = architecture == "gemma3"
    theta = float(raw.get("rope_theta", 1e6 if gemma else 10000.0))
    local = float(raw.get("rope_local_base_freq", 10000.0))
    parameters = raw.get("rope_parameters") or {}
    if gemma and parameters:
        full, sliding = parameters.get(FULL) or {}, parameters.get(SLIDING) or {}
        theta, local = float(full.get("rope_theta", theta)), float(sliding.get("rope_theta", local))
        scaled = [p for p in (full, sliding) if p.get("rope_type", "default") != "default"]
    else:
        theta = float(parameters.get("rope_theta", theta))
        scaled = [parameters] if parameters.get("rope_type", "default") != "default" else []
    if raw.get("rope_scaling") or scaled:
        raise InvalidArgument("config.json scales rotary embeddings (rope_scaling), which this version does not "
                              "implement", reason="UNSUPPORTED_OP", field="model")
    return theta, local


def is_linear_weight(name: str) -> bool:
    """True for the weights of the transformer blocks' linear layers (what quantization targets)."""
    return name.endswith(".weight") and any(f".{linear}." in name for linear in LINEAR_NAMES)


def load_config(path: Path) -> DecoderConfig:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidArgument(f"cannot read {path.name}: {error}", reason="MALFORMED_MODEL", field="model")
    return DecoderConfig.from_hf(raw)
