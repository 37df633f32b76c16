"""Runtime drivers: open one deployable file in its own runtime and run a benchmark workload on it.

Two workloads (measure.py times them):
- causal LM (task "causal_lm"): `prompt(tokens)` processes a prompt from an empty context and
  `generate(count)` continues greedily, one token at a time; both return milliseconds.
- single inference (any other task: classifiers, encoders): `infer()` runs the model once on fixed
  pseudo-random inputs of its declared shapes and dtypes (`synthetic_inputs`); returns milliseconds.

One driver per format (`DRIVERS`). Each imports its runtime only when constructed, so an agent runs on a
device that has only some of them; `runtime_status` says which, from package metadata alone. Relative
imports only: this package is also installed standalone as `edgeforge_agent`.
"""
from __future__ import annotations

import importlib
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

CAUSAL_LM = "causal_lm"
SEQUENCE_TOKENS = 128           # a dynamic sequence axis in the single-inference workload, in tokens
FORMAT_RUNTIME = {"gguf": "llama.cpp", "onnx": "onnxruntime", "tflite": "litert", "coreml": "coreml"}
# runtime -> (distributions that provide it, the edgeforge-agent extra that installs it)
RUNTIME_PACKAGES = {"llama.cpp": (("llama_cpp_python",), "llamacpp"),
                    "onnxruntime": (("onnxruntime", "onnxruntime-gpu"), "onnxruntime"),
                    "litert": (("ai-edge-litert",), "litert"),
                    "coreml": (("coremltools",), "coreml")}


class DriverError(Exception):
    """A file or device the driver cannot measure; the message says why."""


class RuntimeUnavailable(DriverError):
    """The format's runtime is not installed, or cannot run on this operating system."""


class ModelMismatch(DriverError):
    """The file does not fit the workload: a causal-LM task on a classifier, or one inference on an LM."""


class ContextExceeded(DriverError):
    """The workload needs more tokens than the file's signature or the created context holds."""


# --------------------------------------------------------------------------------- availability

def installed_version(distributions: tuple[str, ...]) -> str | None:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _not_installed(runtime: str) -> str:
    return f"not installed: pip install 'edgeforge-agent[{RUNTIME_PACKAGES[runtime][1]}]'"


def _off_macos() -> str | None:
    """Why Core ML cannot predict here, or None on macOS."""
    if sys.platform == "darwin":
        return None
    return f"Core ML prediction needs macOS (Apple's Core ML framework); this OS is {platform.system() or sys.platform}"


def runtime_status() -> tuple[dict[str, str], dict[str, str]]:
    """(runtime -> version for the runtimes this device can run, runtime -> one-line reason for the
    others), read from package metadata without importing the runtimes."""
    available, unavailable = {}, {}
    for runtime, (distributions, _) in RUNTIME_PACKAGES.items():
        version = installed_version(distributions)
        reason = _off_macos() if runtime == "coreml" else None     # coremltools installs on Linux too
        if reason is None and version is None:
            reason = _not_installed(runtime)
        if reason is None:
            available[runtime] = version
        else:
            unavailable[runtime] = reason
    return available, unavailable


