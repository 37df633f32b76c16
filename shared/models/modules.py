"""Module bundles: image classifiers and text encoders carried as one artifact (issue 6).

A module directory holds `edgeforge-module.json` (MANIFEST) beside its family's files:
  mobilenet_v2, small_cnn   model.safetensors — the torch state dict, float32
  bert                      model.safetensors, config.json (HF BertConfig), tokenizer.json (+ vocab.txt …)
  exported_program          program.pt2 (torch.export.save); model.safetensors overrides its parameters
                            once a transform changed them
  onnx                      model.onnx — no torch module: evaluation, export to ONNX, weight grids and
                            magnitude/N:M pruning of its initializers only
The manifest:
  {"format": "edgeforge-module", "version": 1, "task": "image_classification" | "text_embedding",
   "architecture": one of ARCHITECTURES, "structure": {constructor kwargs, from .structure()},
   "input": {"image": {"channels", "size", "mean", "std"[, "layout": "NCHW" | "NHWC"]}
             | "text": {"max_tokens"[, "length": a fixed token count]},
             "names": [the model's input names, in call order]},
   "source": {provenance of the import}, "history": [one note per transform since] (optional)}
Text models (bert, and ONNX / ExportedProgram encoders, which get a WordPiece tokenizer at import) carry
tokenizer.json; their inputs are named from input_ids, attention_mask, token_type_ids.

MobileNetV2's BatchNorm is folded into the convolutions whenever a model enters a bundle (import and
save): the weights in a bundle are the weights a runtime runs, so a grid that QAT or the exporter puts
them on survives export bit for bit, and a transform never has BatchNorm statistics to keep in step.

The bundle is a flat, deterministic tar like bundle.pack's decoder bundles, with the same member rules
(plain files, simple names) plus .onnx and .pt2 members, and no config.json requirement.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared import untrusted
from shared.errors import FailedPrecondition, InvalidArgument
from shared.models import bundle
from shared.models.module_data import Samples, fit_image

MANIFEST = "edgeforge-module.json"
FORMAT, VERSION = "edgeforge-module", 1
IMAGE_TASK, TEXT_TASK = "image_classification", "text_embedding"
TASKS = (IMAGE_TASK, TEXT_TASK)
ARCHITECTURES = ("mobilenet_v2", "small_cnn", "bert", "exported_program", "onnx")
MEDIA_TYPE = "application/x-edgeforge-module+tar"
WEIGHTS, PROGRAM, ONNX_MODEL, BERT_CONFIG = "model.safetensors", "program.pt2", "model.onnx", "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
REQUIRED_FILES = {"mobilenet_v2": (WEIGHTS,), "small_cnn": (WEIGHTS,), "bert": (WEIGHTS, BERT_CONFIG, "tokenizer.json"),
                  "exported_program": (PROGRAM,), "onnx": (ONNX_MODEL,)}
MANIFEST_KEYS = ("format", "version", "task", "architecture", "structure", "input", "source")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = {IMAGE_TASK: "logits", TEXT_TASK: "embeddings"}
DEFAULT_MAX_TOKENS = 128             # tokens per sentence when the model does not say (EncoderTokenizer's default)
DEFAULT_IMAGE_SIZE = 224             # pixels per side of an image input whose size is dynamic
ADDED_TOKENIZER = "all-MiniLM-L6-v2's WordPiece (BERT uncased vocabulary), added at import"
EXAMPLE_BATCH = 2                    # example inputs hold two samples, so exporters keep the batch dynamic
_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".onnx", ".pt2")


def _unknown(message: str, field: str = "model") -> InvalidArgument:
    return InvalidArgument(message, reason="UNKNOWN_MODEL_FORMAT", field=field)


def _malformed(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="MALFORMED_MODEL", field="model")


@dataclasses.dataclass
class LoadedModule:
    """A bundle's torch module (CPU, float32, eval mode — an ExportedProgram's graph keeps the mode it
    was exported in and refuses .eval()/.train()) and how to call and export it."""
    module: nn.Module
    task: str
    architecture: str
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def is_module_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class ModuleDir:
    """An unpacked module bundle; the manifest and the family's files are checked on opening."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.task: str = self.manifest["task"]
        self.architecture: str = self.manifest["architecture"]
        self.structure: dict = self.manifest["structure"]
        self.input: dict = self.manifest["input"]
        self.source: dict = self.manifest["source"]
        self._tokenizer = None
        for name in REQUIRED_FILES[self.architecture]:
            if not (self.path / name).is_file():
                raise _unknown(f"{self.architecture} module {self.path.name} lacks {name}")

    @property
    def input_names(self) -> list[str]:
        return list(self.input["names"])

    def load(self) -> LoadedModule:
        if self.architecture == "onnx":
            raise FailedPrecondition("an ONNX module has no torch module: it can be evaluated, exported to ONNX, "
                                     "quantized on a weight grid and magnitude/N:M pruned, not trained or "
                                     "structurally pruned", reason="UNSUPPORTED_ARCH", field="model")
        if self.architecture == "exported_program":
            program = _read_program(self.path / PROGRAM)
            module = program.module()
            if (self.path / WEIGHTS).is_file():
                _load_weights(module, self.path / WEIGHTS, self.architecture)
            example = tuple(program.example_inputs[0]) if program.example_inputs else \
                tuple(_synthetic_input(shape, dtype) for _, shape, dtype in _program_inputs(program))
            dynamic = {name: {i: _axis_name(i) for i, size in enumerate(shape) if size is None}
                       for name, shape, _ in _program_inputs(program)}
        else:
            module = self._build()
            _load_weights(module, self.path / WEIGHTS, self.architecture)
            module.eval()
            example = self._example_inputs()
            dynamic = {name: {0: "batch", 1: "tokens"} if self.task == TEXT_TASK else {0: "batch"}
                       for name in self.input_names}
        output = OUTPUT_NAMES[self.task]
        dynamic = {name: axes for name, axes in dynamic.items() if axes}
        if any(0 in axes for axes in dynamic.values()):
            dynamic[output] = {0: "batch"}
        return LoadedModule(module, self.task, self.architecture, example, self.input_names, [output], dynamic)

    def _build(self) -> nn.Module:
        try:
            if self.architecture == "mobilenet_v2":
                from shared.models.vision import MobileNetV2, fold_batchnorm
                with torch.no_grad():
                    return fold_batchnorm(MobileNetV2(**self.structure))        # bundles hold folded weights
            if self.architecture == "small_cnn":
                from shared.models.cnn import SmallCNN
                return SmallCNN(**self.structure)
            from shared.models.encoder import BertConfig, SentenceEncoder
            return SentenceEncoder(BertConfig.from_hf(_read_json(self.path / BERT_CONFIG)), **self.structure)
        except (TypeError, ValueError) as error:
            raise _unknown(f"{MANIFEST} structure {json.dumps(self.structure)[:200]} does not build a "
                           f"{self.architecture}: {error}") from error
        except InvalidArgument as error:
            raise _unknown(f"{MANIFEST} structure does not build a {self.architecture}: {error.message}") from error

    def _example_inputs(self) -> tuple[torch.Tensor, ...]:
        if self.task == TEXT_TASK:
            from shared.models.encoder import VALIDATION_SENTENCES
            inputs = self.prepare(Samples(sentences=list(VALIDATION_SENTENCES[:EXAMPLE_BATCH])))
            return tuple(torch.from_numpy(inputs[name]) for name in self.input_names)
        image = self.input["image"]
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(EXAMPLE_BATCH, image["channels"], image["size"], image["size"], generator=generator),)

    def tokenizer(self):
        """The model's WordPiece tokenizer (text models), read once."""
        from shared.models.encoder import EncoderTokenizer
        if self.task != TEXT_TASK or not (self.path / "tokenizer.json").is_file():
            raise FailedPrecondition(f"the {self.architecture} module for {self.task} has no tokenizer",
                                     field="model")
        if self._tokenizer is None:
            self._tokenizer = EncoderTokenizer(self.path, self.input["text"]["max_tokens"])
        return self._tokenizer

    def prepare(self, samples: Samples) -> dict[str, np.ndarray]:
        """Model inputs (name -> array) for dataset samples: uint8 images (N, H, W), (N, H, W, C) or
        (N, C, H, W) -> normalised float32 (N, C, H, W) (NHWC for an NHWC ONNX graph), resized and
        centre-cropped when their size differs; sentences -> int64 input_ids and attention_mask."""
        if self.task == IMAGE_TASK:
            if samples.images is None:
                raise InvalidArgument(f"a {self.task} model needs an image dataset (.npz), got sentences",
                                      field="dataset")
            return {self.input_names[0]: _pixels(samples.images, self.input["image"])}
        if samples.sentences is None:
            raise InvalidArgument(f"a {self.task} model needs a text dataset, got images", field="dataset")
        ids, mask = self.tokenizer()(samples.sentences, length=self.input["text"].get("length"))
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {name: arrays[name] for name in self.input_names}

    def parameter_count(self) -> int:
        """Parameters of the model (ONNX: elements of its floating-point initializers)."""
        if self.architecture != "onnx":
            return self.load().parameter_count()
        import onnx
        model = untrusted.load_onnx(self.path / ONNX_MODEL)
        floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
        return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer if t.data_type in floats)


