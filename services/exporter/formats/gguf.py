"""GGUF export of llama, qwen2 and gemma3, written with gguf-py's GGUFWriter in streaming mode (header
and tensor infos first, then one tensor at a time, each read and written in row chunks, so peak
memory is one chunk).

Tensors, names and metadata are what llama.cpp's `convert_hf_to_gguf.py` writes for the architecture
(LlamaModel, Qwen2Model, Gemma3Model), so llama.cpp loads the file as it would its own:
- names from gguf-py's table for MODEL_ARCH.LLAMA / QWEN2 / GEMMA3 (qwen2's q/k/v biases included);
- llama only: Q and K rows permuted into llama.cpp's rotary order; this commutes with quantization
  because every block runs along the input dimension (a row's blocks move with the row). qwen2 and
  gemma3 use NEOX rotary, which needs no permutation;
- gemma3: every norm weight stored as HF's weight + 1 (float32), key/value length and sliding window
  in the metadata; the hyperparameters llama.cpp hardcodes for gemma3 (one global layer in six,
  local rotary base 10000, query scaling 1/sqrt(head_dim)) are checked, not written;
- the vocabulary as tokenizer.json converts to it (byte-level BPE), or a carried tokenizer.gguf's
  tokenizer.* keys verbatim (SentencePiece scores and token types included); the chat template from
  tokenizer_config.json.

Quantized tensors arrive as llama.cpp block bytes (`GgufTensor`, made by the compressor's codecs for
every block type Q8_0 … Q6_K) and are written as they are — the exporter never re-quantizes. Tensors
left float are written as float32, float16 or bfloat16 (2-D only; 1-D norms and biases stay float32,
as llama.cpp keeps them), bfloat16 rounded exactly as ggml's F32 -> BF16 (`float32_to_bfloat16`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from services.exporter.base import ExportedFile, Exporter, ExportFormat, ExportInput, unsupported_arch
from shared.errors import FailedPrecondition
from shared.models.decoder_config import DecoderConfig, gemma3_layer_types
from shared.models.gguf_import import (GEMMA3_LOCAL_ROPE_BASE, GEMMA3_PATTERN, hf_to_gguf_names, norm_shifted,
                                       permute_rows, rotary_permuted)
from shared.models.tokenizer import CHAT_TEMPLATE_KEY, carried_vocabulary, convertible_document, gguf_vocabulary
from shared.quant.grids import Grid
from shared.quant.qtensor import GgufTensor, gguf_row_bytes

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/x-gguf"
CHUNK_BYTES = 64 << 20              # bytes of one tensor chunk in flight (each tensor is written chunk by chunk)
ARCHITECTURES = ("llama", "qwen2", "gemma3")
_FLOAT_DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": np.dtype(np.uint16)}


class _StreamedTensor:
    """What GGUFWriter.write_tensor_data needs of a tensor — `nbytes` and `tofile` — with the bytes
    coming from row chunks, so a tensor of any size passes through one chunk at a time. The bytes
    and the padding around them are the ones the writer would write for the whole array."""

    def __init__(self, name: str, nbytes: int, chunks: Iterator[np.ndarray]):
        self.name, self.nbytes, self._chunks = name, nbytes, chunks

    def tofile(self, fout) -> None:
        written = 0
        for chunk in self._chunks:
            chunk = np.ascontiguousarray(chunk)
            if written + chunk.nbytes > self.nbytes:
                raise FailedPrecondition(f"{self.name}: produced more than the {self.nbytes} bytes planned")
            fout.write(chunk.data)
            written += chunk.nbytes
        if written != self.nbytes:
            raise FailedPrecondition(f"{self.name}: produced {written} bytes, planned {self.nbytes}")


def float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even as ggml_compute_fp32_to_bf16 does;
    NaN stays NaN (made quiet)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits.astype(np.uint64) + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((bits >> 16) | 64).astype(np.uint16), rounded)


def gguf_block_type(grid: Grid) -> str:
    """The GGUF type of a grid, or FailedPrecondition for generic integer grids."""
    if grid.gguf_type:
        return grid.gguf_type
    raise FailedPrecondition(f"grid {grid.name} is not a llama.cpp block type; GGUF candidates name one "
                             "(quantization.type: q4_0, q4_k, …)", field="quantization")


def _file_type(types: set[str], recipe_type: str = "") -> int:
    """The file type llama.cpp reports: the recipe's type when known, else the lowest-bit type present."""
    import gguf

    def lookup(name: str):
        for key in (f"MOSTLY_{name.upper()}", f"MOSTLY_{name.upper()}_S"):    # q4_k alone is llama.cpp's Q4_K_S
            if hasattr(gguf.LlamaFileType, key):
                return int(getattr(gguf.LlamaFileType, key))
        return None
    if recipe_type and lookup(recipe_type) is not None:
        return lookup(recipe_type)
    for name in ("q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0", "f16", "bf16"):
        if name in types:
            return lookup(name)
    return int(gguf.LlamaFileType.ALL_F32)


