"""Input statistics of every linear from calibration data (what AWQ, GPTQ, importance-weighted RTN and
static activation quantization consume), computed one decoder block at a time.

Sequences are consecutive non-overlapping chunks of the dataset's token stream, each
[BOS] + (sequence_length−1) tokens, so the same data, model and config always give the same
statistics. All sequences are embedded, then for each block: only that block's weights are loaded,
every sequence runs through it (a batch at a time) while hooks feed the inputs of its linears into one
accumulator per input site (see accumulate.py for what is measured), and its outputs, written over its
inputs, become the next block's inputs. Peak memory: one block's weights, the hidden states
(samples, sequence_length, hidden) and one block's accumulators. The file is written site by site as
blocks finish (stats_file.py), so the whole model's statistics are never held either.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from services.calibrator.accumulate import SiteAccumulator, SiteSummary
from services.calibrator.stats_file import MEDIA_TYPE, METADATA_KEY, CalibrationStats, Site, write_stats_file
from shared.datasets import check_token_ids
from shared.errors import FailedPrecondition, InvalidArgument
from shared.models.blockwise import (BATCH, BLOCKWISE_ARCHITECTURES, INPUT_GROUPS, InputCapture, batches,
                                     block_prefix, embed, load_block, rotary)
from shared.models.bundle import ModelDir
from shared.models.decoder_config import DecoderConfig
from shared.models.tokenizer import TextTokenizer

__all__ = ["MEDIA_TYPE", "METADATA_KEY", "CalibrationStats", "CalibrationConfig", "CalibrationResult", "LinearStats",
           "calibrate", "calibrate_tokens", "calibrate_to_file", "write_stats", "site_statistics", "sequences",
           "model_sites", "tokenizer_of"]          # the file format and its reader live in stats_file.py

DATASET_FIELD = "calibration.dataset"
HESSIAN_MODES = ("auto", "all", "none")
AUTO_HESSIAN_MAX_FEATURES = 8192          # above this a float32 Hessian is over 256 MiB per site


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    samples: int = 128                    # sequences; the papers use 128
    sequence_length: int = 512            # tokens per sequence, BOS included; the papers use 2048
    hessians: str = "auto"                # "auto": sites with in_features ≤ 8192; "all"; "none"

    def validated(self) -> "CalibrationConfig":
        if not 1 <= self.samples <= 4096:
            raise InvalidArgument(f"calibration.samples must be in [1, 4096], got {self.samples}",
                                  field="calibration.samples")
        if not 8 <= self.sequence_length <= 8192:
            raise InvalidArgument(f"calibration.sequence_length must be in [8, 8192], got {self.sequence_length}",
                                  field="calibration.sequence_length")
        if self.hessians not in HESSIAN_MODES:
            raise InvalidArgument(f"calibration.hessians must be one of {HESSIAN_MODES}, got {self.hessians!r}",
                                  field="calibration.hessians")
        return self


@dataclasses.dataclass(frozen=True)
class LinearStats:
    weight: str
    abs_max: np.ndarray        # (in_features,)
    mean_abs: np.ndarray       # (in_features,)


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """Every site's statistics in memory (for small models and tests; the servicer streams to a file)."""
    config: CalibrationConfig
    tokens: int
    sites: list[tuple[Site, SiteSummary]]

    @property
    def layers(self) -> list[LinearStats]:
        return [LinearStats(weight, summary.abs_max, summary.mean_abs)
                for site, summary in self.sites for weight in site.weights]


def model_sites(config: DecoderConfig, hessians: str = "auto") -> list[Site]:
    """Input sites of every block, in the order calibration produces them."""
    shapes = config.tensor_shapes()
    sites = []
    for index in range(config.num_hidden_layers):
        for group in INPUT_GROUPS:
            weights = tuple(f"{block_prefix(index)}{module}.weight" for module in group)
            in_features = shapes[weights[0]][1]
            keep = hessians == "all" or (hessians == "auto" and in_features <= AUTO_HESSIAN_MAX_FEATURES)
            sites.append(Site(f"{block_prefix(index)}{group[0]}", weights, in_features, keep))
    return sites


