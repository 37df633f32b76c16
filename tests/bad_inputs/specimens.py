"""Small valid model and data files built from their real structure, and the corruptions applied to them.

Every bad file in the corpus starts as a file the parser accepts (safetensors written by
safetensors.numpy, GGUF by gguf-py's GGUFWriter, ONNX by onnx.helper, torch files by torch.save, bundles
by the same deterministic tar the SDK writes) and is then damaged in one named way, so each case fails
for exactly one reason.
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

from shared.models.decoder_config import DecoderConfig

# A llama small enough to build dozens of variants in milliseconds (no tokenizer: ImportModel reads none).
TINY = DecoderConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=True,
                     bos_token_id=1, eos_token_id=2)
EMBED = "model.embed_tokens.weight"


# ---------------------------------------------------------------- tar bundles

def tar_bytes(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    """An uncompressed tar of `members` (name -> bytes) plus symlinks (name -> target), as bundle.pack writes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def untar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


# ---------------------------------------------------------------- safetensors

def tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (np.ones(shape) if len(shape) == 1 else rng.normal(0, 0.05, shape)).astype(np.float32)
            for name, shape in TINY.tensor_shapes().items()}


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save
    return save(tensors)


def split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    """(header, data bytes) of a safetensors file."""
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def join_safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def with_header(edit: Callable[[dict], None]) -> bytes:
    """The tiny model's safetensors with its JSON header edited in place (data bytes unchanged)."""
    header, data = split_safetensors(safetensors_bytes(tiny_tensors()))
    edit(header)
    return join_safetensors(header, data)


def decoder_bundle(weights: bytes | None = None, config: dict | None = None, extra: dict[str, bytes] | None = None,
                   links: dict[str, str] | None = None) -> bytes:
    """The tiny llama as a model bundle, with `weights` (model.safetensors) or `config` swapped in."""
    members = {"config.json": json.dumps(config if config is not None else TINY.to_hf()).encode(),
               "model.safetensors": weights if weights is not None else safetensors_bytes(tiny_tensors())}
    return tar_bytes({**members, **(extra or {})}, links=links)


def lm_bundle(tokenizer_dir: Path) -> bytes:
    """The tiny llama with a real tokenizer (SmolLM2's, so its vocabulary of 49,152): runs end to end."""
    import dataclasses
    config = dataclasses.replace(TINY, vocab_size=49152)
    rng = np.random.default_rng(1)
    tensors = {name: (np.ones(shape) if len(shape) == 1 else rng.normal(0, 0.05, shape)).astype(np.float32)
               for name, shape in config.tensor_shapes().items()}
    return tar_bytes({"config.json": json.dumps(config.to_hf()).encode(), "model.safetensors": safetensors_bytes(tensors),
                      **{name: (tokenizer_dir / name).read_bytes()
                         for name in ("tokenizer.json", "tokenizer_config.json")}})


def poisoned(value: float) -> bytes:
    """The tiny model's safetensors with one weight set to `value` (NaN, Inf)."""
    tensors = tiny_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = value
    return safetensors_bytes(tensors)


# ---------------------------------------------------------------- GGUF