def check_architecture(config: DecoderConfig) -> None:
    """FailedPrecondition (UNSUPPORTED_ARCH) unless llama.cpp can run `config` as HF does."""
    if config.architecture not in ARCHITECTURES:
        raise unsupported_arch("GGUF", config.architecture, ARCHITECTURES)
    if config.architecture != "gemma3":
        return
    # llama.cpp reads none of these from the file for gemma3: it assumes Gemma 3's released values.
    scalar = config.hidden_size / config.num_attention_heads if config.num_hidden_layers == 62 else config.head_dim
    fixed = {"query_pre_attn_scalar": (config.query_pre_attn_scalar, float(scalar)),
             "rope_local_base_freq": (config.rope_local_base_freq, GEMMA3_LOCAL_ROPE_BASE),
             "layer_types": (config.layer_types, gemma3_layer_types(config.num_hidden_layers, GEMMA3_PATTERN))}
    for field, (value, expected) in fixed.items():
        if value != expected:
            shown = "one global layer in six" if field == "layer_types" else expected
            raise FailedPrecondition(f"GGUF cannot express architecture 'gemma3' with {field} other than "
                                     f"llama.cpp's fixed {shown}", reason="UNSUPPORTED_ARCH", field="model")
    if config.sliding_window <= 0:
        raise FailedPrecondition("GGUF cannot express architecture 'gemma3' without a sliding window",
                                 reason="UNSUPPORTED_ARCH", field="model")


