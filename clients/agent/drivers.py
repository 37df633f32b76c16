"""Runtime drivers: load a file, process a prompt, generate tokens greedily. One per format.

The agent imports only what the device has: each driver imports its runtime when constructed.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


class LlamaCppDriver:
    """GGUF through llama.cpp (llama-cpp-python), llama-bench style: pp then tg on one context."""

    def __init__(self, path: Path, context_tokens: int, threads: int):
        import llama_cpp
        self._api = llama_cpp
        self.versions = {"llama.cpp": llama_cpp.__version__}
        self._llm = llama_cpp.Llama(str(path), n_ctx=context_tokens, n_batch=min(512, context_tokens),
                                    n_threads=threads, n_threads_batch=threads, verbose=False)
        self.vocab_size = self._llm.n_vocab()

    def prompt(self, tokens: list[int]) -> float:
        """Processes the prompt from an empty context; returns milliseconds."""
        self._llm.reset()
        start = time.perf_counter()
        self._llm.eval(tokens)
        return (time.perf_counter() - start) * 1e3

    def generate(self, count: int) -> float:
        """Generates `count` tokens greedily after the prompt; returns milliseconds."""
        start = time.perf_counter()
        for _ in range(count):
            last = self._api.llama_get_logits_ith(self._llm.ctx, -1)      # the last token's logits
            logits = np.ctypeslib.as_array(last, shape=(self.vocab_size,))
            self._llm.eval([int(np.argmax(logits))])
        return (time.perf_counter() - start) * 1e3

    def close(self) -> None:
        self._llm.close()


class OnnxRuntimeDriver:
    """ONNX through onnxruntime with the exported KV cache (past_key_values in, present out)."""

    def __init__(self, path: Path, context_tokens: int, threads: int):
        import onnxruntime as ort
        self.versions = {"onnxruntime": ort.__version__}
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._pasts = [i for i in self._session.get_inputs() if i.name.startswith("past_key_values.")]
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.vocab_size = int(self._session.get_outputs()[0].shape[-1])
        self._state: dict[str, np.ndarray] = {}
        self._last_logits: np.ndarray | None = None

    def _step(self, tokens: list[int]) -> None:
        feeds = {"input_ids": np.array([tokens], dtype=np.int64)}
        for past in self._pasts:
            feeds[past.name] = self._state.get(past.name)
        results = dict(zip(self._outputs, self._session.run(self._outputs, feeds)))
        self._last_logits = results["logits"][0, -1]
        self._state = {name.replace("present.", "past_key_values."): value
                       for name, value in results.items() if name.startswith("present.")}

    def prompt(self, tokens: list[int]) -> float:
        self._state = {p.name: np.zeros((1, p.shape[1], 0, p.shape[3]), dtype=np.float32) for p in self._pasts}
        start = time.perf_counter()
        self._step(tokens)
        return (time.perf_counter() - start) * 1e3

    def generate(self, count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            self._step([int(np.argmax(self._last_logits))])
        return (time.perf_counter() - start) * 1e3

    def close(self) -> None:
        self._session = None


DRIVERS = {"gguf": LlamaCppDriver, "onnx": OnnxRuntimeDriver}
