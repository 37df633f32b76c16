"""Import a llama GGUF file as a float32 HF model directory (the reference edgeforge compresses).

Weights are dequantized with gguf-py (bit-identical to ggml's dequantizers) one tensor at a time.
llama.cpp's converter permutes the rows of Q and K so rotary pairs are adjacent
(`convert_hf_to_gguf.py`, LlamaModel.permute); importing undoes that so the directory follows
Hugging Face's layout, and the GGUF exporter applies it again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from shared.errors import InvalidArgument
from shared.models.bundle import write_model_dir
from shared.models.decoder_config import DecoderConfig
from shared.models.tokenizer import tokenizer_json

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF -> GGUF row order for Q/K: within each head, interleave the two rotary halves."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """GGUF -> HF row order for Q/K (inverse of permute_rows)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_to_gguf_names(config: DecoderConfig) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name, from gguf-py's name table."""
    import gguf
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    names = {}
    for hf_name in config.tensor_shapes():
        gguf_name = table.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise InvalidArgument(f"no GGUF name for tensor {hf_name}", reason="UNSUPPORTED_OP", field="model")
        names[hf_name] = gguf_name
    return names


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise InvalidArgument(f"GGUF metadata lacks {key}", reason="MALFORMED_MODEL", field="model")
        return default
    return field.contents()


def read_config(reader) -> DecoderConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise InvalidArgument(f"GGUF architecture {arch!r} is not supported at this version (llama only)",
                              reason="UNKNOWN_MODEL_FORMAT", field="model")
    tensor_names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    config = DecoderConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", len(tokens))),
        hidden_size=int(_field(reader, "llama.embedding_length")),
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=int(_field(reader, "llama.attention.head_count")),
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv",
                                       _field(reader, "llama.attention.head_count"))),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_optional_int(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_optional_int(reader, "tokenizer.ggml.eos_token_id"))
    rope_dims = _optional_int(reader, "llama.rope.dimension_count")
    if rope_dims not in (None, config.head_dim):
        raise InvalidArgument(f"partial rotary ({rope_dims} of {config.head_dim} dims) is not supported",
                              reason="UNSUPPORTED_OP", field="model")
    return config


def _optional_int(reader, key: str) -> int | None:
    field = reader.fields.get(key)
    return int(field.contents()) if field is not None else None


def import_gguf(path: Path, out_dir: Path) -> DecoderConfig:
    """Writes `out_dir` (config.json, model.safetensors in float32, tokenizer.json, tokenizer_config.json)."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as error:
        raise InvalidArgument(f"not a readable GGUF file: {error}", reason="MALFORMED_MODEL", field="model")
    config = read_config(reader)
    by_name = {t.name: t for t in reader.tensors}
    names = hf_to_gguf_names(config)
    shapes = config.tensor_shapes()
    missing = [g for g in names.values() if g not in by_name]
    if missing:
        raise InvalidArgument(f"GGUF lacks tensor {missing[0]}", reason="MALFORMED_MODEL", field="model")

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for hf_name, gguf_name in names.items():
            tensor = by_name[gguf_name]
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
            values = values.reshape(shapes[hf_name])
            if hf_name.endswith("q_proj.weight"):
                values = unpermute_rows(values, config.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                values = unpermute_rows(values, config.num_key_value_heads)
            if not np.isfinite(values).all():
                raise InvalidArgument(f"GGUF tensor {gguf_name} contains NaN or Inf", reason="MALFORMED_MODEL",
                                      field="model")
            yield hf_name, values

    token_types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type")]
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = list(_field(reader, "tokenizer.ggml.merges", []))
    model_type = _field(reader, "tokenizer.ggml.model")
    if model_type != "gpt2":
        raise InvalidArgument(f"GGUF tokenizer model {model_type!r} is not supported yet (gpt2 byte-level BPE only)",
                              reason="UNSUPPORTED_OP", field="model")
    special = {key: tokens[i] for key, i in (("bos_token", config.bos_token_id), ("eos_token", config.eos_token_id),
                                             ("unk_token", _optional_int(reader, "tokenizer.ggml.unknown_token_id")),
                                             ("pad_token", _optional_int(reader, "tokenizer.ggml.padding_token_id")))
               if i is not None}
    tokenizer_config = {**special, "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                        "model_max_length": config.max_position_embeddings}
    template = reader.fields.get("tokenizer.chat_template")
    if template is not None:
        tokenizer_config["chat_template"] = template.contents()
    write_model_dir(out_dir, config, tensors(),
                    tokenizer_json(tokens, token_types, merges, _field(reader, "tokenizer.ggml.pre", "gpt2")),
                    tokenizer_config)
    return config
