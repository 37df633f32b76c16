"""GGUF export, written with gguf-py's GGUFWriter in streaming mode (header and tensor infos first,
then one tensor at a time, so peak memory is one tensor).

Quantized tensors are packed from our codes — the exporter never re-quantizes:
- Q8_0 block (34 bytes): float16 d, then 32 int8 codes.
- Q4_0 block (18 bytes): float16 d, then 16 bytes; byte j holds code j (low nibble) and code j+16
  (high nibble). Codes are already offset by 8, exactly as llama.cpp stores them.
Q and K rows are permuted into llama.cpp's rotary order; this commutes with quantization because
every grid here groups along the input dimension.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from services.exporter.base import ExportedFile, ExportFormat, ExportInput
from shared.errors import FailedPrecondition
from shared.models.gguf_import import hf_to_gguf_names, permute_rows
from shared.models.tokenizer import gguf_vocabulary
from shared.quant.grids import Granularity, Grid
from shared.quant.qtensor import QuantizedTensor

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/x-gguf"


BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}          # per 32 weights


def gguf_block_type(grid: Grid) -> str:
    """The GGUF type whose blocks hold this grid exactly, or FailedPrecondition."""
    if grid.symmetric and grid.granularity is Granularity.PER_GROUP and grid.group_size == 32:
        if grid.bits == 8:
            return "q8_0"
        if grid.bits == 4:
            return "q4_0"
    raise FailedPrecondition(f"grid {grid.name} has no GGUF block type at this version (q8_0 and q4_0 need "
                             "symmetric groups of 32)", field="quantization")


def pack_blocks(tensor: QuantizedTensor) -> tuple[np.ndarray, str]:
    """Our codes and float16 scales -> GGUF block bytes (rows, bytes_per_row)."""
    block_type = gguf_block_type(tensor.grid)
    rows, columns = tensor.shape
    blocks = columns // 32
    d = tensor.scales.astype(np.float16).reshape(rows, blocks, 1).view(np.uint8)            # (rows, nb, 2)
    codes = tensor.codes.reshape(rows, blocks, 32)
    if block_type == "q8_0":
        qs = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)                  # (rows, nb, 32)
    else:
        qs = (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)                    # (rows, nb, 16)
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1), block_type


def _file_type(types: set[str]) -> int:
    import gguf
    for name, value in (("q4_0", gguf.LlamaFileType.MOSTLY_Q4_0), ("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0),
                        ("f16", gguf.LlamaFileType.MOSTLY_F16)):
        if name in types:
            return int(value)
    return int(gguf.LlamaFileType.ALL_F32)


class GgufExporter:
    format = ExportFormat.GGUF

    def export(self, source: ExportInput, out_path: Path) -> ExportedFile:
        import gguf
        config = source.model.config
        names = hf_to_gguf_names(config)
        shapes = config.tensor_shapes()

        def encoded(hf_name: str) -> tuple[np.ndarray, int, str]:
            """-> (array to write, GGML type, our type name)."""
            value = source.tensor(hf_name)
            heads = {"self_attn.q_proj": config.num_attention_heads,
                     "self_attn.k_proj": config.num_key_value_heads}
            head_count = next((h for key, h in heads.items() if f".{key}." in hf_name), None)
            if isinstance(value, QuantizedTensor):
                if head_count:
                    order = permute_rows(np.arange(value.shape[0]), head_count)
                    value = QuantizedTensor(value.grid, value.codes[order], value.scales[order], None)
                data, block_type = pack_blocks(value)
                return data, int(getattr(gguf.GGMLQuantizationType, block_type.upper())), block_type
            if head_count:
                value = permute_rows(value, head_count)
            if value.ndim == 2 and source.float_type == "f16":
                return value.astype(np.float16), int(gguf.GGMLQuantizationType.F16), "f16"
            return value.astype(np.float32), int(gguf.GGMLQuantizationType.F32), "f32"

        def planned(hf_name: str) -> tuple[tuple[int, ...], np.dtype, str]:
            """(stored shape, numpy dtype, type name) without reading the tensor."""
            shape, grid = shapes[hf_name], source.grid(hf_name)
            if grid is not None:
                block_type = gguf_block_type(grid)
                return (shape[0], shape[1] // 32 * BLOCK_BYTES[block_type]), np.dtype(np.uint8), block_type
            if len(shape) == 2 and source.float_type == "f16":
                return shape, np.dtype(np.float16), "f16"
            return shape, np.dtype(np.float32), "f32"

        # Tensor infos (type and byte size of every tensor) precede all data in a GGUF file.
        infos = []
        for hf_name in shapes:
            shape, dtype, type_name = planned(hf_name)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            ggml_type = int(getattr(gguf.GGMLQuantizationType, type_name.upper()))
            infos.append((hf_name, shape, dtype, nbytes, ggml_type, type_name))
        types = {info[5] for info in infos}
        writer = gguf.GGUFWriter(out_path, "llama")
        self._metadata(writer, source, _file_type(types))
        for hf_name, shape, dtype, nbytes, ggml_type, type_name in infos:
            raw = gguf.GGMLQuantizationType(ggml_type) if type_name not in ("f32", "f16") else None
            writer.add_tensor_info(names[hf_name], shape, dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf_name, shape, _, _, _, type_name in infos:     # then the data, one tensor at a time
            data, _, written_type = encoded(hf_name)
            if written_type != type_name or tuple(data.shape) != tuple(shape):
                raise FailedPrecondition(f"{hf_name}: planned {type_name}{list(shape)}, produced "
                                         f"{written_type}{list(data.shape)}")
            writer.write_tensor_data(data)
        writer.close()
        counts = {t: sum(1 for i in infos if i[5] == t) for t in sorted(types)}
        log.info("wrote %s with tensor types %s", out_path.name, counts)
        return ExportedFile(out_path, MEDIA_TYPE, {"format": "gguf", "tensor_types": ",".join(
            f"{t}:{n}" for t, n in counts.items())})

    @staticmethod
    def _metadata(writer, source: ExportInput, file_type: int) -> None:
        config = source.model.config
        writer.add_name(source.model.path.name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)
        writer.add_quantization_version(2)
        vocab = gguf_vocabulary(source.model.tokenizer_path, source.model.tokenizer_config(), config.vocab_size)
        writer.add_tokenizer_model(vocab["model"])
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["token_types"])
        writer.add_token_merges(vocab["merges"])
        for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                         ("unknown_token_id", writer.add_unk_token_id), ("padding_token_id", writer.add_pad_token_id)):
            if vocab[key] is not None:
                add(vocab[key])
        writer.add_add_bos_token(vocab["add_bos_token"])
        if vocab["chat_template"]:
            writer.add_chat_template(vocab["chat_template"])
