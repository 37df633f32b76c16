"""The smallest real build the SDK tests run: the tiny random-weight llama (SmolLM2's tokenizer) as one
GGUF Q8_0 candidate on the agent labelled device=test-host (a module of its own, not conftest, so test
files import it by a name no other test directory uses)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_build(tiny_model_dir: Path, assets: Path, **overrides: Any) -> dict[str, Any]:
    raw = {
        "name": "sdk-tiny", "model": {"path": str(tiny_model_dir)},
        "calibration": {"text_file": str(assets / "data" / "calib.txt"), "samples": 2, "sequence_length": 32},
        "evaluation": {"text_file": str(assets / "data" / "eval.txt"), "max_tokens": 128, "window_tokens": 64},
        "targets": [{"name": "host", "selector": {"device": "test-host"}}],
        "candidates": [{"format": "gguf", "quantization": {"type": "q8_0"}}],
        "benchmark": {"prompt_tokens": 8, "generation_tokens": 4, "warmup_runs": 1, "timed_runs": 2,
                      "min_duration_ms": 0, "cooldown_ms": 0, "skip_throughput": True},
    }
    raw.update(overrides)
    return raw
