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
    def __init__(self, path: Path):
        import onnxruntime as ort
        self.name = f"onnxruntime@{ort.__version__}"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads()
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:     # onnxruntime raises its own untyped exceptions on bad graphs
            raise FailedPrecondition(f"onnxruntime could not load {path.name}: {error}",
                                     reason="VALIDATION_FAILED") from error
        self._pasts = [i for i in self._session.get_inputs() if i.name.startswith("past_key_values.")]

    def logits(self, tokens: list[int]) -> np.ndarray:
        feeds = {"input_ids": np.array([tokens], dtype=np.int64)}
        for past in self._pasts:
            kv_heads, head_dim = past.shape[1], past.shape[3]
            feeds[past.name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
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
    if format is ExportFormat.REFERENCE:
        return ReferenceRuntime(path)
    raise FailedPrecondition(f"no runtime for format {format.value}")