def gguf_bytes(tmp: Path, *, arch: str = "llama", poison: float | None = None) -> bytes:
    """The tiny llama as a GGUF file written by gguf-py (F32 tensors, SentencePiece-style vocabulary)."""
    import gguf

    from shared.models.gguf_import import hf_to_gguf_names
    path = tmp / f"tiny-{arch}-{poison}.gguf"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(TINY.num_hidden_layers)
    writer.add_context_length(TINY.max_position_embeddings)
    writer.add_embedding_length(TINY.hidden_size)
    writer.add_feed_forward_length(TINY.intermediate_size)
    writer.add_head_count(TINY.num_attention_heads)
    writer.add_head_count_kv(TINY.num_key_value_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(TINY.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    tensors = tiny_tensors()
    if poison is not None:
        tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = poison
    for hf_name, gguf_name in hf_to_gguf_names(TINY).items():
        writer.add_tensor(gguf_name, tensors[hf_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def patch(blob: bytes, offset: int, fmt: str, value) -> bytes:
    packed = struct.pack(fmt, value)
    return blob[:offset] + packed + blob[offset + len(packed):]


def gguf_tensor_info(blob: bytes, name: str = "token_embd.weight") -> int:
    """Offset of the n_dims field of tensor `name`'s info (after its length-prefixed name)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    position = blob.index(key, 24)
    return position + len(key)


def gguf_dims(blob: bytes, dims: tuple[int, ...], name: str = "token_embd.weight") -> bytes:
    """Rewrites tensor `name`'s dims in place (the same count of dims, so every later offset stays put)."""
    at = gguf_tensor_info(blob, name)
    (n_dims,) = struct.unpack_from("<I", blob, at)
    assert n_dims == len(dims)
    for i, dim in enumerate(dims):
        blob = patch(blob, at + 4 + 8 * i, "<Q", dim)
    return blob


def gguf_type(blob: bytes, kind: int, name: str = "token_embd.weight") -> bytes:
    at = gguf_tensor_info(blob, name)
    (n_dims,) = struct.unpack_from("<I", blob, at)
    return patch(blob, at + 4 + 8 * n_dims, "<I", kind)


# ---------------------------------------------------------------- ONNX

def onnx_model(edit: Callable | None = None):
    """A tiny image classifier: (1, 1, 4, 4) -> Flatten -> MatMul W (16, 3) -> (1, 3)."""
    from onnx import TensorProto, helper, numpy_helper
    weight = numpy_helper.from_array(np.linspace(-1, 1, 48, dtype=np.float32).reshape(16, 3), "W")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if edit is not None:
        edit(model)
    return model


def onnx_bytes(edit: Callable | None = None) -> bytes:
    return onnx_model(edit).SerializeToString()


# ---------------------------------------------------------------- torch

class Payload:
    """Unpickling this writes a file: proof that a loader ran pickled code (it must not)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def torch_bytes(obj) -> bytes:
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def exported_program_bytes(program: bytes | None = None) -> bytes:
    """A .pt2 archive as torch.export.save lays it out (a zip whose `<name>/archive_format` says "pt2"),
    holding `program` as its serialized model; None: a small but well-formed JSON program stub."""
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("tiny/archive_format", "pt2")
        archive.writestr("tiny/version", "0.0.1")
        archive.writestr("tiny/models/model.json", program if program is not None else b'{"graph_module": {}}')
        archive.writestr("tiny/data/weights/model.pt", b"")
    return buffer.getvalue()


# ---------------------------------------------------------------- module bundles

def module_dir(root: Path) -> Path:
    """An (untrained) SmallCNN edgeforge module directory: manifest + model.safetensors."""
    import torch

    from shared.models import modules
    from shared.models.cnn import SmallCNN
    torch.manual_seed(0)
    directory = modules.write_module_dir(
        SmallCNN(channels=(4, 8), hidden=16).eval(), root / "small-cnn", architecture="small_cnn",
        task=modules.IMAGE_TASK, input={"image": {"channels": 1, "size": 28, "mean": [0.5], "std": [0.25]},
                                        "names": ["images"]},
        source={"format": "bad-inputs fixture"}, check=True)
    return directory.path


def module_bundle(directory: Path, edit: Callable[[dict[str, bytes]], None] | None = None,
                  links: dict[str, str] | None = None) -> bytes:
    members = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
    if edit is not None:
        edit(members)
    return tar_bytes(members, links=links)


def images_npz(images: np.ndarray | None = None, **arrays) -> bytes:
    buffer = io.BytesIO()
    if images is not None:
        arrays["images"] = images
    np.savez(buffer, **arrays)
    return buffer.getvalue()
