"""Hand-built hostile model files: every check in shared/untrusted.py and shared/models/gguf_reader.py
refuses them with a typed error naming the problem, before anything is allocated or executed."""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from shared import untrusted
from shared.archive import unpack_tree
from shared.errors import EdgeforgeError, InvalidArgument, ResourceExhausted
from shared.models import bundle
from shared.models.gguf_reader import parse_gguf, read_gguf
from shared.tensors.safetensors_writer import write_safetensors


# ---------------------------------------------------------------- safetensors

def _safetensors(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _refused(path: Path, *words: str, error=InvalidArgument) -> EdgeforgeError:
    with pytest.raises(error) as info:
        untrusted.read_safetensors_header(path)
    for word in words:
        assert word in info.value.message, info.value.message
    return info.value


def test_a_written_file_passes_and_its_layout_is_reported(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a": ((2, 3), "F32"), "empty": ((0, 4), "F16"), "b": ((5,), "I8")},
                      [("a", np.ones((2, 3), np.float32)), ("empty", np.ones((0, 4), np.float16)),
                       ("b", np.arange(5, dtype=np.int8))], metadata={"format": "pt"})
    header = untrusted.read_safetensors_header(path)
    assert header.tensors["a"] == untrusted.SafetensorsEntry("F32", (2, 3), 0, 24)
    assert header.tensors["empty"].begin == header.tensors["empty"].end == 24
    assert header.metadata == {"format": "pt"} and header.data_start + 29 == path.stat().st_size


def test_the_safetensors_package_output_passes(tmp_path):
    from safetensors.numpy import save_file
    save_file({"w": np.zeros((3, 4), np.float32), "bias": np.ones(4, np.float16)}, str(tmp_path / "x.safetensors"))
    assert set(untrusted.read_safetensors_header(tmp_path / "x.safetensors").tensors) == {"w", "bias"}


def test_header_length_two_to_the_63_names_the_file_size(tmp_path):
    path = _safetensors(tmp_path / "model.safetensors", {}, length=2**63)
    error = _refused(path)
    assert error.message == "model.safetensors: header length 9223372036854775808 exceeds the file size 10"
    assert error.code == "INVALID_ARGUMENT" and error.reason == "MALFORMED_MODEL"


@pytest.mark.parametrize("content, words", [
    (b"", ["0 bytes, too short"]), (b"\x02\x00\x00", ["3 bytes, too short"]),
    (struct.pack("<Q", 0), ["header length 0"]), (struct.pack("<Q", 1) + b"{", ["header length 1"]),
    (struct.pack("<Q", 30) + b"{}", ["header length 30 exceeds the file size 10"]),
])
def test_truncated_and_empty_headers(tmp_path, content, words):
    (tmp_path / "t.safetensors").write_bytes(content)
    _refused(tmp_path / "t.safetensors", *words)


def test_a_header_over_the_limit_is_resource_exhausted(tmp_path):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:                            # sparse: no disk used
        f.write(struct.pack("<Q", untrusted.MAX_SAFETENSORS_HEADER_BYTES + 1))
        f.truncate(untrusted.MAX_SAFETENSORS_HEADER_BYTES + 100)
    error = _refused(path, "exceeds the limit of 100000000", error=ResourceExhausted)
    assert error.code == "RESOURCE_EXHAUSTED"


def _one(entry: dict, data: bytes = b"\0" * 8, name: str = "w") -> dict:
    return {name: entry}


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, words", [
    (b"[1, 2]", b"", ["not JSON"]),
    (b'{"w": 1', b"", ["not JSON"]),
    (b"\xff\xfe{}", b"", ["not JSON"]),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", ["nests too deeply"]),
    (b'{"w": {}, "w": {}}', b"", ["duplicate key 'w'"]),
    (b'{"w": ' + b"9" * 5000 + b"}", b"", ["not JSON"]),
    (b"[]", b"", ["must start with '{'"]),
    (_one({**F32_2, "dtype": "F33"}), None, ["unknown dtype 'F33'"]),
    (_one({**F32_2, "shape": [-2]}), None, ["dimension -2"]),
    (_one({**F32_2, "shape": [True, 2]}), None, ["dimension True"]),
    (_one({**F32_2, "shape": [1.5]}), None, ["dimension 1.5"]),
    (_one({**F32_2, "shape": [1] * 9}), None, ["at most 8 dimensions"]),
    (_one({**F32_2, "shape": [2**40, 2**40]}), None, ["more than 2⁶³ − 1"]),
    (_one({**F32_2, "shape": [2**32, 2**31], "data_offsets": [0, 2**65]}), None, ["more than 2⁶³ − 1"]),
    (_one({**F32_2, "shape": [3]}), None, ["F32[3] (12 bytes) but data_offsets [0, 8] hold 8 bytes"]),
    (_one({**F32_2, "data_offsets": [0, 16]}), None, ["fall outside the 8 data bytes"]),
    (_one({**F32_2, "data_offsets": [8, 0]}), None, ["fall outside"]),
    (_one({**F32_2, "data_offsets": [0]}), None, ["are not two integers"]),
    (_one({**F32_2, "extra": 1}), None, ["exactly dtype, shape and data_offsets"]),
    (_one(F32_2, b"\0" * 12), b"\0" * 12, ["cover 8 of the 12 data bytes"]),
    ({"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}}, b"\0" * 12, ["overlaps 'a'"]),
    ({"a": {**F32_2, "shape": [1], "data_offsets": [0, 4]}, "b": {**F32_2, "data_offsets": [8, 16]}}, b"\0" * 16,
     ["leaves a gap after 'a'"]),
    ({"__metadata__": {"k": 1}}, b"", ["__metadata__ must map strings to strings"]),
    (_one(F32_2, name="../../etc/passwd"), None, ["could escape its directory"]),
    (_one(F32_2, name="/abs"), None, ["could escape its directory"]),
    (_one(F32_2, name="a\x00b"), None, ["control character"]),
])
def test_malformed_headers_name_the_problem(tmp_path, header, data, words):
    path = _safetensors(tmp_path / "m.safetensors", header, b"\0" * 8 if data is None else data)
    error = _refused(path, *words)
    assert error.code == "INVALID_ARGUMENT" and error.message.startswith("m.safetensors: ")


def test_the_bundle_reader_and_statistics_go_through_the_checks(tmp_path):
    path = _safetensors(tmp_path / "m.safetensors", {"w": {**F32_2, "shape": [3]}}, b"\0" * 8)
    with pytest.raises(InvalidArgument, match="F32"):
        bundle.stored_tensors(path)
    from services.calibrator.stats_file import CalibrationStats
    with pytest.raises(InvalidArgument, match="not a readable safetensors file") as info:
        CalibrationStats.open(path)
    assert info.value.field == "calibration_stats"


# ---------------------------------------------------------------- NaN / Inf

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_naming_the_tensor(bad):
    values = np.ones((4, 4), np.float32)
    values[2, 3] = bad
    with pytest.raises(InvalidArgument, match="tensor layers.0.w contains 1 NaN or Inf values") as info:
        untrusted.check_finite(values, "layers.0.w")
    assert info.value.code == "INVALID_ARGUMENT"
    untrusted.check_finite(np.array([1, 2], np.int64), "ints")          # integers cannot hold NaN


def test_a_nan_in_calibration_statistics_is_refused_when_read(tmp_path):
    from services.calibrator.stats_file import METADATA_KEY, CalibrationStats
    meta = {"version": 2, "model": "m", "dataset": "d", "samples": 1, "sequence_length": 8, "tokens": 8,
            "sites": {"x": {"weights": ["x.weight"], "in_features": 2, "hessian": False}}}
    arrays = {"x.abs_max": np.ones(2, np.float32), "x.mean_abs": np.ones(2, np.float32),
              "x.sq_mean": np.array([1, np.nan], np.float32), "x.range": np.ones(5, np.float32)}
    write_safetensors(tmp_path / "s.safetensors", {k: (v.shape, "F32") for k, v in arrays.items()}, arrays.items(),
                      metadata={METADATA_KEY: json.dumps(meta)})
    stats = CalibrationStats.open(tmp_path / "s.safetensors")
    assert stats.abs_max("x.weight").tolist() == [1.0, 1.0]
    with pytest.raises(InvalidArgument, match="tensor x.sq_mean contains 1 NaN or Inf"):
        stats.importance("x.weight")


# ---------------------------------------------------------------- GGUF

def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _gguf(kv: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_tensors: int = 0, data: bytes = b"",
          magic: bytes = b"GGUF", version: int = 3, alignment: int = 32) -> bytes:
    head = magic + struct.pack("<IQQ", version, n_tensors, n_kv) + kv + tensors
    return head + b"\0" * (-len(head) % alignment) + data


def _info(name: str, dims: list[int], kind: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    return (_string(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", kind, offset))


def _u32(key: str, value: int, kind: int = 4) -> bytes:
    return _string(key) + struct.pack("<I", kind) + struct.pack("<I" if kind == 4 else "<Q", value)


def _tiny_gguf(path: Path) -> Path:
    import gguf
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("w", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.add_tensor("q", gguf.quants.quantize(np.ones((1, 32), np.float32), gguf.GGMLQuantizationType.Q4_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_py_file_parses_and_reads(tmp_path):
    reader = read_gguf(_tiny_gguf(tmp_path / "tiny.gguf"))
    assert reader.get("tokenizer.ggml.tokens") == ["a", "b", "c"]
    assert reader.tensors["w"].shape == (2, 32) and reader.tensors["q"].nbytes == 18
    assert reader.read("w").view(np.float32).ravel().tolist() == list(range(64))


def test_every_truncation_of_a_valid_gguf_is_refused(tmp_path):
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    end = max(info.offset + info.nbytes for info in read_gguf(path).tensors.values())   # then padding only
    data = path.read_bytes()
    for length in range(end):
        with pytest.raises(InvalidArgument):
            parse_gguf(data[:length], "cut.gguf")


@pytest.mark.parametrize("data, words", [
    (_gguf(magic=b"GGML"), ["magic b'GGML'"]),
    (_gguf(version=1), ["version 1"]), (_gguf(version=4), ["version 4"]),
    (_gguf(n_tensors=2**63), ["claims 9223372036854775808 tensors"]),
    (_gguf(n_kv=2**64 - 1), ["claims 18446744073709551615 keys"]),
    (_gguf(kv=struct.pack("<Q", 2**63) + b"\0" * 16, n_kv=1), ["a key of 9223372036854775808 bytes needs"]),
    (_gguf(kv=_string("k") + struct.pack("<IIQ", 9, 10, 2**62), n_kv=1), ["claims 4611686018427387904 elements"]),
    (_gguf(kv=_string("k") + struct.pack("<I", 13) + b"\0" * 8, n_kv=1), ["unknown value type 13"]),
    (_gguf(kv=_string("k") + struct.pack("<II", 9, 99) + b"\0" * 8, n_kv=1), ["unknown element type 99"]),
    (_gguf(kv=_string("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5 + b"\0" * 64, n_kv=1),
     ["nests more than 4 deep"]),
    (_gguf(kv=_u32("k", 1) * 2, n_kv=2), ["key 'k' appears twice"]),
    (_gguf(kv=_string(b"\xff") + struct.pack("<IB", 0, 0), n_kv=1), ["metadata key"]),
    (_gguf(kv=_u32("general.alignment", 0), n_kv=1), ["general.alignment is 0"]),
    (_gguf(kv=_u32("general.alignment", 24), n_kv=1), ["general.alignment is 24"]),
    (_gguf(kv=_u32("general.alignment", 32, kind=10), n_kv=1), ["(type 10)"]),
    (_gguf(tensors=_info("w", [8], n_dims=5) + b"\0" * 64, n_tensors=1), ["5 dimensions; ggml allows 1 to 4"]),
    (_gguf(tensors=_info("w", [], n_dims=0) + b"\0" * 64, n_tensors=1), ["0 dimensions"]),
    (_gguf(tensors=_info("w", [0, 4]), n_tensors=1, data=b"\0" * 64), ["dimension 0"]),
    (_gguf(tensors=_info("w", [2**32, 2**32]), n_tensors=1, data=b"\0" * 64), ["more than 2⁶³ − 1"]),
    (_gguf(tensors=_info("w", [4], kind=99), n_tensors=1, data=b"\0" * 64), ["unknown ggml type 99"]),
    (_gguf(tensors=_info("w", [16], kind=2), n_tensors=1, data=b"\0" * 64), ["rows of 16 elements", "blocks of 32"]),
    (_gguf(tensors=_info("w", [4], offset=3), n_tensors=1, data=b"\0" * 64), ["offset 3 is not a multiple of"]),
    (_gguf(tensors=_info("w", [64]), n_tensors=1, data=b"\0" * 64), ["lies past the end"]),
    (_gguf(tensors=_info("a", [8]) + _info("b", [8], offset=0), n_tensors=2, data=b"\0" * 64),
     ["overlaps tensor"]),
    (_gguf(tensors=_info("w", [4]) * 2, n_tensors=2, data=b"\0" * 64), ["tensor 'w' appears twice"]),
    (_gguf(tensors=_info("../w", [4]), n_tensors=1, data=b"\0" * 64), ["could escape its directory"]),
])
def test_malformed_gguf_names_the_problem(data, words):
    with pytest.raises(InvalidArgument) as info:
        parse_gguf(data, "bad.gguf")
    for word in words:
        assert word in info.value.message, info.value.message
    assert info.value.code == "INVALID_ARGUMENT" and info.value.message.startswith("bad.gguf")


def test_too_many_keys_for_the_limit_is_resource_exhausted():
    from shared.models import gguf_reader
    count = gguf_reader.MAX_KV + 1
    with pytest.raises(ResourceExhausted, match=f"{count} keys, over the limit"):
        parse_gguf(_gguf(n_kv=count) + b"\0" * (13 * count), "many.gguf")


# ---------------------------------------------------------------- ONNX

def _onnx_model(domain: str = "", location: str | None = None):
    from onnx import TensorProto, helper
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    if location is not None:
        weight.ClearField("float_data")
        weight.data_location = TensorProto.EXTERNAL
        weight.external_data.add(key="location", value=location)
        weight.external_data.add(key="length", value="8")
    node = helper.make_node("Add" if not domain else "Evil", ["x", "w"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [weight])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def test_onnx_a_plain_model_loads(tmp_path):
    import onnx
    onnx.save_model(_onnx_model(), str(tmp_path / "m.onnx"))
    assert untrusted.load_onnx(tmp_path / "m.onnx").graph.node[0].op_type == "Add"


@pytest.mark.parametrize("location, words", [("/etc/passwd", "could escape"), ("../../secret.bin", "could escape"),
                                             ("sub/../../x", "could escape")])
def test_onnx_external_data_that_escapes_is_refused(tmp_path, location, words):
    import onnx
    onnx.save_model(_onnx_model(location=location), str(tmp_path / "m.onnx"))
    with pytest.raises(InvalidArgument, match="keeps its data in an external file"):    # refused by default
        untrusted.load_onnx(tmp_path / "m.onnx")
    with pytest.raises(InvalidArgument, match=words):
        untrusted.load_onnx(tmp_path / "m.onnx", external_data=True)


def test_onnx_custom_domains_and_checker_failures_are_refused(tmp_path):
    import onnx
    onnx.save_model(_onnx_model(domain="com.evil"), str(tmp_path / "custom.onnx"))
    with pytest.raises(InvalidArgument, match="custom operator domain 'com.evil'") as info:
        untrusted.load_onnx(tmp_path / "custom.onnx")
    assert info.value.reason == "UNSUPPORTED_OP"
    broken = _onnx_model()
    broken.graph.node[0].input[1] = "undefined"
    onnx.save_model(broken, str(tmp_path / "broken.onnx"))
    with pytest.raises(InvalidArgument, match="fails onnx.checker"):
        untrusted.load_onnx(tmp_path / "broken.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\xff\xff\xff")
    with pytest.raises(InvalidArgument, match="does not parse"):
        untrusted.load_onnx(tmp_path / "junk.onnx")


def test_onnx_over_the_protobuf_limit_is_resource_exhausted(tmp_path):
    path = tmp_path / "big.onnx"
    with open(path, "wb") as f:
        f.truncate(untrusted.MAX_ONNX_BYTES + 1)              # sparse
    with pytest.raises(ResourceExhausted, match="over the 2147483647-byte protobuf limit"):
        untrusted.load_onnx(path)


# ---------------------------------------------------------------- torch pickles

class _Payload:
    """Unpickling this creates a directory: the observable side effect of code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, suffix):
    import torch

    from shared.models.module_import import import_source
    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    torch.save({"features.0.0.weight": torch.zeros(1), "evil": _Payload(marker)}, path)
    with pytest.raises(InvalidArgument, match="weights_only=True"):
        untrusted.torch_load_weights(path)
    with pytest.raises(InvalidArgument, match="weights_only=True") as info:
        import_source(path, tmp_path / "out", None)
    assert info.value.reason == "UNKNOWN_MODEL_FORMAT"
    assert not marker.exists() and not (tmp_path / "out").exists()


def _exported_program(path: Path) -> Path:
    import torch
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    torch.export.save(program, str(path))
    return path


def _replace_member(path: Path, suffix: str, content: bytes) -> None:
    with zipfile.ZipFile(path) as source:
        members = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w") as out:
        for info, data in members:
            out.writestr(info, content if info.filename.endswith(suffix) else data)


def test_a_pt2_whose_sample_inputs_run_code_is_refused(tmp_path):
    """torch.export.load retries a failed weights_only load with weights_only=False; forced off."""
    import torch
    marker = tmp_path / "pwned"
    path = _exported_program(tmp_path / "m.pt2")
    assert untrusted.load_exported_program(path) is not None             # the untouched file loads
    buffer = io.BytesIO()
    torch.save((_Payload(marker),), buffer)
    _replace_member(path, "data/sample_inputs/model.pt", buffer.getvalue())
    with pytest.raises(InvalidArgument, match="reads safely") as info:
        untrusted.load_exported_program(path)
    assert info.value.reason == "UNKNOWN_MODEL_FORMAT" and not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None     # restored


@pytest.mark.parametrize("prefix", ["opaque_obj_", "custom_obj_"])
def test_a_pt2_with_pickled_constants_is_refused_unopened(tmp_path, prefix):
    path = _exported_program(tmp_path / "m.pt2")
    config = {"config": {"c": {"path_name": f"{prefix}0", "is_param": False, "use_pickle": True}}}
    _replace_member(path, "_constants_config.json", json.dumps(config).encode())
    with pytest.raises(InvalidArgument, match="pickled Python object") as info:
        untrusted.check_exported_program_archive(path, "m.pt2")
    assert info.value.reason == "UNSUPPORTED_OP"


# ---------------------------------------------------------------- archives

def _tar(path: Path, members: list[tuple[str, bytes | int, bytes]]) -> Path:
    """members: (name, tar type, content)."""
    with tarfile.open(path, "w") as tar:
        for name, kind, content in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            info.size = len(content) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize("members, words", [
    ([("pkg/a", tarfile.REGTYPE, b"x"), ("pkg/a", tarfile.REGTYPE, b"y")], "appears twice"),
    ([("pkg/a", tarfile.REGTYPE, b"x"), ("pkg/a/b", tarfile.REGTYPE, b"y")], "clashes"),
    ([("pkg/./a", tarfile.REGTYPE, b"x")], "'.' component"),
    ([("pkg/hard", tarfile.LNKTYPE, b"")], "is a hard link"),
    ([("pkg/fifo", tarfile.FIFOTYPE, b"")], "is a FIFO"),
    ([("pkg/blk", tarfile.BLKTYPE, b"")], "is a device"),
    ([("C:/windows", tarfile.REGTYPE, b"x")], "could escape"),
])
def test_hostile_archive_members_are_refused(tmp_path, members, words):
    path = _tar(tmp_path / "a.tar", members)
    with pytest.raises(InvalidArgument, match=words) as info:
        unpack_tree(path, tmp_path / "out")
    assert info.value.reason == "MALFORMED_ARTIFACT" and not (tmp_path / "out").exists()


def test_a_member_claiming_more_bytes_than_the_archive_is_refused_before_extraction(tmp_path):
    path = tmp_path / "claim.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("config.json")
        info.size = 10 << 30                                  # a claimed 10 GiB, no data behind it
        tar.addfile(info)
    with pytest.raises(InvalidArgument, match="members claim 10737418240 bytes"):
        bundle.unpack(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, kind", [("../config.json", tarfile.REGTYPE), ("config.json", tarfile.SYMTYPE),
                                        ("config.json", tarfile.CHRTYPE)])
def test_model_bundles_refuse_paths_links_and_devices(tmp_path, name, kind):
    path = _tar(tmp_path / "b.tar", [(name, kind, b"{}")])
    with pytest.raises(InvalidArgument, match="refused"):
        bundle.unpack(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
