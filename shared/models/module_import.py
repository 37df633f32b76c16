"""Importing image classifiers and encoders into module bundles (shared/models/modules.py): ONNX files,
torch ExportedPrograms (.pt2), HF BERT directories and torchvision MobileNetV2 state dicts, each judged
by its content, not its name."""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from shared import untrusted
from shared.errors import FailedPrecondition, InvalidArgument
from shared.models.modules import (ADDED_TOKENIZER, BERT_CONFIG, DEFAULT_IMAGE_SIZE, DEFAULT_MAX_TOKENS, IMAGE_TASK,
                                   PROGRAM, TASKS, TEXT_INPUTS, TEXT_TASK, TOKENIZER_FILES, WEIGHTS, ModuleDir,
                                   _assign, _malformed, _program_inputs, _read_json, _read_program, _unknown,
                                   write_module_dir)
from shared.store.blobs import sha256_file

_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"   # torch.save before 1.6

def import_source(path: Path, out_dir: Path, task: str | None) -> ModuleDir | None:
    """A module directory at `out_dir` from an ONNX file, a torch ExportedProgram (.pt2), an unpacked HF
    BERT directory or a torchvision MobileNetV2 state dict (.pth), judged by content; None when `path`
    is none of these (a decoder directory, a GGUF file). `task` is required for ONNX and .pt2."""
    path = Path(path)
    if task is not None and task not in TASKS:
        raise InvalidArgument(f"task {task!r} is not a module task (expected {' or '.join(TASKS)})", field="task")
    if path.is_dir():
        config = path / BERT_CONFIG
        if config.is_file() and isinstance(raw := _read_json(config), dict) and raw.get("model_type") == "bert":
            return _import_bert(path, out_dir, task, raw)
        return None
    kind = _sniff(path)
    if kind is None:
        return None
    if kind == "state_dict":
        return _import_state_dict(path, out_dir, task)
    if task is None:
        what = "an ONNX file" if kind == "onnx" else "an ExportedProgram"
        raise InvalidArgument(f"{what} does not say what it computes: task is required ({' or '.join(TASKS)})",
                              field="task")
    source = {"format": kind, "file": path.name, "sha256": sha256_file(path)}
    if kind == "onnx":
        return _import_onnx(path, out_dir, task, source)
    return _import_program(path, out_dir, task, source)


