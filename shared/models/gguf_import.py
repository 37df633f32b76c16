"""Import a llama, qwen2 or gemma3 GGUF file as a float32 HF model directory (what edgeforge compresses).

Weights are dequantized with gguf-py (bit-identical to ggml's dequantizers) one tensor at a time.
What llama.cpp's converter (`convert_hf_to_gguf.py`) changed on the way in is undone here, and the
GGUF exporter applies it again:
- llama: the rows of Q and K are permuted so rotary pairs are adjacent (LlamaModel.permute);
  qwen2 and gemma3 use llama.cpp's NEOX rotary, which pairs the two halves as HF does: no permutation.
- gemma3: every `*norm.weight` is stored as weight + 1 (Gemma3Model.norm_shift), since llama.cpp's
  RMSNorm multiplies by the stored value and HF's Gemma3RMSNorm by (1 + weight).
- gemma3 hyperparameters that llama.cpp fixes in code (llama-model.cpp, LLM_ARCH_GEMMA3) rather than
  reads from the file: one global layer in six, local rotary base 10000, query scaling 1/sqrt(head_dim).

The vocabulary comes across as an HF tokenizer.json when it is byte-level BPE with a pre-tokenizer
shared/models/tokenizer.py implements; any other one (SentencePiece "llama", or another BPE
pre-tokenizer) is carried verbatim as `tokenizer.gguf`, a GGUF file with the source's metadata and
no tensors, that the exporter re-emits and llama.cpp tokenizes (`vocab_only`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from shared.errors import InvalidArgument
from shared.models.bundle import write_model_dir
from shared.models.decoder_config import ARCHITECTURES, FULL, DecoderConfig, gemma3_layer_types
from shared.models.gguf_reader import GgufFile, read_gguf
from shared.models.tokenizer import PRE_TOKENIZERS, TOKENIZER_GGUF, tokenizer_json

GGUF_MAGIC = b"GGUF"
GEMMA3_PATTERN = 6                 # llama.cpp: hparams.set_swa_pattern(6)
GEMMA3_LOCAL_ROPE_BASE = 10000.0   # llama.cpp: rope_freq_base_train_swa
# Metadata a carried tokenizer.gguf leaves out (the file has no tensors; GGUF's own bookkeeping).
_NOT_CARRIED = ("general.alignment", "general.file_type", "general.quantization_version")


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


def rotary_permuted(config: DecoderConfig) -> bool:
    """Whether llama.cpp stores Q/K rows permuted (its "normal" rotary): llama only."""
    return config.architecture == "llama"


def norm_shifted(config: DecoderConfig, hf_name: str) -> bool:
    """Whether GGUF stores this tensor as HF's value + 1 (every gemma3 norm)."""
    return config.architecture == "gemma3" and hf_name.endswith("norm.weight")


def hf_to_gguf_names(config: DecoderConfig) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name, from gguf-py's name table for the architecture."""
    import gguf
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "gemma3": gguf.MODEL_ARCH.GEMMA3}
    table = gguf.get_tensor_name_map(arch[config.architecture], config.num_hidden_layers)
    names = {}
    for hf_name in config.tensor_shapes():
        gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InvalidArgument(f"no GGUF name for tensor {hf_name}", reason="UNSUPPORTED_OP", field="model")
        names[hf_name] = gguf_name
    return names


def _field(reader: GgufFile, key: str, default=None):
    value = reader.get(key, default)
    if value is None:
        raise InvalidArgument(f"GGUF metadata lacks {key}", reason="MALFORMED_MODEL", field="model")
    return value


def _optional_int(reader: GgufFile, key: str) -> int | None:
    value = reader.get(key)
    return int(value) if value is not None else None


def read_config(reader: GgufFile) -> DecoderConfig:
    """The DecoderConfig the metadata describes; metadata of the wrong type (a list or text where a
    number belongs) is refused naming the problem, as is any size DecoderConfig does not accept."""
    try:
        return _read_config(reader)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, IndexError) as error:
        raise InvalidArgument(f"GGUF metadata has a value of the wrong type or range: {type(error).__name__}: "
                              f"{str(error)[:200]}", reason="MALFORMED_MODEL", field="model") from error


