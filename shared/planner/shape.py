"""What the planner needs to know about a model: its parameter count and the transformer shape that
sizes the KV cache and the attention FLOPs, read from an HF directory, a GGUF file, an edgeforge
bundle (.tar) or a bare safetensors file, or given by hand.

Every file is untrusted: safetensors headers go through shared.untrusted (lengths checked against
the file before anything is parsed), GGUF through shared.models.gguf_reader, tar members through
untrusted.ArchiveCheck. Parameters are counted from the tensors a file holds when it holds any;
otherwise computed from config.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
import tarfile
from pathlib import Path
from typing import Any

from shared import untrusted
from shared.errors import InvalidArgument, ResourceExhausted
from shared.models.decoder_config import ARCHITECTURES, DecoderConfig

MAX_PARAMETERS = 10**15             # a million billion: far above any model, low enough to keep floats exact
MAX_CONFIG_BYTES = 16 << 20         # a config.json inside a bundle (real ones are < 10 kB)
_LIMITS = {"layers": 1 << 12, "hidden": 1 << 18, "heads": 1 << 14, "kv_heads": 1 << 14, "head_dim": 1 << 14,
           "vocab": 1 << 23, "max_context": 1 << 26, "intermediate": 1 << 21, "sliding_window": 1 << 26,
           "sliding_layers": 1 << 12, "embedding_parameters": MAX_PARAMETERS, "stored_bytes": 1 << 62}
# config.json spellings across families (HF llama/qwen2/gemma, GPT-2, BERT, Falcon, MPT, ...).
_ALIASES = {"hidden": ("hidden_size", "n_embd", "d_model", "dim"),
            "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
            "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
            "kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads"),
            "head_dim": ("head_dim",), "vocab": ("vocab_size",),
            "max_context": ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"),
            "intermediate": ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A transformer's size and shape. 0 in a shape field means unknown (the planner then says what it assumed)."""
    parameters: int                  # every stored weight, embeddings included
    layers: int = 0
    hidden: int = 0                  # model width d
    heads: int = 0                   # query heads
    kv_heads: int = 0                # key/value heads (grouped-query attention: fewer than heads)
    head_dim: int = 0
    vocab: int = 0
    max_context: int = 0             # tokens the model was trained for
    intermediate: int = 0            # MLP width; 0: unknown (the seed's 4·d)
    sliding_window: int = 0          # tokens a local-attention layer keeps (Gemma 3); 0: none
    sliding_layers: int = 0          # how many layers attend locally
    embedding_parameters: int = 0    # parameters only looked up, never multiplied (an untied token embedding)
    causal_lm: bool = True           # False for encoders: no KV cache, no decode
    source: str = ""                 # where the numbers come from
    stored_bytes: int = 0            # tensor bytes of the file read (0: not read from a file)
    decoder: DecoderConfig | None = dataclasses.field(default=None, compare=False, repr=False)   # per-tensor shapes

    def __post_init__(self):
        value = self.parameters
        if isinstance(value, float) and value.is_integer():
            object.__setattr__(self, "parameters", int(value))
        if not isinstance(self.parameters, int) or isinstance(self.parameters, bool) or \
                not 1 <= self.parameters <= MAX_PARAMETERS:
            raise InvalidArgument(f"parameters is {str(value)[:40]}; expected a whole number in "
                                  f"[1, {MAX_PARAMETERS:.0e}] "
                                  "(e.g. 7e9)", field="parameters")
        for name, upper in _LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= upper:
                raise InvalidArgument(f"{name} is {str(value)[:40]}; expected a whole number in [0, {upper}] "
                                      "(0: unknown)", field=name)
        if self.heads and not self.head_dim and self.hidden:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.heads and not self.kv_heads:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.heads and self.kv_heads > self.heads:
            raise InvalidArgument(f"kv_heads {self.kv_heads} exceeds heads {self.heads}; grouped-query attention "
                                  "shares each key/value head among several query heads", field="kv_heads")
        if self.sliding_layers > self.layers:
            raise InvalidArgument(f"sliding_layers {self.sliding_layers} exceeds layers {self.layers}",
                                  field="sliding_layers")

    @property
    def has_kv_shape(self) -> bool:
        """Whether layers, key/value heads and head_dim are all known (what the KV cache needs)."""
        return bool(self.layers and self.kv_heads and self.head_dim)

    @property
    def attention_width(self) -> int:
        """Query heads × head_dim: the width attention scores and values are computed at."""
        return self.heads * self.head_dim if self.heads and self.head_dim else self.hidden

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "decoder"}
        out["per_tensor_shapes"] = self.decoder is not None
        return out

    @classmethod
    def from_config(cls, raw: dict[str, Any], *, parameters: int = 0, source: str = "config.json",
                    stored_bytes: int = 0) -> "ModelShape":
        """From an HF config.json dict. `parameters` (counted from the tensors) wins over the config's count."""
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{source} is a JSON {type(raw).__name__}, not an object", field="model")
        if isinstance(raw.get("text_config"), dict):          # multimodal wrappers (Gemma 3 4B+) nest the LM
            raw = {**raw, **raw["text_config"]}
        values = {name: _config_int(raw, keys, source) for name, keys in _ALIASES.items()}
        if not values["kv_heads"] and raw.get("multi_query") is True:
            values["kv_heads"] = 1                             # Falcon-7B's spelling of one shared K/V head
        decoder = _decoder(raw)
        architectures = raw.get("architectures") or []
        causal = not architectures or any(str(a).endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                                          for a in architectures)
        tied = bool(raw.get("tie_word_embeddings", raw.get("model_type") in ("gpt2", "gemma3_text", "gemma3")))
        if decoder is not None:
            tied = decoder.tie_word_embeddings                 # with the family's default when the key is absent
            counted = decoder.parameter_count()
            sliding = sum(decoder.is_sliding(i) for i in range(decoder.num_hidden_layers))
            values.update(head_dim=decoder.head_dim, sliding_window=decoder.sliding_window if sliding else 0,
                          sliding_layers=sliding if decoder.sliding_window else 0)
        else:
            counted = _estimate_parameters(raw, values, tied)
        embedding = 0 if tied or not causal else values["vocab"] * values["hidden"]
        return cls(parameters=parameters or counted, causal_lm=causal, embedding_parameters=embedding,
                   source=source + ("" if parameters else " (parameters computed from its shapes)"),
                   stored_bytes=stored_bytes, decoder=decoder, **values)

    @classmethod
    def from_path(cls, path: Path) -> "ModelShape":
        """An HF directory (config.json + *.safetensors), a GGUF file, an edgeforge bundle (.tar) or a
        .safetensors file (parameters only; give the shape by hand)."""
        path = Path(path)
        if path.is_dir():
            return _from_directory(path)
        if not path.is_file():
            raise InvalidArgument(f"{path} does not exist", reason="NOT_FOUND", field="model")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return _from_gguf(path)
        if path.suffix == ".safetensors":
            header = untrusted.read_safetensors_header(path)
            return cls(parameters=_count(header), source=f"{path.name} (tensors only: give the shape by hand)",
                       stored_bytes=path.stat().st_size - header.data_start)
        if tarfile.is_tarfile(path):
            return _from_bundle(path)
        raise InvalidArgument(f"{path.name} is neither a model directory, a GGUF file (its first bytes are {magic!r}), "
                              "an edgeforge bundle (.tar) nor a .safetensors file", reason="UNKNOWN_MODEL_FORMAT",
                              field="model")