def _import_runtime(module: str, runtime: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise RuntimeUnavailable(f"{runtime}: {_not_installed(runtime)} ({error})") from error


# --------------------------------------------------------------------------------- shared pieces

def normalize_task(task: str | None) -> str:
    """"causal_lm", "MODEL_TASK_CAUSAL_LM" -> "causal_lm". Unset means causal_lm: every job before the
    task field was a causal LM."""
    name = (task or "").lower().removeprefix("model_task_")
    return CAUSAL_LM if name in ("", "unspecified") else name


def _check_task(task: str, is_causal_lm: bool, signature: str) -> None:
    if task == CAUSAL_LM and not is_causal_lm:
        raise ModelMismatch(f"task causal_lm needs a language-model signature (token ids in, logits out), "
                            f"but this file takes {signature}; measure it with its own task (one inference)")
    if task != CAUSAL_LM and is_causal_lm:
        raise ModelMismatch(f"task {task} runs one inference, but this file is a causal LM ({signature}); "
                            f"measure it with task causal_lm")


def _require_tokens(needed: int, capacity: int | None, what: str) -> None:
    if capacity is not None and needed > capacity:
        raise ContextExceeded(f"{needed} tokens exceed {what} of {capacity} tokens")


def concrete_shape(dims: list) -> tuple[int, ...]:
    """Declared dims -> a runnable shape: a dynamic dim (None, -1, or a symbolic name) becomes 1, or
    SEQUENCE_TOKENS when its name says it is a sequence axis ("seq", "sequence", "seq_len")."""
    shape = []
    for dim in dims:
        if isinstance(dim, str):
            shape.append(SEQUENCE_TOKENS if "seq" in dim.lower() else 1)
        elif dim is None or int(dim) <= 0:
            shape.append(1)
        else:
            shape.append(int(dim))
    return tuple(shape)


def synthetic_inputs(specs: list[tuple[str, tuple[int, ...], np.dtype]], seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed pseudo-random inputs, one per (name, shape, dtype): floats ~ N(0, 1); integers small valid
    ids in [1, 100) (any vocabulary has them), except attention masks (ones), token type ids (zeros)
    and position ids (0, 1, 2, … along the last axis); booleans true."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in specs:
        dtype, lowered = np.dtype(dtype), name.lower()
        if dtype == np.bool_ or "mask" in lowered:
            value = np.ones(shape, dtype)
        elif np.issubdtype(dtype, np.integer):
            if "token_type" in lowered:
                value = np.zeros(shape, dtype)
            elif "position" in lowered:
                value = np.broadcast_to(np.arange(shape[-1] if shape else 1), shape).astype(dtype)
            else:
                value = rng.integers(1, 100, size=shape).astype(dtype)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        feeds[name] = value
    return feeds


def describe_inputs(feeds: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {value.dtype} {tuple(value.shape)}" for name, value in feeds.items())


def _single_inference_note(feeds: dict[str, np.ndarray]) -> str:
    return f"single inference on fixed pseudo-random inputs: {describe_inputs(feeds)}"


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


# --------------------------------------------------------------------------------- llama.cpp

class LlamaCppDriver:
    """GGUF through llama.cpp (llama-cpp-python), llama-bench style: pp then tg on one context of
    `context_tokens`. GGUF files here are causal LMs only."""
    runtime = "llama.cpp"

    def __init__(self, path: Path, context_tokens: int, threads: int, task: str = CAUSAL_LM):
        self.task, self.notes, self.capacity_tokens = normalize_task(task), [], context_tokens
        _check_task(self.task, True, "a GGUF file")
        llama_cpp = _import_runtime("llama_cpp", self.runtime)
        self._api = llama_cpp
        self.versions = {"llama.cpp": llama_cpp.__version__}
        self._llm = llama_cpp.Llama(str(path), n_ctx=context_tokens, n_batch=min(512, context_tokens),
                                    n_threads=threads, n_threads_batch=threads, verbose=False)
        self.vocab_size = self._llm.n_vocab()

    def prompt(self, tokens: list[int]) -> float:
        """Processes the prompt from an empty context; returns milliseconds."""
        _require_tokens(len(tokens), self.capacity_tokens, "the llama.cpp context")
        self._llm.reset()
        start = time.perf_counter()
        self._llm.eval(tokens)
        return _ms_since(start)

    def generate(self, count: int) -> float:
        """Generates `count` tokens greedily after the prompt; returns milliseconds."""
        _require_tokens(self._llm.n_tokens + count, self.capacity_tokens, "the llama.cpp context")
        start = time.perf_counter()
        for _ in range(count):
            last = self._api.llama_get_logits_ith(self._llm.ctx, -1)      # the last token's logits
            logits = np.ctypeslib.as_array(last, shape=(self.vocab_size,))
            self._llm.eval([int(np.argmax(logits))])
        return _ms_since(start)

    def close(self) -> None:
        self._llm.close()


# --------------------------------------------------------------------------------- onnxruntime

ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
               "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def onnx_model_file(path: Path) -> Path:
    """The .onnx file of an artifact: the path itself, or the single *.onnx of an external-data directory."""
    if not path.is_dir():
        return path
    found = sorted(path.glob("*.onnx"))
    if len(found) != 1:
        raise DriverError(f"{path.name}/ holds {len(found)} .onnx files ({', '.join(p.name for p in found)}); "
                          f"an external-data export holds exactly one")
    return found[0]


class OnnxRuntimeDriver:
    """ONNX through onnxruntime (CPU). A causal LM is a decoder with its KV cache: `input_ids` and
    `past_key_values.*` in, `logits` and `present.*` out. Any other graph runs the single inference."""
    runtime = "onnxruntime"

    def __init__(self, path: Path, context_tokens: int, threads: int, task: str = CAUSAL_LM):
        ort = _import_runtime("onnxruntime", self.runtime)
        self.task, self.notes, self.capacity_tokens = normalize_task(task), [], None   # no fixed limit in the graph
        self.versions = {"onnxruntime": ort.__version__}
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(str(onnx_model_file(Path(path))), options,
                                             providers=["CPUExecutionProvider"])
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        self._outputs = [o.name for o in outputs]
        self._pasts = [i for i in inputs if i.name.startswith("past_key_values.")]
        expected = {"input_ids"} | {p.name for p in self._pasts}
        is_lm = bool(self._pasts) and "logits" in self._outputs and {i.name for i in inputs} == expected
        _check_task(self.task, is_lm, ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs))
        if is_lm:
            self._cache: dict[str, np.ndarray] = {}
            self._last_logits: np.ndarray | None = None
            vocab = next(o for o in outputs if o.name == "logits").shape[-1]
            if not isinstance(vocab, int):                # a symbolic vocabulary axis: one token tells
                self.prompt([0])
                vocab = len(self._last_logits)
            self.vocab_size = int(vocab)
        else:
            self._feeds = synthetic_inputs([(i.name, concrete_shape(i.shape), ONNX_DTYPES[i.type]) for i in inputs])
            self.notes.append(_single_inference_note(self._feeds))

    def _empty_cache(self) -> dict[str, np.ndarray]:
        return {p.name: np.zeros((1, p.shape[1], 0, p.shape[3]), dtype=ONNX_DTYPES[p.type]) for p in self._pasts}

    def _step(self, tokens: list[int]) -> None:
        feeds = {"input_ids": np.array([tokens], dtype=np.int64), **self._cache}
        results = dict(zip(self._outputs, self._session.run(self._outputs, feeds)))
        self._last_logits = results["logits"][0, -1]
        self._cache = {name.replace("present.", "past_key_values.", 1): value
                       for name, value in results.items() if name.startswith("present.")}

    def prompt(self, tokens: list[int]) -> float:
        self._cache = self._empty_cache()
        start = time.perf_counter()
        self._step(tokens)
        return _ms_since(start)

    def generate(self, count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            self._step([int(np.argmax(self._last_logits))])
        return _ms_since(start)

    def infer(self) -> float:
        start = time.perf_counter()
        self._session.run(self._outputs, self._feeds)
        return _ms_since(start)

    def close(self) -> None:
        self._session = None


# --------------------------------------------------------------------------------- LiteRT

class LiteRtDriver:
    """TFLite through LiteRT's Interpreter (ai-edge-litert; XNNPACK where it applies).

    A causal LM is our export's single signature: int32 (1, T) token ids -> float32 (1, T, vocab)
    logits, T fixed at export, no KV cache. A prompt is padded on the right with token 0 (attention is
    causal: padding never reaches earlier positions) and costs a whole T-token prefill; each generated
    token re-runs that prefill on the sequence so far — honest, and what this file costs on a device.
    Any other model runs the single inference."""
    runtime = "litert"

    def __init__(self, path: Path, context_tokens: int, threads: int, task: str = CAUSAL_LM):
        interpreter = _import_runtime("ai_edge_litert.interpreter", self.runtime)
        self.task, self.notes = normalize_task(task), []
        self.versions = {"litert": installed_version(RUNTIME_PACKAGES["litert"][0]) or "unknown"}
        self._interpreter = interpreter.Interpreter(str(path), num_threads=threads)
        inputs, outputs = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        first, out = inputs[0], outputs[0]
        is_lm = (len(inputs) == 1 and len(outputs) == 1 and np.issubdtype(first["dtype"], np.integer)
                 and not first["quantization"][0] and len(first["shape"]) == 2 and first["shape"][0] == 1
                 and out["dtype"] == np.float32 and len(out["shape"]) == 3 and out["shape"][1] == first["shape"][1])
        _check_task(self.task, is_lm, ", ".join(f"{d['name']} {np.dtype(d['dtype'])} {list(d['shape_signature'])}"
                                                for d in inputs))
        if is_lm:
            self._input, self._output, self._dtype = first["index"], out["index"], first["dtype"]
            self.capacity_tokens, self.vocab_size = int(first["shape"][1]), int(out["shape"][2])
            self._tokens: list[int] = []
            self.notes += [f"no KV cache in this file: each generated token re-runs the "
                           f"{self.capacity_tokens}-token prefill",
                           f"the signature's length is fixed at {self.capacity_tokens} tokens: a shorter prompt "
                           f"is padded with token 0 and costs the whole prefill"]
        else:
            self.capacity_tokens = None
            self._feeds = self._synthetic_feeds(inputs)
            self.notes.append(_single_inference_note({d["name"]: self._feeds[d["index"]] for d in inputs}))
        self._interpreter.allocate_tensors()

    def _synthetic_feeds(self, inputs: list[dict]) -> dict[int, np.ndarray]:
        """Synthetic inputs at the declared shapes (dynamic dims resized); quantized inputs (full-int8
        models) get N(0, 1) values quantized with the input's scale and zero point."""
        feeds = {}
        for detail in inputs:
            shape = concrete_shape(list(detail["shape_signature"]))
            if tuple(detail["shape"]) != shape:
                self._interpreter.resize_tensor_input(detail["index"], shape)
            dtype, (scale, zero) = np.dtype(detail["dtype"]), detail["quantization"]
            value = synthetic_inputs([(detail["name"], shape, np.float32 if scale else dtype)])[detail["name"]]
            if scale:
                limits = np.iinfo(dtype)
                value = np.clip(np.round(value / scale) + zero, limits.min, limits.max)
            feeds[detail["index"]] = value.astype(dtype)
        return feeds

    def _prefill(self) -> None:
        padded = np.zeros((1, self.capacity_tokens), dtype=self._dtype)      # (1, T)
        padded[0, :len(self._tokens)] = self._tokens
        self._interpreter.set_tensor(self._input, padded)
        self._interpreter.invoke()
        # a view of the (1, T, vocab) output, released at once: invoke refuses while views are held
        self._last_logits = self._interpreter.tensor(self._output)()[0, len(self._tokens) - 1].copy()

    def prompt(self, tokens: list[int]) -> float:
        _require_tokens(len(tokens), self.capacity_tokens, "the file's fixed signature length")
        self._tokens = list(tokens)
        start = time.perf_counter()
        self._prefill()
        return _ms_since(start)

    def generate(self, count: int) -> float:
        _require_tokens(len(self._tokens) + count, self.capacity_tokens,
                        "the file's fixed signature length (prompt + generated tokens; no KV cache to continue from)")
        start = time.perf_counter()
        for _ in range(count):
            self._tokens.append(int(np.argmax(self._last_logits)))
            self._prefill()
        return _ms_since(start)

    def infer(self) -> float:
        start = time.perf_counter()
        for index, value in self._feeds.items():
            self._interpreter.set_tensor(index, value)
        self._interpreter.invoke()
        return _ms_since(start)

    def close(self) -> None:
        self._interpreter = None


# --------------------------------------------------------------------------------- Core ML

COREML_DTYPES = {"FLOAT32": np.float32, "FLOAT16": np.float16, "DOUBLE": np.float64, "INT32": np.int32,
                 "INT8": np.int8}


def coreml_package(path: Path) -> Path:
    """The model of a Core ML artifact: the .mlpackage / .mlmodel itself, or the single one in a directory."""
    if path.suffix in (".mlpackage", ".mlmodel") or (path / "Manifest.json").is_file():
        return path
    found = (sorted(path.glob("*.mlpackage")) + sorted(path.glob("*.mlmodel"))) if path.is_dir() else []
    if len(found) != 1:
        raise DriverError(f"{path.name} is not a Core ML package and holds {len(found)} of them")
    return found[0]


class CoreMlDriver:
    """Core ML (.mlpackage) through coremltools' `MLModel.predict`, on macOS only: elsewhere the
    constructor raises RuntimeUnavailable. UNTESTED here (Linux CI): written against coremltools'
    documented API (`ct.models.MLModel(path)`, `.get_spec().description.input`, `.predict(dict)`).

    A causal LM is our export: `input_ids` int32 (1, T), T ranged 1…max_tokens, -> `logits` (1, T,
    vocab); no KV cache, so each generated token re-runs the prefill of the whole sequence so far.
    Any other model runs the single inference on its multi-array inputs' default shapes."""
    runtime = "coreml"

    def __init__(self, path: Path, context_tokens: int, threads: int, task: str = CAUSAL_LM):
        reason = _off_macos()
        if reason:
            raise RuntimeUnavailable(reason)
        ct = _import_runtime("coremltools", self.runtime)
        self.task, self.notes = normalize_task(task), ["Core ML picks its compute units (CPU, GPU, Neural Engine) "
                                                       "itself: the threads setting is not applied"]
        self.versions = {"coreml": ct.__version__}
        self._model = ct.models.MLModel(str(coreml_package(Path(path))))
        description = self._model.get_spec().description
        specs = [self._input_spec(feature) for feature in description.input]
        outputs = [feature.name for feature in description.output]
        is_lm = [name for name, _, _ in specs] == ["input_ids"] and "logits" in outputs
        _check_task(self.task, is_lm, ", ".join(f"{n} {np.dtype(d)} {list(s)}" for n, s, d in specs))
        if is_lm:
            self.capacity_tokens = self._upper_bound(description.input[0], axis=1)
            self._tokens: list[int] = []
            self._logits([0])                              # learns the vocabulary (flexible outputs omit it)
            self.notes.append("no KV cache in this package: each generated token re-runs the prefill of the "
                              "whole sequence so far")
        else:
            self.capacity_tokens = None
            self._feeds = synthetic_inputs(specs)
            self.notes.append(_single_inference_note(self._feeds))

    @staticmethod
    def _input_spec(feature) -> tuple[str, tuple[int, ...], np.dtype]:
        if feature.type.WhichOneof("Type") != "multiArrayType":
            raise ModelMismatch(f"input {feature.name} has type {feature.type.WhichOneof('Type')}: only "
                                f"multi-array inputs are supported")
        array = feature.type.multiArrayType
        dtype = type(array).ArrayDataType.Name(array.dataType)          # "FLOAT32", "INT32", …
        if dtype not in COREML_DTYPES:
            raise ModelMismatch(f"input {feature.name} has data type {dtype}: supported {', '.join(COREML_DTYPES)}")
        return feature.name, tuple(int(d) for d in array.shape), COREML_DTYPES[dtype]

    @staticmethod
    def _upper_bound(feature, axis: int) -> int | None:
        array = feature.type.multiArrayType
        if array.WhichOneof("ShapeFlexibility") == "shapeRange":
            upper = int(array.shapeRange.sizeRanges[axis].upperBound)
            return None if upper < 0 else upper              # -1: unbounded
        if array.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
            return max(int(shape.shape[axis]) for shape in array.enumeratedShapes.shapes)
        return int(array.shape[axis])

    def _logits(self, tokens: list[int]) -> None:
        logits = self._model.predict({"input_ids": np.array([tokens], dtype=np.int32)})["logits"]   # (1, T, vocab)
        self.vocab_size = int(logits.shape[-1])
        self._last_logits = np.asarray(logits)[0, -1]

    def prompt(self, tokens: list[int]) -> float:
        _require_tokens(len(tokens), self.capacity_tokens, "the package's input range")
        self._tokens = list(tokens)
        start = time.perf_counter()
        self._logits(self._tokens)
        return _ms_since(start)

    def generate(self, count: int) -> float:
        _require_tokens(len(self._tokens) + count, self.capacity_tokens, "the package's input range")
        start = time.perf_counter()
        for _ in range(count):
            self._tokens.append(int(np.argmax(self._last_logits)))
            self._logits(self._tokens)
        return _ms_since(start)

    def infer(self) -> float:
        start = time.perf_counter()
        self._model.predict(self._feeds)
        return _ms_since(start)

    def close(self) -> None:
        self._model = None


DRIVERS = {"gguf": LlamaCppDriver, "onnx": OnnxRuntimeDriver, "tflite": LiteRtDriver, "coreml": CoreMlDriver}
