"""Running statistics of one input site (the input that a group of linears shares), fed batch by batch.

For the site's inputs x (rows: tokens, columns: the in_features channels c), after all batches:
    abs_max[c]  = max |x_c|
    mean_abs[c] = E[|x_c|]
    sq_mean[c]  = E[x_c²]             the importance matrix (llama.cpp's imatrix), = diag(H)
    H           = E[x xᵀ] = XᵀX / rows  (in, in), optional
    min, max    of every value of the site, and the 99th, 99.9th and 99.99th percentiles of |x| over
                every value, computed exactly (numpy's default "linear" interpolation between order
                statistics) from the largest values, which are all a top percentile needs.
|x_c| and x_c² are summed in float64; XᵀX is a float32 matmul per batch, added into a float64 sum.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

PERCENTILES = (99.0, 99.9, 99.99)
RANGE_KEYS = ("min", "max") + tuple(f"p{q:g}" for q in PERCENTILES)     # min, max, p99, p99.9, p99.99


@dataclasses.dataclass(frozen=True)
class SiteSummary:
    abs_max: np.ndarray            # (in,) float32
    mean_abs: np.ndarray           # (in,) float32
    sq_mean: np.ndarray            # (in,) float32
    value_range: np.ndarray        # (len(RANGE_KEYS),) float32: min, max, p99, p99.9, p99.99 of |x|
    hessian: np.ndarray | None     # (in, in) float32 or None


class LargestValues:
    """The `count` largest of a stream of values (as a multiset), in O(count + batch) memory.

    Once `count` values are held, a new value at or below the smallest held one cannot change the
    answer and is dropped by one comparison; the buffer is cut back to `count` when it doubles."""

    def __init__(self, count: int):
        self.count = count
        self.kept = torch.empty(0)
        self.floor = -math.inf             # the count-th largest so far, once known

    def add(self, values: torch.Tensor) -> None:
        if self.floor > -math.inf:
            values = values[values > self.floor]
        self.kept = torch.cat((self.kept, values))
        if self.kept.numel() >= 2 * self.count or (self.floor == -math.inf and self.kept.numel() >= self.count):
            self._cut()

    def _cut(self) -> None:
        values = self.kept.numpy()
        start = len(values) - self.count       # introselect: several times faster than torch.topk on CPU
        self.kept = torch.from_numpy(np.partition(values, start)[start:].copy())
        self.floor = float(self.kept[0])       # the partition puts the count-th largest first

    def descending(self) -> torch.Tensor:
        return torch.sort(self.kept, descending=True).values[:self.count]


def percentile_from_largest(largest: np.ndarray, total: int, q: float) -> float:
    """numpy's percentile(values, q) ("linear") from the values' largest ones, descending, float64."""
    h = (total - 1) * (q / 100)
    low = math.floor(h)
    high = min(low + 1, total - 1)
    a, b = float(largest[total - 1 - low]), float(largest[total - 1 - high])   # ascending index i = rank n-1-i
    return a + (b - a) * (h - low)


def values_for_percentiles(total: int) -> int:
    """How many of the largest values the percentiles in PERCENTILES need among `total` values."""
    return total - math.floor((total - 1) * (min(PERCENTILES) / 100))


class SiteAccumulator:
    def __init__(self, in_features: int, expected_rows: int, *, hessian: bool):
        self.in_features = in_features
        self.expected_values = expected_rows * in_features
        self.rows = 0
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64)
        self.abs_max = torch.zeros(in_features, dtype=torch.float32)
        self.minimum, self.maximum = math.inf, -math.inf
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64) if hessian else None
        self.largest = LargestValues(values_for_percentiles(self.expected_values))

    def add(self, x: torch.Tensor) -> None:
        """x: (rows, in_features) float32, one batch of the site's inputs."""
        x = x.float()
        magnitude = x.abs()                                                  # (rows, in)
        self.abs_sum += magnitude.sum(0, dtype=torch.float64)
        self.sq_sum += x.square().sum(0, dtype=torch.float64)                 # float32 squares, float64 sum
        self.abs_max = torch.maximum(self.abs_max, magnitude.amax(0))
        self.minimum = min(self.minimum, float(x.min()))
        self.maximum = max(self.maximum, float(x.max()))
        if self.xtx is not None:
            self.xtx += (x.T @ x).double()                                   # (in, in)
        self.largest.add(magnitude.reshape(-1))
        self.rows += x.shape[0]

    def summary(self) -> SiteSummary:
        total = self.rows * self.in_features
        if total != self.expected_values:          # the percentile buffer was sized for expected_values
            raise RuntimeError(f"site saw {total} values, expected {self.expected_values}")
        largest = self.largest.descending().double().numpy()
        value_range = [self.minimum, self.maximum] + [percentile_from_largest(largest, total, q) for q in PERCENTILES]
        hessian = None
        if self.xtx is not None:
            hessian = ((self.xtx + self.xtx.T) / (2 * self.rows)).float().numpy()   # exactly symmetric
        return SiteSummary(self.abs_max.numpy().copy(), (self.abs_sum / self.rows).float().numpy(),
                           (self.sq_sum / self.rows).float().numpy(), np.asarray(value_range, dtype=np.float32),
                           hessian)
