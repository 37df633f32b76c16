"""Quality of an exported file, measured in its own runtime.

- `validate`: logits on fixed prompts versus the float32 source model (max/mean |Δlogit|, top-1
  agreement). A file that fails to load, gives non-finite or mis-shaped logits, or agrees on fewer
  than MIN_TOP1 of positions fails validation.
- `perplexity`: exp(mean NLL) over non-overlapping windows. Each window is BOS followed by
  window_tokens−1 text tokens; every text token is predicted from its prefix in the window, so each
  token is scored exactly once and every runtime sees identical inputs.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from services.exporter.runtimes import LogitsRuntime
from shared.errors import FailedPrecondition, InvalidArgument

MIN_TOP1 = 0.5
# Real sentences, tokenized with the model's own tokenizer, on which every export is checked.
VALIDATION_PROMPTS = (
    "The capital of France is Paris, and the river that runs through it is called the Seine.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "In 1969, Neil Armstrong became the first person to walk on the Moon during the Apollo 11 mission.",
)


@dataclasses.dataclass(frozen=True)
class ValidationResult:
    runtime: str
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    positions: int
    loaded: bool = True

    @property
    def passed(self) -> bool:
        return self.loaded and math.isfinite(self.max_abs_diff) and self.top1_agreement >= MIN_TOP1


def validate(runtime: LogitsRuntime, reference: list[np.ndarray], prompts: list[list[int]]) -> ValidationResult:
    """Compares `runtime` logits with reference logits for the same token prompts."""
    diffs, agree, positions = [], 0, 0
    for tokens, expected in zip(prompts, reference):
        actual = runtime.logits(tokens)
        if actual.shape != expected.shape:
            raise FailedPrecondition(f"{runtime.name} returned logits of shape {actual.shape}, expected "
                                     f"{expected.shape}", reason="VALIDATION_FAILED")
        if not np.isfinite(actual).all():
            raise FailedPrecondition(f"{runtime.name} produced NaN/Inf logits", reason="VALIDATION_FAILED")
        diffs.append(np.abs(actual.astype(np.float64) - expected))
        agree += int((actual.argmax(-1) == expected.argmax(-1)).sum())
        positions += len(tokens)
    every = np.concatenate([d.reshape(-1) for d in diffs])
    return ValidationResult(runtime.name, float(every.max()), float(every.mean()), agree / positions, positions)


def windows(tokens: list[int], bos_id: int, window_tokens: int, max_tokens: int) -> list[list[int]]:
    """Non-overlapping [BOS] + (window_tokens−1) text-token windows over the first max_tokens tokens."""
    if window_tokens < 2:
        raise InvalidArgument(f"window_tokens must be at least 2, got {window_tokens}", field="window_tokens")
    body = window_tokens - 1
    usable = min(len(tokens), max_tokens) // body * body
    if usable == 0:
        raise InvalidArgument(f"evaluation text has {len(tokens)} tokens, fewer than one window of {body}",
                              reason="INSUFFICIENT_DATA", field="evaluation.dataset")
    return [[bos_id] + tokens[i:i + body] for i in range(0, usable, body)]


@dataclasses.dataclass(frozen=True)
class Perplexity:
    value: float
    tokens: int
    runtime: str


def perplexity(runtime: LogitsRuntime, token_windows: list[list[int]]) -> Perplexity:
    total_nll, count = 0.0, 0
    for window in token_windows:
        logits = runtime.logits(window).astype(np.float64)                 # (T, vocab)
        shifted = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=-1))
        targets = np.array(window[1:])
        total_nll += float((log_z - shifted[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return Perplexity(math.exp(total_nll / count), count, runtime.name)
