"""Each format's own runtime, loaded to produce logits: llama.cpp for GGUF, onnxruntime for ONNX,
and edgeforge's torch reference for the float32 source model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from services.exporter.base import ExportFormat
from shared.errors import FailedPrecondition


class LogitsRuntime(Protocol):
    name: str          # "llama.cpp@0.3.36"

    def logits(self, tokens: list[int]) -> np.ndarray:
        """One sequence from an empty context -> logits (len(tokens), vocab) float32."""
        ...


def threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class LlamaCppRuntime:
    def __init__(self, path: Path, context_tokens: int):
        import llama_cpp
        self.name = f"llama.cpp@{llama_cpp.__version__}"
        try:
            self._llm = llama_cpp.Llama(str(path), n_ctx=context_tokens, n_batch=context_tokens,
                                        n_ubatch=context_tokens, logits_all=True, n_threads=threads(),
                                        verbose=False)
        except (ValueError, RuntimeError) as error:
            raise FailedPrecondition(f"llama.cpp could not load {path.name}: {error}",
                                     reason="VALIDATION_FAILED") from error

    def logits(self, tokens: list[int]) -> np.ndarray:
        self._llm.reset()
        self._llm.eval(tokens)
        return np.array(self._llm.scores[:len(tokens)], dtype=np.float32)

    def close(self) -> None:
        self._llm.close()


class OnnxRuntime:
    """onnxruntime (CPU) on an exported causal LM: a .onnx file, or the directory of an external-data
    export (model.onnx + model.onnx.data). Past key/values start empty, in the graph's own dtype."""

    def __init__(self, path: Path, threads_count: int | None = None, session_config: dict[str, str] | None = None):
        """`session_config`: onnxruntime session config entries, e.g. {"session.qdq_matmulnbits_accuracy_level":
        "0"} to keep DequantizeLinear→MatMul fused into MatMulNBits computing with float activations
        (onnxruntime 1.32's default, 4, quantizes them to int8)."""
        import onnxruntime as ort
        from services.exporter.formats.onnx import model_file
        self.name = f"onnxruntime@{ort.__version__}"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads_count or threads()
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        try:
            self._session = ort.InferenceSession(str(model_file(Path(path))), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as error:     # onnxruntime raises its own untyped exceptions on bad graphs
            raise FailedPrecondition(f"onnxruntime could not load {Path(path).name}: {error}",
                                     reason="VALIDATION_FAILED") from error
        self._pasts = [i for i in self._session.get_inputs() if i.name.startswith("past_key_values.")]
        self._outputs = [o.name for o in self._session.get_outputs()]

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        return {past.name: np.zeros((batch, past.shape[1], 0, past.shape[3]), dtype=dtypes[past.type])
                for past in self._pasts}

    def step(self, tokens: list[int], cache: dict[str, np.ndarray] | None = None
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits (len(tokens), vocab) for `tokens` after the cached ones, and the cache extended."""
        feeds = {"input_ids": np.array([tokens], dtype=np.int64), **(cache or self.empty_cache())}
        values = dict(zip(self._outputs, self._session.run(self._outputs, feeds)))
        presents = {name.replace("present.", "past_key_values.", 1): value for name, value in values.items()
                    if name.startswith("present.")}
        return values["logits"][0], presents

    def logits(self, tokens: list[int]) -> np.ndarray:
        feeds = {"input_ids": np.array([tokens], dtype=np.int64), **self.empty_cache()}
        return self._session.run(["logits"], feeds)[0][0]

    def close(self) -> None:
        self._session = None


class ReferenceRuntime:
    def __init__(self, model_dir: Path):
        import torch
        from shared.models.bundle import ModelDir
        from shared.models.llama import build_reference
        torch.set_num_threads(threads())
        self.name = f"edgeforge-reference@torch-{torch.__version__}"
        model = ModelDir(model_dir)
        self._model = build_reference(model.config, model.tensor)

    def logits(self, tokens: list[int]) -> np.ndarray:
        import torch
        with torch.inference_mode():
            return self._model(torch.tensor([tokens], dtype=torch.int64))[0].numpy()

    def close(self) -> None:
        self._model = None


def open_runtime(format: ExportFormat, path: Path, context_tokens: int) -> LogitsRuntime:
    if format is ExportFormat.GGUF:
        return LlamaCppRuntime(path, context_tokens)
    if format is ExportFormat.ONNX:
        return OnnxRuntime(path)
    if format is ExportFormat.TFLITE:
        return TfliteRuntime(path)                 # its signature fixes the sequence length
    if format is ExportFormat.REFERENCE:
        return ReferenceRuntime(path)
    raise FailedPrecondition(f"no runtime for format {format.value} on this machine")


class TfliteRuntime:
    """ai-edge-litert's Interpreter (tflite-runtime's successor, which runs under numpy 2) over a .tflite
    file with one signature, default op resolver (XNNPACK where it applies).

    `run(inputs)` feeds the signature's inputs in order (args_0, args_1, …): int64 arrays become int32
    (what litert-torch signatures take) and float arrays are quantized with the input's scale and zero
    point when the file takes int8 (full-int8 models); outputs come back float32, dequantized when int8.

    `logits(tokens)` is the LogitsRuntime of an LM signature (1, T) token ids -> (1, T, vocab) logits,
    T fixed at export: a shorter sequence is padded on the right with token 0 and the first len(tokens)
    rows are returned (attention is causal, so padding never reaches earlier positions); a longer one
    is refused, as the signature has no KV cache to continue from."""

    def __init__(self, path: Path, num_threads: int | None = None):
        from importlib import metadata

        from ai_edge_litert.interpreter import Interpreter
        self.name = f"ai-edge-litert@{metadata.version('ai-edge-litert')}"
        try:
            self._interpreter = Interpreter(str(path), num_threads=num_threads or threads())
            signatures = list(self._interpreter.get_signature_list())
            if len(signatures) != 1:
                raise ValueError(f"expected one signature, found {signatures}")
            self._runner = self._interpreter.get_signature_runner(signatures[0])
        except (ValueError, RuntimeError) as error:
            raise FailedPrecondition(f"ai-edge-litert could not load {Path(path).name}: {error}",
                                     reason="VALIDATION_FAILED") from error

        def ordered(details: dict) -> list[tuple[str, dict]]:
            return sorted(details.items(), key=lambda item: int(item[0].rpartition("_")[2] or 0))
        self.inputs = ordered(self._runner.get_input_details())
        self.outputs = ordered(self._runner.get_output_details())

    @property
    def sequence_tokens(self) -> int:
        return int(self.inputs[0][1]["shape"][-1])

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        if len(inputs) != len(self.inputs):
            raise FailedPrecondition(f"the signature takes {len(self.inputs)} inputs, got {len(inputs)}")
        feeds = {}
        for (name, detail), value in zip(self.inputs, inputs):
            value = np.asarray(value)
            dtype = np.dtype(detail["dtype"])
            scale, zero = detail["quantization"]
            if dtype == np.int8 and scale and value.dtype.kind == "f":
                value = np.clip(np.round(value / scale) + zero, -128, 127)
            feeds[name] = value.astype(dtype)
        results = self._runner(**feeds)
        outputs = []
        for name, detail in self.outputs:
            value = results[name]
            scale, zero = detail["quantization"]
            if np.dtype(detail["dtype"]) == np.int8 and scale:
                value = (value.astype(np.float32) - np.float32(zero)) * np.float32(scale)
            outputs.append(value.astype(np.float32, copy=False))
        return outputs

    def logits(self, tokens: list[int]) -> np.ndarray:
        length = self.sequence_tokens
        if len(tokens) > length:
            raise FailedPrecondition(f"{len(tokens)} tokens exceed the file's {length}-token signature",
                                     field="tokens")
        padded = np.zeros((1, length), dtype=np.int32)
        padded[0, :len(tokens)] = tokens
        return self.run(padded)[0][0, :len(tokens)]

    def close(self) -> None:
        self._runner = self._interpreter = None