def _config_int(raw: dict, keys: tuple[str, ...], source: str) -> int:
    for key in keys:
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"{source}: {key} is {str(value)[:40]}; expected a whole number",
                                  reason="MALFORMED_MODEL", field="model")
        return value
    return 0


def _decoder(raw: dict) -> DecoderConfig | None:
    """The DecoderConfig when edgeforge implements the family (exact per-tensor shapes), else None."""
    try:
        return DecoderConfig.from_hf(raw)
    except InvalidArgument:
        return None


def _estimate_parameters(raw: dict, values: dict[str, int], tied: bool) -> int:
    """A family edgeforge does not implement: embeddings + per layer attention (Q, K, V, O) and the MLP
    (three matrices when gated, SiLU/SwiGLU; two otherwise) + norms."""
    d, layers, vocab = values["hidden"], values["layers"], values["vocab"]
    if not d or not layers:
        raise InvalidArgument("config.json gives no hidden size or layer count; give --params",
                              reason="MALFORMED_MODEL", field="model")
    heads = values["heads"] or 1
    head_dim = values["head_dim"] or d // heads
    kv = values["kv_heads"] or heads
    ff = values["intermediate"] or 4 * d
    gated = str(raw.get("hidden_act", raw.get("activation_function", ""))).lower() in ("silu", "swish", "swiglu")
    attention = 2 * d * heads * head_dim + 2 * d * kv * head_dim
    mlp = (3 if gated else 2) * d * ff
    return vocab * d * (1 if tied else 2) + layers * (attention + mlp + 2 * d) + d


def _count(header: untrusted.SafetensorsHeader) -> int:
    return sum(math.prod(entry.shape) for entry in header.tensors.values())


