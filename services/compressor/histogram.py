"""Weight histograms for the build report: each tensor's float weights before a step changed them,
with the step's cut (proto: edgeforge.v1.WeightHistogram, whose comments define every field).

A histogram is computed where the tensor already is in memory — the quantizer's or pruner's own
copy — so it costs one pass over the tensor and no extra read. Bins are numpy's: `bins` equal bins
over [min, max], each [left, right) but the last, which includes max.

Tensors the streaming quantizer reads in row chunks (larger than one chunk) are never whole in
memory, and their range is unknown until the last chunk; `HistogramSketch` counts them exactly by
float32 value rounded down to 12 significant bits (the top 20 bits of the float), a count that
chunks add up, and bins those counts once the range is known. Only values within 2⁻¹¹ (relative)
of a bin edge can land in the neighbouring bin; min, max and the total count are exact.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

BINS = 48
NONE, MAGNITUDE, LARGEST_PRUNED = "none", "magnitude", "largest pruned magnitude"   # threshold_kind values


@dataclasses.dataclass(frozen=True)
class WeightHistogram:
    tensor: str
    low: float                        # min weight, the first bin's left edge
    high: float                       # max weight, the last bin's right edge
    counts: tuple[int, ...]           # weights per bin; they sum to the tensor's element count
    threshold: float = 0.0            # in the weights' units; its meaning is threshold_kind's
    threshold_kind: str = NONE
    pruned_fraction: float = 0.0      # share of the tensor's weights the step set to zero (or removed)


def _as_numpy(weight: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(weight, torch.Tensor):               # a view for CPU float32; one tensor's copy otherwise
        weight = weight.detach().to("cpu", torch.float32).numpy()
    return weight.reshape(-1)


def weight_histogram(tensor: str, weight: np.ndarray | torch.Tensor, bins: int = BINS) -> WeightHistogram:
    """The exact histogram of one tensor's values (numpy works through it in blocks: no full-size
    temporaries). Non-finite weights are left out of the counts and the range."""
    values = _as_numpy(weight)
    if values.size and not np.isfinite(values).all():
        values = values[np.isfinite(values)]
    if not values.size:
        return WeightHistogram(tensor, 0.0, 0.0, (0,) * bins)
    low, high = float(values.min()), float(values.max())
    if low == high:                                    # numpy would widen the range by ±0.5
        return WeightHistogram(tensor, low, high, (values.size,) + (0,) * (bins - 1))
    counts, _ = np.histogram(values, bins=bins, range=(low, high))
    return WeightHistogram(tensor, low, high, tuple(int(c) for c in counts))


def pruning_histogram(tensor: str, before: torch.Tensor, keep: torch.Tensor, threshold_kind: str,
                      bins: int = BINS) -> WeightHistogram:
    """Histogram of `before` (the weights the pruner saw) with the cut of keep-mask `keep` (True =
    kept): MAGNITUDE — the smallest kept |w|; LARGEST_PRUNED — the largest pruned |w|."""
    if tuple(keep.shape) != tuple(before.shape):
        raise ValueError(f"{tensor}: keep-mask {tuple(keep.shape)} does not match the weight {tuple(before.shape)}")
    histogram = weight_histogram(tensor, before, bins)
    keep = keep.to(before.device, torch.bool)
    magnitudes = before.detach().abs().float()
    pruned = before.numel() - int(keep.sum())
    if threshold_kind == MAGNITUDE:
        threshold = float(torch.where(keep, magnitudes, math.inf).min()) if pruned < before.numel() else \
            float(magnitudes.max())                    # all pruned: every weight was below the cut
    elif threshold_kind == LARGEST_PRUNED:
        threshold = float(torch.where(keep, 0.0, magnitudes).max()) if pruned else 0.0
    else:
        raise ValueError(f"{tensor}: threshold_kind must be {MAGNITUDE!r} or {LARGEST_PRUNED!r}, "
                         f"got {threshold_kind!r}")
    return dataclasses.replace(histogram, threshold=threshold, threshold_kind=threshold_kind,
                               pruned_fraction=pruned / before.numel() if before.numel() else 0.0)


def removal_histogram(tensor: str, before: torch.Tensor, kept_elements: int, bins: int = BINS) -> WeightHistogram:
    """Structured pruning: `before` shrank to `kept_elements` (rows, channels, heads removed). The cut
    is on each unit's score, not on one weight's |w|, so threshold_kind is NONE."""
    histogram = weight_histogram(tensor, before, bins)
    removed = 1.0 - kept_elements / before.numel() if before.numel() else 0.0
    return dataclasses.replace(histogram, pruned_fraction=removed)


def global_threshold(histograms: list[WeightHistogram]) -> list[WeightHistogram]:
    """Global magnitude pruning cuts every tensor at one |w|: the smallest kept over all of them
    (each tensor's own smallest kept is at or above it)."""
    kept = [h.threshold for h in histograms if h.pruned_fraction < 1.0]
    if not kept:
        return histograms
    return [dataclasses.replace(h, threshold=min(kept)) for h in histograms]


class HistogramSketch:
    """Exact min, max and counts per 20-bit float32 prefix (sign, exponent, 11 mantissa bits) of a
    tensor seen in chunks; `merge` adds another chunk's sketch. 2²⁰ int64 counters: 8 MiB."""
    SHIFT = 12

    def __init__(self) -> None:
        self.low, self.high = math.inf, -math.inf
        self.counts = np.zeros(1 << (32 - self.SHIFT), dtype=np.int64)

    def add(self, values: np.ndarray) -> "HistogramSketch":
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        values = values[np.isfinite(values)] if not np.isfinite(values).all() else values
        if values.size:
            self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
            self.counts += np.bincount(values.view(np.uint32) >> self.SHIFT, minlength=len(self.counts))
        return self

    def merge(self, other: "HistogramSketch") -> None:
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        self.counts += other.counts

    def histogram(self, tensor: str, bins: int = BINS) -> WeightHistogram:
        """Each prefix's count goes to the bin of the prefix's midpoint value (clamped into [low, high])."""
        present = np.flatnonzero(self.counts)
        if not present.size:
            return WeightHistogram(tensor, 0.0, 0.0, (0,) * bins)
        total = int(self.counts.sum())
        if self.low == self.high:
            return WeightHistogram(tensor, self.low, self.high, (total,) + (0,) * (bins - 1))
        middle = (present.astype(np.uint32) << self.SHIFT | (1 << (self.SHIFT - 1))).view(np.float32)
        counts, _ = np.histogram(np.clip(middle, self.low, self.high), bins=bins, range=(self.low, self.high),
                                 weights=self.counts[present].astype(np.float64))
        return WeightHistogram(tensor, self.low, self.high, tuple(int(round(c)) for c in counts))
