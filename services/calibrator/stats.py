"""Per-linear input statistics from calibration text (what AWQ, importance-weighted RTN and static
activation quantization consume).

For every linear weight W of the transformer blocks, over all calibration tokens x (rows of W's
input): abs_max[c] = max |x_c| and mean_abs[c] = mean |x_c|, per input channel c. Sequences are
consecutive non-overlapping chunks of the tokenized text, each [BOS] + (sequence_length−1) tokens,
so the same text, model and config always give the same statistics.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from shared.errors import InvalidArgument
from shared.models.bundle import ModelDir
from shared.models.llama import build_reference
from shared.models.llama_config import is_linear_weight
from shared.models.tokenizer import TextTokenizer
from shared.tensors.safetensors_writer import write_safetensors

METADATA_KEY = "edgeforge.calibration"
MEDIA_TYPE = "application/x-edgeforge-calibration+safetensors"
BATCH = 4


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    samples: int = 64
    sequence_length: int = 512

    def validated(self) -> "CalibrationConfig":
        if not 1 <= self.samples <= 4096:
            raise InvalidArgument(f"calibration.samples must be in [1, 4096], got {self.samples}",
                                  field="calibration.samples")
        if not 8 <= self.sequence_length <= 8192:
            raise InvalidArgument(f"calibration.sequence_length must be in [8, 8192], got {self.sequence_length}",
                                  field="calibration.sequence_length")
        return self


@dataclasses.dataclass(frozen=True)
class LinearStats:
    weight: str
    abs_max: np.ndarray        # (in_features,)
    mean_abs: np.ndarray       # (in_features,)


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    tokens: int
    layers: list[LinearStats]


def sequences(tokens: list[int], bos_id: int, config: CalibrationConfig) -> list[list[int]]:
    body = config.sequence_length - 1
    needed = config.samples * body
    if len(tokens) < needed:
        raise InvalidArgument(f"calibration text has {len(tokens)} tokens; {config.samples} samples of "
                              f"{config.sequence_length} need {needed}", reason="INSUFFICIENT_DATA",
                              field="calibration.dataset")
    return [[bos_id] + tokens[i * body:(i + 1) * body] for i in range(config.samples)]


def calibrate(model_dir: ModelDir, text: str, config: CalibrationConfig) -> CalibrationResult:
    config = config.validated()
    tokenizer = TextTokenizer(model_dir.tokenizer_path, model_dir.tokenizer_config())
    if tokenizer.bos_id is None:
        raise InvalidArgument("the model's tokenizer has no BOS token", reason="UNSUPPORTED_OP", field="model")
    batches = sequences(tokenizer.encode(text), tokenizer.bos_id, config)
    model = build_reference(model_dir.config, model_dir.tensor)
    sums: dict[str, torch.Tensor] = {}
    maxima: dict[str, torch.Tensor] = {}
    count = 0

    def observe(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs()           # (tokens, in)
            sums[name] = sums.get(name, 0) + x.sum(0, dtype=torch.float64)
            top = x.max(0).values
            maxima[name] = torch.maximum(maxima[name], top) if name in maxima else top
        return hook

    handles = [module.register_forward_pre_hook(observe(f"{name}.weight"))
               for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and is_linear_weight(f"{name}.weight")]
    try:
        with torch.inference_mode():
            for start in range(0, len(batches), BATCH):
                chunk = torch.tensor(batches[start:start + BATCH], dtype=torch.int64)   # (B, T)
                model.hidden_states(chunk)                                              # lm_head not needed
                count += chunk.numel()
    finally:
        for handle in handles:
            handle.remove()
    layers = [LinearStats(name, maxima[name].numpy().astype(np.float32),
                          (sums[name] / count).numpy().astype(np.float32)) for name in sums]
    return CalibrationResult(count, layers)


def write_stats(path: Path, result: CalibrationResult, provenance: dict) -> None:
    layout = {}
    for layer in result.layers:
        layout[f"{layer.weight}.abs_max"] = ((layer.abs_max.size,), "F32")
        layout[f"{layer.weight}.mean_abs"] = ((layer.mean_abs.size,), "F32")

    def arrays():
        for layer in result.layers:
            yield f"{layer.weight}.abs_max", layer.abs_max
            yield f"{layer.weight}.mean_abs", layer.mean_abs
    write_safetensors(path, layout, arrays(),
                      metadata={METADATA_KEY: json.dumps({**provenance, "tokens": result.tokens})})
