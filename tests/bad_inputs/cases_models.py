"""Bad model files through Compressor.ImportModel: every parser (safetensors in a bundle, GGUF, ONNX, torch
.pth and .pt2, module bundles), each file a valid one damaged in one way (specimens.py)."""
from __future__ import annotations

import math
import struct

import specimens as s
from corpus import Case

from edgeforge.v1 import common_pb2, compressor_pb2

IMAGE = common_pb2.MODEL_TASK_IMAGE_CLASSIFICATION
EMBED_BYTES = s.TINY.vocab_size * s.TINY.hidden_size * 4
MALFORMED = r"MALFORMED|malformed"


def _import(name: str, make, code: str, message: str, *, task: int = 0, finding: str = "", hazard: str = "",
            check=None) -> Case:
    """ImportModel of the file `make(env)` returns (bytes), uploaded as a source model first."""
    def prepare(env):
        return env.put(make(env), display_name=name)
    return Case(name, "Compressor.ImportModel",
                lambda env, source: compressor_pb2.ImportModelRequest(source=source, task=task),
                code, message, prepare=prepare, finding=finding, hazard=hazard, check=check)


def _gguf(env, **options) -> bytes:
    return env.once(f"gguf-{sorted(options.items())}", lambda: s.gguf_bytes(env.scratch, **options))


def _module(env):
    return env.once("module-dir", lambda: s.module_dir(env.scratch))


def _module_bundle(edit=None, links=None):
    return lambda env: s.module_bundle(_module(env), edit, links)


def _set_header_field(tensor: str, key: str, value):
    def edit(header):
        header[tensor][key] = value
    return lambda env: s.decoder_bundle(s.with_header(edit))


def _payload_marker(env):
    return env.scratch / "pickle-ran"


def _no_pickle_ran(env, source) -> None:
    assert not _payload_marker(env).exists(), "torch.load ran pickled code from an uploaded file"


def _manifest(edit):
    def change(members):
        import json
        manifest = json.loads(members["edgeforge-module.json"])
        edit(manifest)
        members["edgeforge-module.json"] = json.dumps(manifest).encode()
    return change


def _module_weight(value):
    def change(members):
        from safetensors.numpy import load, save
        tensors = load(members["model.safetensors"])
        name = sorted(n for n in tensors if n.endswith("weight") and tensors[n].ndim > 1)[0]
        tensors[name] = tensors[name].copy()
        tensors[name].flat[0] = value
        members["model.safetensors"] = save(tensors)
    return change


def _onnx_weight(edit):
    def change(model):
        edit(model.graph.initializer[0])
    return lambda env: s.onnx_bytes(change)