def _from_directory(path: Path) -> ModelShape:
    config = path / "config.json"
    if not config.is_file():
        raise InvalidArgument(f"{path} has no config.json; the planner reads HF model directories (or give --params)",
                              reason="UNKNOWN_MODEL_FORMAT", field="model")
    try:
        raw = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgument(f"cannot read {config}: {error}", reason="MALFORMED_MODEL", field="model")
    headers = [untrusted.read_safetensors_header(shard) for shard in sorted(path.glob("*.safetensors"))]
    stored = sum(shard.stat().st_size for shard in path.glob("*.safetensors")) - sum(h.data_start for h in headers)
    return ModelShape.from_config(raw, parameters=sum(_count(h) for h in headers),
                                  source=f"{path.name}/config.json" + (" + safetensors" if headers else ""),
                                  stored_bytes=stored)


def _from_bundle(path: Path) -> ModelShape:
    """Reads config.json and the safetensors headers inside an uncompressed bundle without extracting it."""
    raw, parameters, stored = None, 0, 0
    try:
        with tarfile.open(path, "r:") as tar:
            for member, name in untrusted.checked_members(tar, path.stat().st_size, "model bundle", directories=False):
                if str(name) == "config.json":
                    if member.size > MAX_CONFIG_BYTES:
                        raise ResourceExhausted(f"model bundle: config.json is {member.size} bytes", field="model")
                    raw = json.loads(tar.extractfile(member).read())
                elif str(name).endswith(".safetensors"):
                    header = _bundle_header(tar, member)
                    parameters += _count(header)
                    stored += member.size - header.data_start
    except (tarfile.TarError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgument(f"{path.name} is not a readable edgeforge bundle: {str(error)[:200]}",
                              reason="MALFORMED_MODEL", field="model")
    if raw is None:
        raise InvalidArgument(f"{path.name} has no config.json; only transformer bundles can be planned",
                              reason="UNKNOWN_MODEL_FORMAT", field="model")
    return ModelShape.from_config(raw, parameters=parameters, source=f"{path.name} (bundle)", stored_bytes=stored)


def _bundle_header(tar: tarfile.TarFile, member: tarfile.TarInfo) -> untrusted.SafetensorsHeader:
    what = f"bundle member {member.name}"
    f = tar.extractfile(member)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise InvalidArgument(f"{what}: too short for a safetensors header", reason="MALFORMED_MODEL", field="model")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(member.size - 8, untrusted.MAX_SAFETENSORS_HEADER_BYTES):   # checked before reading it
        return untrusted.parse_safetensors_header(prefix, member.size, what)     # raises, naming the problem
    return untrusted.parse_safetensors_header(prefix + f.read(length), member.size, what)


def _gguf_int(reader, key: str, default: int = 0) -> int:
    value = reader.get(key, default)
    if isinstance(value, list):                 # per-layer counts (some families): the largest sizes the cache
        value = max(value, default=default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"GGUF metadata {key} is {str(value)[:40]}; expected a whole number",
                              reason="MALFORMED_MODEL", field="model")
    return value


def _from_gguf(path: Path) -> ModelShape:
    from shared.models.gguf_import import read_config
    from shared.models.gguf_reader import read_gguf
    reader = read_gguf(path)
    arch = reader.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InvalidArgument(f"{path.name}: GGUF metadata lacks general.architecture", reason="MALFORMED_MODEL",
                              field="model")
    embed = reader.tensors.get("token_embd.weight")
    tokens = reader.get("tokenizer.ggml.tokens")
    vocab = _gguf_int(reader, f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, list) else 0) or \
        (embed.shape[0] if embed is not None else 0)
    hidden = _gguf_int(reader, f"{arch}.embedding_length")
    decoder = None
    if arch in ARCHITECTURES:
        try:
            decoder = read_config(reader)
        except InvalidArgument:
            decoder = None                     # still plannable from the generic keys below
    layers = _gguf_int(reader, f"{arch}.block_count")
    window = _gguf_int(reader, f"{arch}.attention.sliding_window")
    sliding = sum(decoder.is_sliding(i) for i in range(layers)) if decoder is not None and window else 0
    untied = "output.weight" in reader.tensors
    return ModelShape(
        parameters=sum(math.prod(t.shape) for t in reader.tensors.values()),
        layers=layers, hidden=hidden, heads=_gguf_int(reader, f"{arch}.attention.head_count"),
        kv_heads=_gguf_int(reader, f"{arch}.attention.head_count_kv"),
        head_dim=_gguf_int(reader, f"{arch}.attention.key_length"), vocab=vocab,
        max_context=_gguf_int(reader, f"{arch}.context_length"),
        intermediate=_gguf_int(reader, f"{arch}.feed_forward_length"),
        sliding_window=window if sliding else 0, sliding_layers=sliding,
        embedding_parameters=vocab * hidden if untied else 0,
        source=f"{path.name} (GGUF metadata, {arch})", stored_bytes=sum(t.nbytes for t in reader.tensors.values()),
        decoder=decoder)