def sequences(tokens: Sequence[int], bos_id: int, config: CalibrationConfig) -> list[list[int]]:
    body = config.sequence_length - 1
    needed = config.samples * body
    if len(tokens) < needed:
        raise InvalidArgument(f"{DATASET_FIELD} has {len(tokens)} tokens; {config.samples} samples of "
                              f"{config.sequence_length} need {needed}", reason="INSUFFICIENT_DATA",
                              field=DATASET_FIELD)
    return [[bos_id] + list(tokens[i * body:(i + 1) * body]) for i in range(config.samples)]


def tokenizer_of(model: ModelDir) -> TextTokenizer:
    tokenizer = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    if tokenizer.bos_id is None:
        raise InvalidArgument("the model's tokenizer has no BOS token", reason="UNSUPPORTED_OP", field="model")
    return tokenizer


def site_statistics(model: ModelDir, tokens: Sequence[int], config: CalibrationConfig,
                    batch: int = BATCH) -> Iterator[tuple[Site, SiteSummary]]:
    """Each site's statistics, block after block. The data is checked now; the blocks run as the
    returned generator is consumed (block k+1 when asked for)."""
    config = config.validated()
    if model.config.architecture not in BLOCKWISE_ARCHITECTURES:
        raise FailedPrecondition(f"calibration runs the model block by block, which supports "
                                 f"{', '.join(BLOCKWISE_ARCHITECTURES)}, not architecture "
                                 f"{model.config.architecture!r}", reason="UNSUPPORTED_ARCH", field="model")
    bos_id = tokenizer_of(model).bos_id
    chunks = sequences(tokens, bos_id, config)
    check_token_ids([bos_id] + list(tokens[:config.samples * (config.sequence_length - 1)]),
                    model.config.vocab_size, DATASET_FIELD)
    return _run_blocks(model, torch.tensor(chunks, dtype=torch.int64), config, batch)


def _run_blocks(model: ModelDir, chunks: torch.Tensor, config: CalibrationConfig,
                batch: int) -> Iterator[tuple[Site, SiteSummary]]:
    sites = model_sites(model.config, config.hessians)
    per_block = len(INPUT_GROUPS)
    rows = config.samples * config.sequence_length
    hidden = embed(model, chunks)                                      # (samples, T, hidden)
    cos, sin = rotary(model.config, config.sequence_length)           # (T, head_dim) each
    for index in range(model.config.num_hidden_layers):
        block_sites = sites[index * per_block:(index + 1) * per_block]
        accumulators = {group[0]: SiteAccumulator(site.in_features, rows, hessian=site.hessian)
                        for group, site in zip(INPUT_GROUPS, block_sites)}
        block = load_block(model.config, index, model.tensor)
        observe = lambda name, x: accumulators[name].add(x)
        with InputCapture(block, list(accumulators), observe), torch.inference_mode():
            for part in batches(config.samples, batch):
                hidden[part] = block(hidden[part], cos, sin)       # in place: one copy of the hidden states
        del block
        for group, site in zip(INPUT_GROUPS, block_sites):
            yield site, accumulators.pop(group[0]).summary()


def calibrate_tokens(model: ModelDir, tokens: Sequence[int], config: CalibrationConfig) -> CalibrationResult:
    config = config.validated()
    return CalibrationResult(config, config.samples * config.sequence_length,
                             list(site_statistics(model, tokens, config)))


def calibrate(model: ModelDir, text: str, config: CalibrationConfig) -> CalibrationResult:
    """Statistics of `text`, tokenized with the model's tokenizer, held in memory."""
    return calibrate_tokens(model, tokenizer_of(model).encode(text), config)


def calibrate_to_file(model: ModelDir, tokens: Sequence[int], config: CalibrationConfig, path: Path,
                      provenance: dict) -> int:
    """Calibrates and writes the statistics file block by block. provenance: model and dataset sha256.
    Returns the number of tokens run through the model."""
    config = config.validated()
    statistics = site_statistics(model, tokens, config)                # checks the data before writing
    write_stats_file(path, model_sites(model.config, config.hessians), statistics,
                     _header(config, provenance))
    return config.samples * config.sequence_length


def write_stats(path: Path, result: CalibrationResult, provenance: dict) -> None:
    """Writes an in-memory result. provenance: model and dataset sha256."""
    write_stats_file(path, [site for site, _ in result.sites], iter(result.sites), _header(result.config, provenance))


def _header(config: CalibrationConfig, provenance: dict) -> dict:
    return {**provenance, "samples": config.samples, "sequence_length": config.sequence_length,
            "tokens": config.samples * config.sequence_length, "hessians": config.hessians}
