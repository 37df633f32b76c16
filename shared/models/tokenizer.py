"""Tokenizers: HF `tokenizer.json` (run by the `tokenizers` library) <-> GGUF `tokenizer.ggml.*`.

A model directory carries its vocabulary in one of two forms:
- `tokenizer.json`, byte-level BPE ("gpt2" in GGUF) with one of two pre-tokenizers:
  - "gpt2":   ByteLevel with GPT-2's split regex;
  - "smollm": individual digits, then ByteLevel — llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM.
  A test checks that both directions tokenize real text exactly as llama.cpp does.
- `tokenizer.gguf` (TOKENIZER_GGUF), for a vocabulary imported from a GGUF file that tokenizer.json
  cannot express exactly here (SentencePiece "llama" vocabularies such as Gemma 3's, other BPE
  pre-tokenizers): a GGUF file without tensors holding the source's metadata. Its tokenizer.* keys
  are re-emitted verbatim by the GGUF exporter, and llama.cpp itself tokenizes with it
  (`Llama(vocab_only=True)`), so tokens are llama.cpp's by construction.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.errors import FailedPrecondition

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TOKENIZER_GGUF = "tokenizer.gguf"
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS: dict[str, dict] = {
    "gpt2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


def tokenizer_json(tokens: list[str], token_types: list[int], merges: list[str], pre: str) -> str:
    """An HF tokenizer.json for a GGUF byte-level BPE vocabulary."""
    if pre not in PRE_TOKENIZERS:
        raise FailedPrecondition(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {sorted(PRE_TOKENIZERS)})",
                                 field="model")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": token_types[i] != CONTROL, "special": token_types[i] == CONTROL}
             for i, t in enumerate(tokens) if token_types[i] in (CONTROL, USER_DEFINED)]
    document = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    return json.dumps(document, ensure_ascii=False)


def gguf_pre_name(document: dict) -> str:
    pre = document.get("pre_tokenizer")
    for name, expected in PRE_TOKENIZERS.items():
        if _same_pre(pre, expected):
            return name
    raise FailedPrecondition(f"tokenizer.json pre_tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent "
                             f"here (supported: {sorted(PRE_TOKENIZERS)})", field="model")


def _same_pre(actual: Any, expected: dict) -> bool:
    if not isinstance(actual, dict) or actual.get("type") != expected["type"]:
        return False
    if expected["type"] == "Sequence":
        inner = actual.get("pretokenizers") or []
        return len(inner) == len(expected["pretokenizers"]) and all(
            _same_pre(a, e) for a, e in zip(inner, expected["pretokenizers"]))
    return all(actual.get(k, v) == v for k, v in expected.items() if k != "trim_offsets")


def convertible_document(tokenizer_path: Path) -> dict:
    """tokenizer.json parsed, or FailedPrecondition when GGUF's tokenizer.ggml.* cannot express it here."""
    document = json.loads(tokenizer_path.read_text())
    model = document.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise FailedPrecondition(f"tokenizer model {model.get('type')!r} is not byte-level BPE; not supported yet",
                                 field="model")
    gguf_pre_name(document)
    return document


def gguf_vocabulary(tokenizer_path: Path, tokenizer_config: dict, vocab_size: int) -> dict[str, Any]:
    """tokenizer.json (+ tokenizer_config.json) -> the values of GGUF's tokenizer.ggml.* keys."""
    document = convertible_document(tokenizer_path)
    model = document["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for entry in document.get("added_tokens", []):
        vocab[entry["content"]] = entry["id"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, index in vocab.items():
        if index < vocab_size:
            tokens[index], types[index] = token, NORMAL
    for entry in document.get("added_tokens", []):
        if entry["id"] < vocab_size:
            types[entry["id"]] = CONTROL if entry.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def token_id(key: str) -> int | None:
        value = tokenizer_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return vocab.get(value) if value is not None else None

    return {"model": "gpt2", "pre": gguf_pre_name(document), "tokens": tokens, "token_types": types,
            "merges": merges, "bos_token_id": token_id("bos_token"), "eos_token_id": token_id("eos_token"),
            "unknown_token_id": token_id("unk_token"), "padding_token_id": token_id("pad_token"),
            "add_bos_token": bool(tokenizer_config.get("add_bos_token", False)),
            "chat_template": tokenizer_config.get("chat_template")}


def carried_vocabulary(tokenizer_path: Path) -> dict:
    """The tokenizer.* metadata of a carried tokenizer.gguf, key -> GgufValue (exact GGUF types),
    without the chat template (tokenizer_config.json's chat_template is the one a model uses)."""
    from shared.models.gguf_reader import read_gguf
    fields = read_gguf(tokenizer_path).fields
    vocabulary = {k: v for k, v in fields.items() if k.startswith("tokenizer.") and k != CHAT_TEMPLATE_KEY}
    if "tokenizer.ggml.model" not in vocabulary or "tokenizer.ggml.tokens" not in vocabulary:
        raise FailedPrecondition(f"{tokenizer_path.name} holds no GGUF vocabulary (tokenizer.ggml.model/tokens)",
                                 field="model")
    return vocabulary


class TextTokenizer:
    """Encodes text to ids with a model's tokenizer.json, or with llama.cpp for a carried
    tokenizer.gguf (no special tokens added either way)."""

    def __init__(self, tokenizer_path: Path, tokenizer_config: dict):
        if tokenizer_path.name.endswith(".gguf"):
            import llama_cpp
            self._llama = llama_cpp.Llama(str(tokenizer_path), vocab_only=True, verbose=False)
            bos = self._llama.token_bos()
            self.bos_id: int | None = bos if bos >= 0 else None
            return
        from tokenizers import Tokenizer
        self._llama = None
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        bos = tokenizer_config.get("bos_token")
        if isinstance(bos, dict):
            bos = bos.get("content")
        self.bos_id = self._tokenizer.token_to_id(bos) if bos else None

    def encode(self, text: str) -> list[int]:
        if self._llama is not None:
            return self._llama.tokenize(text.encode(), add_bos=False, special=False)
        return self._tokenizer.encode(text, add_special_tokens=False).ids