class GgufExporter(Exporter):
    format = ExportFormat.GGUF
    suffix = ".gguf"

    def check(self, source: ExportInput) -> None:
        """Architecture (config.json) and vocabulary: a tokenizer.gguf, or a tokenizer.json GGUF can express."""
        check_architecture(source.model.config)
        path = source.model.tokenizer_path
        if not path.is_file():
            raise FailedPrecondition(f"{source.model.path.name} has no tokenizer.json or tokenizer.gguf; a GGUF "
                                     "file must carry its vocabulary", reason="UNSUPPORTED_OP", field="model")
        if not path.name.endswith(".gguf"):
            convertible_document(path)

    def export(self, source: ExportInput, out_path: Path) -> ExportedFile:
        import gguf
        self.check(source)
        config = source.model.config
        names = hf_to_gguf_names(config)
        shapes = config.tensor_shapes()

        def chunks(hf_name: str, type_name: str) -> Iterator[np.ndarray]:
            """The tensor's bytes as written, in row chunks of at most CHUNK_BYTES read from the
            compressed file (block bytes) or the float model. Q/K chunks hold whole heads, so the
            rotary permutation stays inside a chunk."""
            heads = {"self_attn.q_proj.weight": config.num_attention_heads,
                     "self_attn.k_proj.weight": config.num_key_value_heads}
            head_count = next((h for key, h in heads.items() if hf_name.endswith(key)), None)
            head_count = head_count if rotary_permuted(config) else None
            grid, shape = source.grid(hf_name), shapes[hf_name]
            rows = shape[0]
            row_bytes = gguf_row_bytes(grid, shape[1]) if grid is not None else 4 * int(np.prod(shape[1:]))
            step = max(1, CHUNK_BYTES // max(1, row_bytes))
            head_rows = rows // head_count if head_count else 1
            step = max(1, step // head_rows) * head_rows
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                order = slice(None)
                if head_count:
                    order = permute_rows(np.arange(stop - start), (stop - start) // head_rows)
                if grid is None:
                    value = source.model.rows(hf_name, start, stop)[order]
                    if norm_shifted(config, hf_name):
                        value = value + np.float32(1.0)
                    if type_name == "bf16":
                        yield float32_to_bfloat16(value)
                    else:
                        yield value.astype(_FLOAT_DTYPES[type_name])
                    continue
                value = source.compressed.read_rows(hf_name, start, stop)
                if not isinstance(value, GgufTensor) or value.grid.gguf_type != type_name:
                    raise FailedPrecondition(f"{hf_name}: planned {type_name}, the compressed file holds "
                                             f"{value.grid.name}")
                yield value.data[order]

        def planned(hf_name: str) -> tuple[tuple[int, ...], np.dtype, str]:
            """(stored shape, numpy dtype, type name) without reading the tensor."""
            shape, grid = shapes[hf_name], source.grid(hf_name)
            if grid is not None:
                block_type = gguf_block_type(grid)
                return (shape[0], gguf_row_bytes(grid, shape[1])), np.dtype(np.uint8), block_type
            if len(shape) == 2 and source.float_type in ("f16", "bf16"):
                return shape, _FLOAT_DTYPES[source.float_type], source.float_type
            return shape, np.dtype(np.float32), "f32"

        # Tensor infos (type and byte size of every tensor) precede all data in a GGUF file.
        infos = []
        for hf_name in shapes:
            shape, dtype, type_name = planned(hf_name)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            ggml_type = int(getattr(gguf.GGMLQuantizationType, type_name.upper()))
            infos.append((hf_name, shape, dtype, nbytes, ggml_type, type_name))
        types = {info[5] for info in infos}
        writer = gguf.GGUFWriter(out_path, config.architecture)
        self._metadata(writer, source, _file_type(types, source.recipe.get("type", "")))
        for hf_name, shape, dtype, nbytes, ggml_type, type_name in infos:
            raw = gguf.GGMLQuantizationType(ggml_type) if type_name not in ("f32", "f16") else None
            if type_name == "bf16":                   # bits as bytes: the writer takes raw types as uint8
                shape, dtype = (shape[0], 2 * shape[1]), np.dtype(np.uint8)
            writer.add_tensor_info(names[hf_name], shape, dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf_name, shape, _, nbytes, _, type_name in infos:     # then the data, one tensor at a time
            writer.write_tensor_data(_StreamedTensor(hf_name, nbytes, chunks(hf_name, type_name)))
        writer.close()
        counts = {t: sum(1 for i in infos if i[5] == t) for t in sorted(types)}
        log.info("wrote %s (%s) with tensor types %s", out_path.name, config.architecture, counts)
        return ExportedFile(out_path, MEDIA_TYPE, {"format": "gguf", "architecture": config.architecture,
                                                   "tensor_types": ",".join(f"{t}:{n}" for t, n in counts.items())})

    @staticmethod
    def _metadata(writer, source: ExportInput, file_type: int) -> None:
        """The hyperparameters convert_hf_to_gguf.py writes for the architecture, then the vocabulary."""
        config = source.model.config
        writer.add_name(source.model.path.name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(config.rope_theta)            # gemma3: the global layers' base
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        if config.architecture == "gemma3":
            writer.add_key_length(config.head_dim)
            writer.add_value_length(config.head_dim)
            writer.add_sliding_window(config.sliding_window)
            if config.final_logit_softcapping:
                writer.add_final_logit_softcapping(config.final_logit_softcapping)
        else:
            writer.add_rope_dimension_count(config.head_dim)
            writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)
        writer.add_quantization_version(2)
        GgufExporter._vocabulary(writer, source)

    @staticmethod
    def _vocabulary(writer, source: ExportInput) -> None:
        import gguf
        model, config = source.model, source.model.config
        tokenizer_config = model.tokenizer_config()
        template = tokenizer_config.get("chat_template")
        if model.tokenizer_path.name.endswith(".gguf"):
            vocabulary = carried_vocabulary(model.tokenizer_path)
            tokens = len(vocabulary["tokenizer.ggml.tokens"].value)
            if tokens != config.vocab_size:
                raise FailedPrecondition(f"the carried vocabulary has {tokens} tokens, the model "
                                         f"{config.vocab_size} embeddings", reason="MALFORMED_MODEL", field="model")
            for key, field in vocabulary.items():
                writer.add_key_value(key, field.value, gguf.GGUFValueType(field.type),
                                     None if field.sub_type is None else gguf.GGUFValueType(field.sub_type))
        else:
            vocab = gguf_vocabulary(model.tokenizer_path, tokenizer_config, config.vocab_size)
            writer.add_tokenizer_model(vocab["model"])
            writer.add_tokenizer_pre(vocab["pre"])
            writer.add_token_list(vocab["tokens"])
            writer.add_token_types(vocab["token_types"])
            writer.add_token_merges(vocab["merges"])
            for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                             ("unknown_token_id", writer.add_unk_token_id),
                             ("padding_token_id", writer.add_pad_token_id)):
                if vocab[key] is not None:
                    add(vocab[key])
            writer.add_add_bos_token(vocab["add_bos_token"])
        if template:
            writer.add_string(CHAT_TEMPLATE_KEY, template)