def _sniff(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:       # is_zipfile only looks for the end record
            raise _unknown(f"{path.name} looks like a zip archive but does not open: {error}") from error
        if any(n.endswith("/archive_format") for n in names):                 # torch.export.save
            return "exported_program"
        if any(n.endswith("/data.pkl") for n in names):                       # torch.save
            return "state_dict"
        return None
    if head == _LEGACY_TORCH_MAGIC:
        return "state_dict"
    # ONNX ModelProto serialises field 1 (ir_version, a varint) first: tag byte 0x08.
    return "onnx" if head[:1] == b"\x08" else None


def _check_task(task: str | None, expected: str, what: str) -> str:
    if task not in (None, expected):
        raise InvalidArgument(f"{what} is a {expected} model; task {task} does not fit", field="task")
    return expected


def _import_bert(path: Path, out_dir: Path, task: str | None, raw: dict) -> ModuleDir:
    from safetensors.torch import load_file

    from shared.models.encoder import BertConfig, SentenceEncoder
    task = _check_task(task, TEXT_TASK, "a BERT encoder")
    for name in (WEIGHTS, "tokenizer.json"):
        if not (path / name).is_file():
            raise _unknown(f"the BERT directory has no {name} (only single-file safetensors weights are read)")
    model = SentenceEncoder(BertConfig.from_hf(raw))
    untrusted.read_safetensors_header(path / WEIGHTS)
    state = {k.removeprefix("bert."): v for k, v in load_file(str(path / WEIGHTS)).items()}
    _assign(model, {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"},
            f"{WEIGHTS} of the BERT directory")
    sentence = path / "sentence_bert_config.json"
    max_tokens = _read_json(sentence).get("max_seq_length", DEFAULT_MAX_TOKENS) if sentence.is_file() \
        else DEFAULT_MAX_TOKENS
    files = {name: path / name for name in (BERT_CONFIG, *TOKENIZER_FILES) if (path / name).is_file()}
    return write_module_dir(model, out_dir, architecture="bert", task=task,
                            input={"text": {"max_tokens": min(int(max_tokens), model.config.max_position_embeddings)},
                                   "names": ["input_ids", "attention_mask"]},
                            source={"format": "hf_bert", "name_or_path": raw.get("_name_or_path", path.name)},
                            files=files, check=True)


def _import_state_dict(path: Path, out_dir: Path, task: str | None) -> ModuleDir:
    from shared.models.vision import SETTINGS, MobileNetV2
    state = untrusted.torch_load_weights(path)                               # no pickled code runs
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
            and {"features.0.0.weight", "classifier.1.weight"} <= set(state)):
        raise _unknown("a torch checkpoint, but not a torchvision MobileNetV2 state dict (features.0.0.weight, "
                       "classifier.1.weight); export other torch models as an ExportedProgram (.pt2)")
    task = _check_task(task, IMAGE_TASK, "a MobileNetV2")
    expansions = [expand for expand, _, repeats, _ in SETTINGS for _ in range(repeats)]
    depthwise = [f"features.{i}.conv.{0 if expand == 1 else 1}.0.weight" for i, expand in enumerate(expansions, 1)]
    if missing := [k for k in depthwise if k not in state]:
        raise _malformed(f"the MobileNetV2 state dict lacks {missing[0]}")
    model = MobileNetV2(classes=state["classifier.1.weight"].shape[0], hidden=[state[k].shape[0] for k in depthwise])
    _assign(model, dict(state), "the MobileNetV2 state dict")
    return write_module_dir(model.eval(), out_dir, architecture="mobilenet_v2", task=task,
                            input={"image": {"channels": 3, "size": 224, **_imagenet()}, "names": ["images"]},
                            source={"format": "torchvision_state_dict", "file": path.name, "sha256": sha256_file(path)},
                            check=True)


def _import_onnx(path: Path, out_dir: Path, task: str, source: dict) -> ModuleDir:
    import onnx
    model = untrusted.load_onnx(path)        # size, no external data, standard domains, onnx.checker
    initializers = {t.name: t for t in model.graph.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    for name, tensor in initializers.items():         # NaN/Inf weights would spread through every quantizer
        if tensor.data_type in floats:
            untrusted.check_finite(onnx.numpy_helper.to_array(tensor), name, path.name)
    inputs = [(i.name, [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim],
               torch.float32 if i.type.tensor_type.elem_type in floats else torch.int64)
              for i in model.graph.input if i.name not in initializers]
    vocab = next((initializers[n.input[0]].dims[0] for n in model.graph.node if n.op_type == "Gather"
                  and list(n.input[1:2]) == ["input_ids"] and n.input[0] in initializers), None)
    spec, files = _input_spec(task, inputs, vocab)
    if files:
        source["tokenizer"] = ADDED_TOKENIZER
    source.update(opset=max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
                  producer=f"{model.producer_name} {model.producer_version}".strip())
    return write_module_dir(model, out_dir, architecture="onnx", task=task, input=spec, source=source, structure={},
                            files=files, check=True)


def _import_program(path: Path, out_dir: Path, task: str, source: dict) -> ModuleDir:
    program = _read_program(path)
    vocab = next((v.shape[0] for k, v in program.state_dict.items() if k.endswith("word_embeddings.weight")), None)
    spec, files = _input_spec(task, _program_inputs(program), vocab)
    if files:
        source["tokenizer"] = ADDED_TOKENIZER
    return write_module_dir(None, out_dir, architecture="exported_program", task=task, input=spec, source=source,
                            structure={}, files={PROGRAM: path, **files}, check=True)


def _imagenet() -> dict[str, list[float]]:
    from shared.models.vision import MEAN, STD
    return {"mean": [round(float(v), 6) for v in MEAN], "std": [round(float(v), 6) for v in STD]}


def _input_spec(task: str, inputs: list[tuple[str, list[int | None], torch.dtype]],
                vocab: int | None) -> tuple[dict, dict[str, Path]]:
    """The manifest's input entry for a graph's inputs, and the files it needs (a tokenizer)."""
    described = ", ".join(f"{name} {str(dtype).removeprefix('torch.')} {['?' if d is None else d for d in shape]}"
                          for name, shape, dtype in inputs)
    if task == IMAGE_TASK:
        if len(inputs) != 1 or len(inputs[0][1]) != 4 or not inputs[0][2].is_floating_point:
            raise InvalidArgument(f"an image classifier takes one float (N, C, H, W) input; this model takes "
                                  f"{described}", field="task")
        name, (_, c, h, w), _ = inputs[0]
        layout, channels, (height, width) = ("NCHW", c, (h, w)) if c in (1, 3) else ("NHWC", w, (c, h))
        if channels not in (1, 3) or height != width:
            raise FailedPrecondition(f"image input {name} {['?' if d is None else d for d in inputs[0][1]]}: "
                                     "expected 1 or 3 channels and a square image", reason="UNSUPPORTED_ARCH",
                                     field="model")
        normalisation = _imagenet() if channels == 3 else {"mean": [0.0], "std": [1.0]}    # ImageNet's, or [0, 1]
        image = {"channels": channels, "size": height or DEFAULT_IMAGE_SIZE, **normalisation}
        return {"image": {**image, **({"layout": layout} if layout == "NHWC" else {})}, "names": [name]}, {}
    names = [name for name, _, _ in inputs]
    if not ({"input_ids", "attention_mask"} <= set(names) <= set(TEXT_INPUTS)) or \
            any(len(shape) != 2 or dtype.is_floating_point for _, shape, dtype in inputs):
        raise InvalidArgument(f"a text encoder takes integer (N, T) inputs input_ids and attention_mask (and "
                              f"optionally token_type_ids); this model takes {described}", field="task")
    return _text_spec(names, inputs[names.index("input_ids")][1][1], vocab)


def _text_spec(names: list[str], length: int | None, vocab: int | None) -> tuple[dict, dict[str, Path]]:
    """A graph without a tokenizer gets the BERT uncased WordPiece vocabulary of all-MiniLM-L6-v2 (the
    vocabulary of the BERT/MiniLM family), after checking that its size matches the embedding table."""
    from tokenizers import Tokenizer

    from shared.models.encoder import minilm_dir
    directory = minilm_dir()
    size = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    if vocab is not None and vocab != size:
        raise FailedPrecondition(f"the model's token embedding has {vocab} rows, edgeforge's WordPiece tokenizer "
                                 f"{size}: upload a module bundle with the model's own tokenizer.json",
                                 reason="UNSUPPORTED_ARCH", field="model")
    text = {"max_tokens": length or DEFAULT_MAX_TOKENS, **({"length": length} if length else {})}
    files = {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}
    return {"text": text, "names": names}, files