def _read_config(reader: GgufFile) -> DecoderConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise InvalidArgument(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})",
                              reason="UNKNOWN_MODEL_FORMAT", field="model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    common = dict(
        vocab_size=int(reader.get(f"{arch}.vocab_size", len(tokens))), hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")), num_attention_heads=heads,
        num_key_value_heads=int(reader.get(f"{arch}.attention.head_count_kv", heads)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(reader.get(f"{arch}.rope.freq_base", 1e6 if arch == "gemma3" else 10000.0)),
        max_position_embeddings=int(reader.get(f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in reader.tensors,
        bos_token_id=_optional_int(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_optional_int(reader, "tokenizer.ggml.eos_token_id"), architecture=arch)
    if arch == "gemma3":
        head_dim = int(_field(reader, "gemma3.attention.key_length"))
        if int(reader.get("gemma3.attention.value_length", head_dim)) != head_dim:
            raise InvalidArgument("gemma3 key_length and value_length differ", reason="UNSUPPORTED_OP", field="model")
        layers = common["num_hidden_layers"]
        window = int(reader.get("gemma3.attention.sliding_window", 0))
        layer_types = gemma3_layer_types(layers, GEMMA3_PATTERN) if window else (FULL,) * layers
        # llama.cpp scales scores by 1/sqrt(head_dim), except Gemma 3 27B (62 layers): 1/sqrt(hidden / heads)
        scalar = hidden / heads if layers == 62 else head_dim
        config = DecoderConfig(**common, head_dim=head_dim, query_pre_attn_scalar=float(scalar),
                               sliding_window=window, layer_types=layer_types,
                               rope_local_base_freq=float(reader.get("gemma3.rope.freq_base_swa",
                                                                     GEMMA3_LOCAL_ROPE_BASE)),
                               final_logit_softcapping=reader.get("gemma3.final_logit_softcapping"))
    else:
        config = DecoderConfig(**common)
    rope_dims = _optional_int(reader, f"{arch}.rope.dimension_count")
    if rope_dims not in (None, config.head_dim):
        raise InvalidArgument(f"partial rotary ({rope_dims} of {config.head_dim} dims) is not supported",
                              reason="UNSUPPORTED_OP", field="model")
    return config


def import_gguf(path: Path, out_dir: Path) -> DecoderConfig:
    """Writes `out_dir` (config.json, model.safetensors in float32, tokenizer.json or tokenizer.gguf,
    tokenizer_config.json)."""
    import gguf
    reader = read_gguf(path)
    config = read_config(reader)
    names = hf_to_gguf_names(config)
    shapes = config.tensor_shapes()
    missing = [g for g in names.values() if g not in reader.tensors]
    if missing:
        raise InvalidArgument(f"GGUF lacks tensor {missing[0]}", reason="MALFORMED_MODEL", field="model")

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for hf_name, gguf_name in names.items():
            info = reader.tensors[gguf_name]
            if info.shape != shapes[hf_name]:
                raise InvalidArgument(f"GGUF tensor {gguf_name} has shape {info.shape}, the metadata implies "
                                      f"{shapes[hf_name]}", reason="MALFORMED_MODEL", field="model")
            data = reader.read(gguf_name)
            values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(info.type))
            values = values.astype(np.float32, copy=False).reshape(shapes[hf_name])
            if rotary_permuted(config) and hf_name.endswith("q_proj.weight"):
                values = unpermute_rows(values, config.num_attention_heads)
            elif rotary_permuted(config) and hf_name.endswith("k_proj.weight"):
                values = unpermute_rows(values, config.num_key_value_heads)
            elif norm_shifted(config, hf_name):
                values = values - np.float32(1.0)
            if not np.isfinite(values).all():
                raise InvalidArgument(f"GGUF tensor {gguf_name} contains NaN or Inf", reason="MALFORMED_MODEL",
                                      field="model")
            yield hf_name, values

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    special = {key: tokens[i] for key, i in (("bos_token", config.bos_token_id), ("eos_token", config.eos_token_id),
                                             ("unk_token", _optional_int(reader, "tokenizer.ggml.unknown_token_id")),
                                             ("pad_token", _optional_int(reader, "tokenizer.ggml.padding_token_id")))
               if i is not None and 0 <= i < len(tokens)}
    tokenizer_config = {**special, "add_bos_token": bool(reader.get("tokenizer.ggml.add_bos_token", False)),
                        "model_max_length": config.max_position_embeddings}
    template = reader.get("tokenizer.chat_template")
    if template is not None:
        tokenizer_config["chat_template"] = template
    model_type, pre = _field(reader, "tokenizer.ggml.model"), reader.get("tokenizer.ggml.pre", "gpt2")
    if model_type == "gpt2" and pre in PRE_TOKENIZERS:
        document = tokenizer_json(tokens, [int(t) for t in _field(reader, "tokenizer.ggml.token_type")],
                                  list(reader.get("tokenizer.ggml.merges", [])), pre)
        write_model_dir(out_dir, config, tensors(), document, tokenizer_config)
    else:
        write_model_dir(out_dir, config, tensors(), None, tokenizer_config)
        write_tokenizer_gguf(reader, out_dir / TOKENIZER_GGUF)
    return config


def write_tokenizer_gguf(reader: GgufFile, out: Path) -> None:
    """A vocabulary-only GGUF: every metadata value of `reader` (architecture and hyperparameters,
    which llama.cpp needs to load a vocabulary, and the tokenizer.* keys) with its exact type."""
    import gguf
    writer = gguf.GGUFWriter(out, _field(reader, "general.architecture"))
    for key, field in reader.fields.items():
        if key == "general.architecture" or key in _NOT_CARRIED:
            continue
        writer.add_key_value(key, field.value, gguf.GGUFValueType(field.type),
                             None if field.sub_type is None else gguf.GGUFValueType(field.sub_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