CASES = [
    # ---- safetensors inside a decoder bundle
    _import("safetensors_truncated", lambda env: s.decoder_bundle(s.safetensors_bytes(s.tiny_tensors())[:-1000]),
            "INVALID_ARGUMENT", r"data_offsets .* fall outside|ends inside"),
    _import("safetensors_header_length_2_63",
            lambda env: s.decoder_bundle(struct.pack("<Q", 2 ** 63) + s.safetensors_bytes(s.tiny_tensors())[8:]),
            "INVALID_ARGUMENT", r"header.* 9223372036854775808"),
    _import("safetensors_header_not_json",
            lambda env: s.decoder_bundle(struct.pack("<Q", 8) + b"{\"a\": \xff" + b"\0" * 64),
            "INVALID_ARGUMENT", r"header is not JSON"),
    _import("safetensors_header_is_a_list",
            lambda env: s.decoder_bundle(struct.pack("<Q", 8) + b"[1, 2] " + b" " + b"\0" * 64),
            "INVALID_ARGUMENT", r"header is (not JSON|a JSON list)"),
    _import("safetensors_dimension_negative", _set_header_field(s.EMBED, "shape", [-256, -16]),
            "INVALID_ARGUMENT", r"tensor 'model.embed_tokens.weight'.* shape \[-256, -16\]"),
    _import("safetensors_dimension_zero", _set_header_field(s.EMBED, "shape", [0, 16]),
            "INVALID_ARGUMENT", r"model.embed_tokens.weight"),
    _import("safetensors_dimensions_overflow_int64", _set_header_field(s.EMBED, "shape", [2 ** 62, 2 ** 62, 4]),
            "INVALID_ARGUMENT", r"model.embed_tokens.weight"),
    _import("safetensors_dtype_size_mismatch", _set_header_field(s.EMBED, "dtype", "F16"),
            "INVALID_ARGUMENT", rf"tensor 'model.embed_tokens.weight' is F16\[256, 16\].* {EMBED_BYTES} bytes"),
    _import("safetensors_dtype_unknown", _set_header_field(s.EMBED, "dtype", "F128"),
            "INVALID_ARGUMENT", r"tensor 'model.embed_tokens.weight' has .* dtype 'F128'"),
    _import("safetensors_offsets_past_end", _set_header_field(s.EMBED, "data_offsets", [0, 2 ** 40]),
            "INVALID_ARGUMENT", r"data_offsets \[0, 1099511627776\] fall outside"),
    _import("safetensors_offsets_reversed", _set_header_field(s.EMBED, "data_offsets", [EMBED_BYTES, 0]),
            "INVALID_ARGUMENT", r"data_offsets .* fall outside"),
    _import("safetensors_nan_weight", lambda env: s.decoder_bundle(s.poisoned(math.nan)),
            "INVALID_ARGUMENT", r"tensor model.layers.0.mlp.up_proj.weight contains .*NaN or Inf"),
    _import("safetensors_inf_weight", lambda env: s.decoder_bundle(s.poisoned(math.inf)),
            "INVALID_ARGUMENT", r"tensor model.layers.0.mlp.up_proj.weight contains .*NaN or Inf"),
    _import("safetensors_tensor_missing",
            lambda env: s.decoder_bundle(s.safetensors_bytes({k: v for k, v in s.tiny_tensors().items()
                                                              if "up_proj" not in k})),
            "INVALID_ARGUMENT", r"model lacks 1 tensors config.json requires, e.g. model.layers.0.mlp.up_proj.weight"),
    _import("safetensors_dtype_int", lambda env: s.decoder_bundle(s.safetensors_bytes(
        {k: v.astype("int32") for k, v in s.tiny_tensors().items()})),
            "INVALID_ARGUMENT", r"dtype I32; only F32, F16 and BF16"),
    # ---- the bundle itself
    _import("bundle_member_escapes", lambda env: s.decoder_bundle(extra={"../evil.json": b"{}"}),
            "INVALID_ARGUMENT", r"member '\.\./evil\.json' is not a plain file with a simple name"),
    _import("bundle_member_symlink", lambda env: s.decoder_bundle(links={"tokenizer.json": "/etc/passwd"}),
            "INVALID_ARGUMENT", r"member 'tokenizer\.json' is not a plain file"),
    _import("bundle_config_not_json", lambda env: s.tar_bytes({"config.json": b"{not json",
                                                               "model.safetensors": s.safetensors_bytes(s.tiny_tensors())}),
            "INVALID_ARGUMENT", r"config.json"),
    _import("bundle_config_hidden_size_negative",
            lambda env: s.decoder_bundle(config={**s.TINY.to_hf(), "hidden_size": -16}),
            "INVALID_ARGUMENT", r"hidden_size"),
    _import("bundle_config_layers_huge",
            lambda env: s.decoder_bundle(config={**s.TINY.to_hf(), "num_hidden_layers": 10 ** 12}),
            "INVALID_ARGUMENT", r"num_hidden_layers"),
    _import("bundle_truncated_tar", lambda env: s.decoder_bundle()[:3000],
            "INVALID_ARGUMENT", r"tar|bundle"),
    # ---- GGUF
    _import("gguf_wrong_magic", lambda env: b"GGUX" + _gguf(env)[4:],
            "INVALID_ARGUMENT", r"not a model edgeforge imports: expected a GGUF file"),
    _import("gguf_truncated", lambda env: _gguf(env)[:len(_gguf(env)) // 2],
            "INVALID_ARGUMENT", r"(lies|ends) past the end of the \d+-byte file|not a readable GGUF"),
    _import("gguf_version_unknown", lambda env: s.patch(_gguf(env), 4, "<I", 99),
            "INVALID_ARGUMENT", r"version 99"),
    _import("gguf_tensor_count_2_63", lambda env: s.patch(_gguf(env), 8, "<Q", 2 ** 63),
            "INVALID_ARGUMENT", r"9223372036854775808 tensors"),
    _import("gguf_metadata_count_2_63", lambda env: s.patch(_gguf(env), 16, "<Q", 2 ** 63),
            "INVALID_ARGUMENT", r"9223372036854775808 keys"),
    _import("gguf_string_length_2_63", lambda env: s.patch(_gguf(env), 24, "<Q", 2 ** 63),
            "INVALID_ARGUMENT", r"9223372036854775808 bytes.* past the end"),
    _import("gguf_dims_count_huge", lambda env: s.patch(_gguf(env), s.gguf_tensor_info(_gguf(env)), "<I", 2 ** 31),
            "INVALID_ARGUMENT", r"tensor 'token_embd.weight' has 2147483648 dimensions"),
    _import("gguf_dimension_zero", lambda env: s.gguf_dims(_gguf(env), (16, 0)),
            "INVALID_ARGUMENT", r"token_embd.weight"),
    _import("gguf_dimensions_overflow_int64", lambda env: s.gguf_dims(_gguf(env), (2 ** 62, 2 ** 62)),
            "INVALID_ARGUMENT", r"token_embd.weight"),
    _import("gguf_dimension_2_63", lambda env: s.gguf_dims(_gguf(env), (16, 2 ** 63)),
            "INVALID_ARGUMENT", r"token_embd.weight"),
    _import("gguf_tensor_type_unknown", lambda env: s.gguf_type(_gguf(env), 999),
            "INVALID_ARGUMENT", r"tensor 'token_embd.weight' .*type 999"),
    _import("gguf_dtype_size_mismatch", lambda env: s.gguf_type(_gguf(env), 1),    # F16 claims half the bytes
            "INVALID_ARGUMENT", r"token_embd.weight"),
    _import("gguf_nan_weight", lambda env: _gguf(env, poison=math.nan),
            "INVALID_ARGUMENT", r"blk.0.ffn_up.weight contains .*NaN or Inf"),
    _import("gguf_inf_weight", lambda env: _gguf(env, poison=-math.inf),
            "INVALID_ARGUMENT", r"blk.0.ffn_up.weight contains .*NaN or Inf"),
    _import("gguf_architecture_unknown", lambda env: _gguf(env, arch="gpt2"),
            "INVALID_ARGUMENT", r"GGUF architecture 'gpt2' is not supported"),
    _import("gguf_task_image", lambda env: _gguf(env), "INVALID_ARGUMENT", r"is a causal LM; task", task=IMAGE),
    # ---- ONNX
    _import("onnx_truncated", lambda env: s.onnx_bytes()[:-40], "INVALID_ARGUMENT",
            r"starts like an ONNX model but does not parse", task=IMAGE),
    _import("onnx_without_task", lambda env: s.onnx_bytes(), "INVALID_ARGUMENT",
            r"an ONNX file does not say what it computes: task is required"),
    _import("onnx_external_data", _onnx_weight(lambda w: (w.ClearField("raw_data"), setattr(
        w, "data_location", 1), w.external_data.add(key="location", value="../../../../etc/passwd"))),
            "INVALID_ARGUMENT", r"tensor 'W' keeps its data in an external file", task=IMAGE),
    _import("onnx_weight_dims_negative", _onnx_weight(lambda w: (w.ClearField("dims"), w.dims.extend([-16, 3]))),
            "INVALID_ARGUMENT", r"W|onnx", task=IMAGE),
    _import("onnx_weight_size_mismatch", _onnx_weight(lambda w: setattr(w, "raw_data", w.raw_data[:-4])),
            "INVALID_ARGUMENT", r"W|onnx", task=IMAGE),
    _import("onnx_nan_weight", _onnx_weight(lambda w: setattr(w, "raw_data", struct.pack("<f", math.nan)
                                                              + w.raw_data[4:])),
            "INVALID_ARGUMENT", r"tensor W contains 1 NaN or Inf values", task=IMAGE),
    _import("onnx_task_unknown_enum", lambda env: s.onnx_bytes(), "INVALID_ARGUMENT", r"task", task=42),
    # ---- torch
    _import("torch_pickle_payload", lambda env: s.torch_bytes({"features.0.0.weight": s.Payload(_payload_marker(env))}),
            "INVALID_ARGUMENT", r"torch.load\(weights_only=True\) (refuses|cannot read)", check=_no_pickle_ran),
    _import("torch_state_dict_not_mobilenet", lambda env: s.torch_bytes({"weight": __import__("torch").zeros(2, 2)}),
            "INVALID_ARGUMENT", r"not a torchvision MobileNetV2 state dict"),
    _import("torch_truncated", lambda env: s.torch_bytes({"weight": __import__("torch").zeros(64, 64)})[:-200],
            "INVALID_ARGUMENT", r"not a model edgeforge imports|cannot read"),
    _import("pt2_truncated", lambda env: s.exported_program_bytes()[:-300],
            "INVALID_ARGUMENT", r"ExportedProgram|torch", task=IMAGE),
    _import("pt2_garbage_program", lambda env: s.exported_program_bytes(b"\x00garbage"),
            "INVALID_ARGUMENT", r"ExportedProgram", task=IMAGE),
    _import("pt2_without_task", lambda env: s.exported_program_bytes(),
            "INVALID_ARGUMENT", r"an ExportedProgram does not say what it computes"),
    # ---- module bundles
    _import("module_manifest_not_json", _module_bundle(lambda m: m.update({"edgeforge-module.json": b"{"})),
            "INVALID_ARGUMENT", r"edgeforge-module.json is not JSON"),
    _import("module_architecture_unknown", _module_bundle(_manifest(lambda m: m.update(architecture="resnet1000"))),
            "INVALID_ARGUMENT", r"architecture is 'resnet1000'"),
    _import("module_weights_nan", _module_bundle(_module_weight(math.nan)),
            "INVALID_ARGUMENT", r"contains NaN or Inf"),
    _import("module_weights_truncated", _module_bundle(lambda m: m.update(
        {"model.safetensors": m["model.safetensors"][:-100]})), "INVALID_ARGUMENT", r"model.safetensors|data_offsets"),
    _import("module_member_escapes", _module_bundle(lambda m: m.update({"../../x.json": b"{}"})),
            "INVALID_ARGUMENT", r"member '\.\./\.\./x\.json'"),
    _import("module_task_mismatch", _module_bundle(), "INVALID_ARGUMENT", r"is a image_classification module; task",
            task=common_pb2.MODEL_TASK_TEXT_EMBEDDING),
]
