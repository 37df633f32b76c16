"""Deployment memory arithmetic: the seed's table and the per-group scale overhead."""
from __future__ import annotations

import pytest

from shared.memory import GIB, group_overhead_bits, weight_bytes, weight_memory_gib

SEVENTY_B = 70e9


@pytest.mark.parametrize("bits, gib", [(32, 260.8), (16, 130.4), (8, 65.2), (4, 32.6)])
def test_seed_table_70b(bits, gib):
    assert round(weight_memory_gib(SEVENTY_B, bits), 1) == gib


def test_gib_is_binary():
    assert GIB == 2 ** 30
    assert weight_memory_gib(GIB, 8) == 1.0


def test_seed_table_is_in_gib_not_gb():
    assert weight_bytes(SEVENTY_B, 32) == 280e9            # 280 GB ...
    assert weight_memory_gib(SEVENTY_B, 32) < 261          # ... is 260.8 GiB


def test_weight_bytes_scales_with_bits():
    assert weight_bytes(1000, 4) == 500
    assert weight_bytes(1000, 4.5) == 562.5
    assert weight_bytes(0, 16) == 0


def test_group_overhead_bits():
    assert group_overhead_bits(128) == 0.125
    assert group_overhead_bits(32) == 0.5
    assert group_overhead_bits(64, scale_bits=16, zero_bits=16) == 0.5
    assert group_overhead_bits(128, scale_bits=32) == 0.25


def test_q4_with_group_scales_for_70b():
    bits = 4 + group_overhead_bits(128)
    assert round(weight_memory_gib(SEVENTY_B, bits), 1) == 33.6
