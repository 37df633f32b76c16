"""Deployment memory arithmetic (seed chapter 0): weight memory = parameters × bits / 8.

Sizes are reported in GiB (2^30 bytes), as nvidia-smi does. The seed says it uses GiB throughout, but its
table is decimal (70B at 32 bits = 280 GB) while its code prints GiB (260.8). shared/planner builds on this.
"""
from __future__ import annotations

GIB = 1 << 30


def weight_bytes(parameters: float, bits_per_weight: float) -> float:
    """Bytes to store `parameters` weights at `bits_per_weight` (scales/zeros included if counted in bits)."""
    return parameters * bits_per_weight / 8


def weight_memory_gib(parameters: float, bits_per_weight: float) -> float:
    return weight_bytes(parameters, bits_per_weight) / GIB


def group_overhead_bits(group_size: int, scale_bits: int = 16, zero_bits: int = 0) -> float:
    """Extra bits per weight for one scale (and zero point) per group: fp16 per 128 → 0.125 bit."""
    return (scale_bits + zero_bits) / group_size
