"""Model bundles: deterministic packing, refusing unpacking, safetensors header checks, ModelDir.

The model is a tiny synthetic llama (random tensors) written with the streaming safetensors writer.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.errors import InvalidArgument
from shared.models.bundle import ModelDir, is_bundle, pack, read_safetensors_header, unpack
from shared.models.decoder_config import DecoderConfig
from shared.tensors.safetensors_writer import write_safetensors

CONFIG = DecoderConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)


def _arrays(config: DecoderConfig, skip: str = "", seed: int = 0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in config.tensor_shapes().items() if name != skip}


def _write_weights(path: Path, arrays: dict[str, np.ndarray]) -> None:
    layout = {name: (array.shape, "F32") for name, array in arrays.items()}
    write_safetensors(path, layout, arrays.items(), metadata={"format": "pt"})


def _model_dir(root: Path, skip: str = "") -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(CONFIG.to_hf(), sort_keys=True))
    _write_weights(root / "model.safetensors", _arrays(CONFIG, skip))
    (root / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (root / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


CONFIG_MEMBER = ("config.json", json.dumps(CONFIG.to_hf()).encode())


# ---------------------------------------------------------------- pack
def test_pack_is_deterministic(tmp_path):
    model = _model_dir(tmp_path / "m")
    pack(model, tmp_path / "a.tar")
    pack(model, tmp_path / "b.tar")
    assert _sha(tmp_path / "a.tar") == _sha(tmp_path / "b.tar")


def test_pack_ignores_mtimes_and_directory_location(tmp_path):
    model = _model_dir(tmp_path / "m")
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(model, copy)
    for path in copy.iterdir():
        os.utime(path, (1_000_000_000, 1_000_000_000))
    pack(model, tmp_path / "a.tar")
    pack(copy, tmp_path / "b.tar")
    assert _sha(tmp_path / "a.tar") == _sha(tmp_path / "b.tar")


def test_pack_writes_sorted_plain_files_with_zeroed_metadata(tmp_path):
    model = _model_dir(tmp_path / "m")
    (model / "notes.md").write_text("not part of a model")
    (model / "sub").mkdir()
    (model / "sub" / "extra.json").write_text("{}")
    pack(model, tmp_path / "m.tar")
    assert is_bundle(tmp_path / "m.tar")
    with tarfile.open(tmp_path / "m.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["config.json", "model.safetensors", "tokenizer.json",
                                         "tokenizer_config.json"]
    assert all(m.isfile() and m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in members)


def test_pack_refuses_directory_without_config(tmp_path):
    model = _model_dir(tmp_path / "m")
    (model / "config.json").unlink()
    with pytest.raises(InvalidArgument) as info:
        pack(model, tmp_path / "m.tar")
    assert info.value.reason == "UNKNOWN_MODEL_FORMAT"


@pytest.mark.parametrize("name", [".extra.json", "special tokens.json"], ids=["leading-dot", "space"])
def test_every_packed_bundle_unpacks(tmp_path, name):
    model = _model_dir(tmp_path / "m")
    (model / name).write_text("{}")
    pack(model, tmp_path / "m.tar")
    out = unpack(tmp_path / "m.tar", tmp_path / "out")
    assert (out / "config.json").is_file()


# ---------------------------------------------------------------- unpack
def test_pack_unpack_round_trip(tmp_path):
    model = _model_dir(tmp_path / "m")
    pack(model, tmp_path / "m.tar")
    out = unpack(tmp_path / "m.tar", tmp_path / "out" / "model")
    assert out == tmp_path / "out" / "model"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in model.iterdir())
    for path in model.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["model"]          # staging dir cleaned up


def test_unpack_into_existing_destination_is_a_no_op(tmp_path):
    model = _model_dir(tmp_path / "m")
    pack(model, tmp_path / "m.tar")
    dest = tmp_path / "dest"
    dest.mkdir()
    assert unpack(tmp_path / "m.tar", dest) == dest
    assert list(dest.iterdir()) == []


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def _directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.mark.parametrize("bad", [
    ("../evil.json", b"{}"),
    ("sub/../../evil.json", b"{}"),
    ("/tmp/abs.json", b"{}"),
    ("..", b""),
    (".hidden.json", b"{}"),
    ("weights.bin", b"\0" * 8),
    ("script.sh", b"#!/bin/sh\n"),
    "symlink",
    "hardlink",
    "directory",
], ids=["dotdot", "nested-dotdot", "absolute", "bare-dotdot", "hidden", "bin-suffix", "sh-suffix",
        "symlink", "hardlink", "directory"])
def test_unpack_refuses_unsafe_members(tmp_path, bad):
    if bad == "symlink":
        bad = _symlink("tokenizer.json", "/etc/passwd")
    elif bad == "hardlink":
        bad = _symlink("tokenizer.json", "config.json")
        bad.type = tarfile.LNKTYPE
    elif bad == "directory":
        bad = _directory("subdir.json")
    archive = _tar(tmp_path / "bad.tar", [CONFIG_MEMBER, bad])
    dest = tmp_path / "work" / "model"
    with pytest.raises(InvalidArgument) as info:
        unpack(archive, dest)
    assert info.value.reason == "MALFORMED_MODEL"
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []                    # no staging left behind
    assert not (tmp_path / "evil.json").exists() and not (tmp_path / "work" / "evil.json").exists()


def test_unpack_refuses_bundle_without_config(tmp_path):
    archive = _tar(tmp_path / "noconfig.tar", [("tokenizer.json", b"{}")])
    dest = tmp_path / "work" / "model"
    with pytest.raises(InvalidArgument) as info:
        unpack(archive, dest)
    assert info.value.reason == "UNKNOWN_MODEL_FORMAT"
    assert not dest.exists() and list(dest.parent.iterdir()) == []


@pytest.mark.parametrize("content", [b"this is not a tar archive at all\n" * 40, b""], ids=["text", "empty"])
def test_unpack_refuses_non_tar_input(tmp_path, content):
    archive = tmp_path / "junk.tar"
    archive.write_bytes(content)
    assert not is_bundle(archive)
    dest = tmp_path / "work" / "model"
    with pytest.raises(InvalidArgument) as info:
        unpack(archive, dest)
    assert info.value.reason == "MALFORMED_MODEL"
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_unpack_refuses_truncated_tar(tmp_path):
    model = _model_dir(tmp_path / "m")
    pack(model, tmp_path / "m.tar")
    data = (tmp_path / "m.tar").read_bytes()
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(InvalidArgument):
        unpack(truncated, tmp_path / "work" / "model")
    assert not (tmp_path / "work" / "model").exists()


# ---------------------------------------------------------------- safetensors header
def _raw_safetensors(path: Path, header: bytes, data: bytes = b"", declared: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header + data)
    return path


def test_read_header_of_a_valid_file(tmp_path):
    path = tmp_path / "w.safetensors"
    _write_weights(path, {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)})
    header = read_safetensors_header(path)
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b"]["data_offsets"] == [24, 40]
    assert header["__metadata__"] == {"format": "pt"}


def test_read_header_refuses_length_beyond_file(tmp_path):
    path = _raw_safetensors(tmp_path / "w.safetensors", b"{}", declared=10_000)
    with pytest.raises(InvalidArgument) as info:
        read_safetensors_header(path)
    assert info.value.reason == "MALFORMED_MODEL"
    assert "10000" in info.value.message


def test_read_header_refuses_file_shorter_than_prefix(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x02\0\0")
    with pytest.raises(InvalidArgument):
        read_safetensors_header(path)


@pytest.mark.parametrize("offsets", [[0, 17], [8, 4], [-1, 4], [20, 24]])
def test_read_header_refuses_offsets_outside_data(tmp_path, offsets):
    header = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}).encode()
    path = _raw_safetensors(tmp_path / "w.safetensors", header, b"\0" * 16)
    with pytest.raises(InvalidArgument) as info:
        read_safetensors_header(path)
    assert "16 data bytes" in info.value.message


def test_read_header_refuses_entry_without_offsets(tmp_path):
    header = json.dumps({"t": {"dtype": "F32", "shape": [1]}}).encode()
    with pytest.raises(InvalidArgument):
        read_safetensors_header(_raw_safetensors(tmp_path / "w.safetensors", header, b"\0" * 4))


@pytest.mark.parametrize("header", [b"{not json", b"\xff\xfe\xfd\xfc"], ids=["syntax", "not-utf8"])
def test_read_header_refuses_non_json(tmp_path, header):
    with pytest.raises(InvalidArgument) as info:
        read_safetensors_header(_raw_safetensors(tmp_path / "w.safetensors", header, b"\0" * 8))
    assert "not JSON" in info.value.message


@pytest.mark.parametrize("header", [
    b"[1, 2, 3]",
    b'{"t": [0, 4]}',
    b'{"t": {"data_offsets": [0]}}',
    b'{"t": {"data_offsets": ["0", "4"]}}',
], ids=["list-header", "entry-not-object", "short-offsets", "string-offsets"])
def test_read_header_refuses_json_of_the_wrong_shape(tmp_path, header):
    with pytest.raises(InvalidArgument):
        read_safetensors_header(_raw_safetensors(tmp_path / "w.safetensors", header, b"\0" * 8))


# ---------------------------------------------------------------- ModelDir
def test_model_dir_reads_tensors_in_config_order(tmp_path):
    model = _model_dir(tmp_path / "m")
    loaded = ModelDir(model)
    assert loaded.config == CONFIG
    assert loaded.tensor_names() == list(CONFIG.tensor_shapes())
    expected = _arrays(CONFIG)
    for name in loaded.tensor_names():
        tensor = loaded.tensor(name)
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, torch.from_numpy(expected[name]))
        assert np.array_equal(loaded.array(name), expected[name])
    assert loaded.tokenizer_path == model / "tokenizer.json"
    assert loaded.tokenizer_config() == {"bos_token": "<s>"}


def test_model_dir_refuses_a_missing_tensor(tmp_path):
    model = _model_dir(tmp_path / "m", skip="model.layers.0.mlp.up_proj.weight")
    with pytest.raises(InvalidArgument) as info:
        ModelDir(model)
    assert info.value.reason == "MALFORMED_MODEL"
    assert "model.layers.0.mlp.up_proj.weight" in info.value.message


def test_model_dir_refuses_directory_without_weights(tmp_path):
    model = _model_dir(tmp_path / "m")
    (model / "model.safetensors").unlink()
    with pytest.raises(InvalidArgument) as info:
        ModelDir(model)
    assert info.value.reason == "UNKNOWN_MODEL_FORMAT"


def test_model_dir_refuses_a_wrong_shape_on_read(tmp_path):
    model = _model_dir(tmp_path / "m")
    arrays = _arrays(CONFIG)
    arrays["model.norm.weight"] = np.ones(9, np.float32)               # config implies (8,)
    _write_weights(model / "model.safetensors", arrays)
    loaded = ModelDir(model)
    with pytest.raises(InvalidArgument) as info:
        loaded.tensor("model.norm.weight")
    assert "(9,)" in info.value.message and "(8,)" in info.value.message


def test_model_dir_refuses_non_finite_values(tmp_path):
    model = _model_dir(tmp_path / "m")
    arrays = _arrays(CONFIG)
    arrays["model.norm.weight"][3] = np.nan
    _write_weights(model / "model.safetensors", arrays)
    with pytest.raises(InvalidArgument) as info:
        ModelDir(model).tensor("model.norm.weight")
    assert "NaN" in info.value.message


def test_model_dir_unknown_tensor(tmp_path):
    with pytest.raises(InvalidArgument):
        ModelDir(_model_dir(tmp_path / "m")).tensor("model.layers.7.mlp.up_proj.weight")


def test_unpacked_bundle_is_a_loadable_model(tmp_path):
    pack(_model_dir(tmp_path / "m"), tmp_path / "m.tar")
    loaded = ModelDir(unpack(tmp_path / "m.tar", tmp_path / "out"))
    assert torch.equal(loaded.tensor("lm_head.weight"), torch.from_numpy(_arrays(CONFIG)["lm_head.weight"]))
