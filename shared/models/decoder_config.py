"""The llama architecture's config and tensor names (no torch here: the compressor and exporters
stream weights with numpy; shared/models/llama.py holds the torch reference forward)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from shared.errors import InvalidArgument

ARCHITECTURE = "llama"
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int                 # model width d
    intermediate_size: int           # MLP width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> "DecoderConfig":
        """From a Hugging Face config.json dict; rejects what this reference does not implement."""
        architectures = raw.get("architectures") or ["LlamaForCausalLM"]
        if raw.get("model_type", "llama") != "llama" or architectures[0] != "LlamaForCausalLM":
            raise InvalidArgument(f"config.json describes {raw.get('model_type')!r}/{architectures[0]!r}; "
                                  "only llama (LlamaForCausalLM) is supported", reason="UNKNOWN_MODEL_FORMAT",
                                  field="model")
        if raw.get("rope_scaling"):
            raise InvalidArgument("config.json sets rope_scaling, which this version does not implement",
                                  reason="UNSUPPORTED_OP", field="model")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if not isinstance(raw.get(k), int) or raw[k] <= 0]
        if missing:
            raise InvalidArgument(f"config.json lacks positive integers for {missing}",
                                  reason="MALFORMED_MODEL", field="model")
        config = cls(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)), rope_theta=float(raw.get("rope_theta", 10000.0)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"))
        if config.hidden_size % config.num_attention_heads or \
                config.num_attention_heads % config.num_key_value_heads:
            raise InvalidArgument("hidden_size must divide into heads and heads into key/value heads",
                                  reason="MALFORMED_MODEL", field="model")
        if raw.get("head_dim") not in (None, config.head_dim):
            raise InvalidArgument("config.json head_dim differs from hidden_size / heads; not supported",
                                  reason="UNSUPPORTED_OP", field="model")
        return config

    def to_hf(self) -> dict[str, Any]:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
                "hidden_act": "silu", **dataclasses.asdict(self)}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the model needs, by HF name, with its shape."""
        d, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, d),
                                              "model.norm.weight": (d,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                p + "mlp.gate_proj.weight": (self.intermediate_size, d),
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


def is_linear_weight(name: str) -> bool:
    """True for the weights of the transformer blocks' linear layers (what quantization targets)."""
    return name.endswith(".weight") and any(f".{linear}." in name for linear in LINEAR_NAMES)


def load_config(path: Path) -> DecoderConfig:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidArgument(f"cannot read {path.name}: {error}", reason="MALFORMED_MODEL", field="model")
    return DecoderConfig.from_hf(raw)