def _pixels(images: np.ndarray, image: dict) -> np.ndarray:
    channels, size = image["channels"], image["size"]
    x = images[..., None] if images.ndim == 3 else images                         # (N, H, W, 1)
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)                                               # (N, C, H, W) -> NHWC
    if x.ndim != 4 or x.shape[3] not in (1, 3) or x.dtype != np.uint8:
        raise InvalidArgument(f"images are {x.dtype} {images.shape}; expected uint8 (N, H, W), (N, H, W, C) or "
                              "(N, C, H, W) with 1 or 3 channels", field="dataset")
    if x.shape[3] == 1 and channels == 3:
        x = np.repeat(x, 3, axis=3)
    elif x.shape[3] == 3 and channels == 1:                                       # ITU-R BT.601 luma
        x = np.round(x @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
    if x.shape[1:3] != (size, size):
        x = np.stack([fit_image(picture[..., 0] if channels == 1 else picture, size) for picture in x])
        x = x[..., None] if channels == 1 else x
    pixels = (x.astype(np.float32) / 255.0 - np.float32(image["mean"])) / np.float32(image["std"])
    return np.ascontiguousarray(pixels if image.get("layout") == "NHWC" else pixels.transpose(0, 3, 1, 2))


# ---------------------------------------------------------------- manifest

def read_manifest(path: Path) -> dict:
    """The checked manifest of the module directory `path`."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise _unknown(f"{Path(path).name} has no {MANIFEST}; not an edgeforge module directory")
    manifest = _read_json(file)
    if not isinstance(manifest, dict):
        raise _unknown(f"{MANIFEST} is a JSON {type(manifest).__name__}, not an object")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    unknown = sorted(set(manifest) - set(MANIFEST_KEYS) - {"history"})
    if missing or unknown:
        raise _unknown(f"{MANIFEST} " + "; ".join(filter(None, [missing and f"lacks {missing}",
                                                                 unknown and f"has unknown keys {unknown}"])))
    expected = {"format": [FORMAT], "version": [VERSION], "task": TASKS, "architecture": ARCHITECTURES}
    for key, allowed in expected.items():
        if manifest[key] not in allowed:
            raise _unknown(f"{MANIFEST} {key} is {manifest[key]!r}; expected " + " or ".join(map(repr, allowed)))
    for key in ("structure", "input", "source"):
        if not isinstance(manifest[key], dict):
            raise _unknown(f"{MANIFEST} {key} must be an object, got {json.dumps(manifest[key])[:80]}")
    if not isinstance(manifest.get("history", []), list):
        raise _unknown(f"{MANIFEST} history must be a list")
    _check_input(manifest["task"], manifest["input"])
    return manifest


def _check_input(task: str, spec: dict) -> None:
    kind = "image" if task == IMAGE_TASK else "text"
    if sorted(spec) != sorted([kind, "names"]):
        raise _unknown(f"{MANIFEST} input of a {task} model holds {kind!r} and 'names', found {sorted(spec)}")
    names = spec["names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        raise _unknown(f"{MANIFEST} input.names must be a non-empty list of input names")
    detail = spec[kind]
    if kind == "image":
        channels, size = detail.get("channels"), detail.get("size")
        ok = (channels in (1, 3) and isinstance(size, int) and size > 0 and len(names) == 1
              and all(isinstance(detail.get(k), list) and len(detail[k]) == channels and
                      all(isinstance(v, (int, float)) for v in detail[k]) for k in ("mean", "std"))
              and min(detail["std"]) > 0 and detail.get("layout", "NCHW") in ("NCHW", "NHWC")
              and not set(detail) - {"channels", "size", "mean", "std", "layout"})
        what = "one input and image {channels: 1|3, size > 0, mean, std: one number per channel (std > 0)[, layout]}"
    else:
        ok = (isinstance(detail.get("max_tokens"), int) and detail["max_tokens"] > 0
              and isinstance(detail.get("length", 1), int) and detail.get("length", 1) > 0
              and not set(detail) - {"max_tokens", "length"}
              and {"input_ids", "attention_mask"} <= set(names) <= set(TEXT_INPUTS))
        what = f"text {{max_tokens > 0[, length > 0]}} and names among {list(TEXT_INPUTS)} with input_ids, attention_mask"
    if not ok:
        raise _unknown(f"{MANIFEST} input is {json.dumps(spec)[:200]}; expected {what}")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _unknown(f"{path.name} is not JSON: {error}") from error


# ---------------------------------------------------------------- weights

def _load_weights(module: nn.Module, path: Path, architecture: str) -> None:
    from safetensors.torch import load_file
    untrusted.read_safetensors_header(path)              # precise errors for a truncated or forged header
    _assign(module, load_file(str(path)), f"{path.name} of the {architecture} module")


def _assign(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Loads `state` into `module` after checking names, shapes and finiteness; floats become float32."""
    expected = module.state_dict()
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else ""]
        raise _malformed(f"{what} does not match its structure: " + ", ".join(filter(None, parts)))
    for name, target in expected.items():
        tensor = state[name]
        if tensor.shape != target.shape:
            raise _malformed(f"{what}: tensor {name} has shape {tuple(tensor.shape)}; the structure implies "
                             f"{tuple(target.shape)}")
        if tensor.is_floating_point():
            tensor = tensor.float()
            if not torch.isfinite(tensor).all():
                raise _malformed(f"{what}: tensor {name} contains NaN or Inf")
        state[name] = tensor
    module.load_state_dict(state, strict=True)


