"""The streaming accumulator against numpy on the whole data at once: exact percentiles from the largest
values, float64 sums, and the Hessian."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from services.calibrator.accumulate import (PERCENTILES, LargestValues, SiteAccumulator, percentile_from_largest,
                                            values_for_percentiles)


@pytest.mark.parametrize("total", [1, 2, 99, 100, 101, 12_345])
def test_percentiles_from_the_largest_values_are_exact(total):
    rng = np.random.default_rng(total)
    values = np.abs(rng.standard_t(3, total)).astype(np.float32)
    values[: total // 3] = values[0]                                     # ties
    largest = LargestValues(values_for_percentiles(total))
    for part in np.array_split(rng.permutation(values), max(1, total // 1000)):
        largest.add(torch.from_numpy(part))
    top = largest.descending().double().numpy()
    assert np.array_equal(top, np.sort(values)[::-1][:len(top)].astype(np.float64))
    for q in PERCENTILES:
        assert percentile_from_largest(top, total, q) == pytest.approx(np.percentile(values.astype(np.float64), q),
                                                                       rel=1e-12, abs=1e-12)


def test_site_accumulator_matches_numpy():
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1, (300, 24)) * np.linspace(0.1, 30, 24)).astype(np.float32)    # (rows, in)
    accumulator = SiteAccumulator(24, 300, hessian=True)
    for part in np.array_split(x, 7):
        accumulator.add(torch.from_numpy(part))
    got = accumulator.summary()
    x64 = x.astype(np.float64)
    np.testing.assert_array_equal(got.abs_max, np.abs(x).max(0))
    np.testing.assert_allclose(got.mean_abs, np.abs(x64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(got.sq_mean, (x64 ** 2).mean(0), rtol=1e-6)
    np.testing.assert_allclose(got.hessian, x64.T @ x64 / 300, rtol=1e-5, atol=1e-5)
    expected_range = [x.min(), x.max()] + [np.percentile(np.abs(x64), q) for q in PERCENTILES]
    np.testing.assert_allclose(got.value_range, expected_range, rtol=1e-6)


def test_a_site_that_saw_other_than_the_expected_rows_is_an_error():
    accumulator = SiteAccumulator(4, 10, hessian=False)
    accumulator.add(torch.ones(9, 4))
    with pytest.raises(RuntimeError, match="expected 40"):
        accumulator.summary()