def _save_weights(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file
    state = {name: (t.detach().float() if t.is_floating_point() else t.detach()).cpu().contiguous().clone()
             for name, t in module.state_dict().items()}                         # clone: no shared storage
    save_file(state, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------- writing

def write_module_dir(module: nn.Module | object | None, out_dir: Path, *, architecture: str, task: str,
                     input: dict, source: dict, structure: dict | None = None, history: list | None = None,
                     files: dict[str, Path] | None = None, check: bool = False) -> ModuleDir:
    """Writes a module directory atomically (staging directory + rename; `out_dir` must not exist):
    the manifest, the weights of `module` (an nn.Module; for "onnx" an onnx.ModelProto; None: the
    weights are among `files`) and `files` (name -> path, copied). With `check`, the result passes
    `validate` before it becomes visible."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FailedPrecondition(f"{out_dir} already exists", field="out_dir")
    if isinstance(module, nn.Module) and architecture == "mobilenet_v2":
        module = _folded(module)
    if structure is None:
        structure = module.structure() if hasattr(module, "structure") else {}
    manifest = {"format": FORMAT, "version": VERSION, "task": task, "architecture": architecture,
                "structure": structure, "input": input, "source": source}
    if history:
        manifest["history"] = list(history)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    staging.chmod(0o755)
    try:
        for name, path in (files or {}).items():
            shutil.copyfile(path, staging / name)
        if isinstance(module, nn.Module):
            _save_weights(module, staging / WEIGHTS)
        elif module is not None:
            import onnx
            onnx.save_model(module, str(staging / ONNX_MODEL))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if check:
            validate(ModuleDir(staging))
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return ModuleDir(out_dir)


def _folded(model: nn.Module) -> nn.Module:
    from shared.models.vision import fold_batchnorm
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model
    with torch.no_grad():
        return fold_batchnorm(copy.deepcopy(model).eval())


def validate(module_dir: ModuleDir) -> None:
    """Checks that the model runs: onnx.checker for "onnx"; otherwise the weights load and the example
    inputs give one output of a shape that fits the task."""
    if module_dir.architecture == "onnx":
        untrusted.load_onnx(module_dir.path / ONNX_MODEL)          # size, external data, domains, onnx.checker
        return
    loaded = module_dir.load()
    with torch.no_grad():
        output = loaded.module(*loaded.example_inputs)
    batch = loaded.example_inputs[0].shape[0]
    ranks = (2,) if module_dir.task == IMAGE_TASK else (2, 3)
    if not isinstance(output, torch.Tensor) or output.ndim not in ranks or output.shape[0] != batch:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise FailedPrecondition(f"a {module_dir.task} model must return one ({batch}, …) tensor of rank "
                                 f"{' or '.join(map(str, ranks))}; this one returns {shape}",
                                 reason="UNSUPPORTED_ARCH", field="task")


def save_module_dir(module, like: ModuleDir, out_dir: Path, *, structure: dict | None = None,
                    note: dict | None = None) -> ModuleDir:
    """A transformed model of `like`'s family (new weights, and for torch classes possibly a new
    structure) as a new module directory. For "onnx", `module` is the edited onnx.ModelProto. An
    ExportedProgram's graph fixes its shapes: only its weights can change."""
    architecture = like.architecture
    if architecture == "onnx" and isinstance(module, nn.Module):
        raise FailedPrecondition("an ONNX module is saved from an onnx.ModelProto, not a torch module",
                                 reason="UNSUPPORTED_ARCH", field="model")
    if architecture == "exported_program":
        _check_same_shapes(module, like)
        structure = like.structure
    carried = {p.name: p for p in like.path.iterdir() if p.is_file() and p.name not in (MANIFEST, WEIGHTS, ONNX_MODEL)}
    history = list(like.manifest.get("history", [])) + ([note] if note else [])
    return write_module_dir(module, out_dir, architecture=architecture, task=like.task, input=like.input,
                            source=like.source, structure=structure, history=history, files=carried)


def _check_same_shapes(module: nn.Module, like: ModuleDir) -> None:
    before = {k: tuple(v.shape) for k, v in like.load().module.state_dict().items()}
    after = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        raise FailedPrecondition(f"an ExportedProgram's graph fixes its shapes, but {changed[0]} changed from "
                                 f"{before.get(changed[0])} to {after.get(changed[0])}: structural changes need a "
                                 "torch family (mobilenet_v2, small_cnn, bert)", reason="UNSUPPORTED_ARCH",
                                 field="model")


# ---------------------------------------------------------------- bundles (flat tars)

def pack(directory: Path, out: Path) -> None:
    """Writes module directory `directory` as a deterministic, uncompressed flat tar."""
    ModuleDir(directory)
    bundle.pack_files(Path(directory), out, _SUFFIXES)


def unpack(archive: Path, destination: Path) -> Path:
    """Extracts a flat model tar (a module bundle or an HF directory's bundle) into `destination`
    atomically; plain files with simple names only. Returns `destination`."""
    return bundle.unpack(archive, destination, _SUFFIXES, required=None)


def tar_family(archive: Path) -> str | None:
    """"module" for a module bundle, "bert" for the bundle of an HF BERT directory, else None (e.g. a
    decoder bundle), judged from the tar's member names and config.json."""
    try:
        with tarfile.open(archive, "r:") as tar:
            members = {m.name: m for m in tar.getmembers()}
            if MANIFEST in members:
                return "module"
            config = members.get(BERT_CONFIG)
            if config is None or not config.isfile() or config.size > 1 << 20:
                return None
            raw = json.loads(tar.extractfile(config).read())
    except (tarfile.TarError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return "bert" if isinstance(raw, dict) and raw.get("model_type") == "bert" else None


_unpack_lock = threading.Lock()


def open_artifact(access, name: str, field: str = "model") -> ModuleDir:
    """The module bundle artifact `name` (an ArtifactAccess), unpacked once into its cache."""
    record = access.get(name)
    path = access.local_path(name)
    if tar_family(path) != "module":
        raise _unknown(f"{field} {name} ({record.display_name}) is not a module bundle (a tar with {MANIFEST}); "
                       "import the source model first", field=field)
    with _unpack_lock:
        directory = unpack(path, access.cache_dir / "modules" / record.sha256)
    return ModuleDir(directory)


# ---------------------------------------------------------------- ExportedPrograms

def _read_program(path: Path):
    """torch.export.load runs pickle on parts of a .pt2: shared.untrusted checks the archive first and
    forces weights_only=True on every torch.load inside."""
    return untrusted.load_exported_program(path)


def _program_inputs(program) -> list[tuple[str, list[int | None], torch.dtype]]:
    """(name, shape with None for a dynamic dimension, dtype) of each user input, in call order."""
    user = list(program.graph_signature.user_inputs)
    values = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    out = []
    for name in user:
        value = values.get(name)
        if not isinstance(value, torch.Tensor):
            raise FailedPrecondition(f"ExportedProgram input {name} is not a tensor", reason="UNSUPPORTED_ARCH",
                                     field="model")
        out.append((name, [d if isinstance(d, int) else None for d in value.shape], value.dtype))
    return out


def _synthetic_input(shape: list[int | None], dtype: torch.dtype) -> torch.Tensor:
    concrete = [EXAMPLE_BATCH if i == 0 and size is None else (size or 8) for i, size in enumerate(shape)]
    if dtype.is_floating_point:
        return torch.randn(concrete, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return torch.ones(concrete, dtype=dtype)


def _axis_name(index: int) -> str:
    return "batch" if index == 0 else "tokens" if index == 1 else f"dim{index}"
