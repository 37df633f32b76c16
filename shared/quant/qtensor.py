"""A quantized 2-D tensor (codes, scales, zero points on a Grid) and its packed storage form."""
from __future__ import annotations

import dataclasses

import numpy as np

from shared.quant.grids import Granularity, Grid


@dataclasses.dataclass
class QuantizedTensor:
    grid: Grid
    codes: np.ndarray            # (rows, columns) uint8, unsigned codes
    scales: np.ndarray           # (rows, groups) float16; (1, 1) per tensor
    zeros: np.ndarray | None     # (rows, groups) uint8 for asymmetric grids, else None

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def zero_points(self) -> np.ndarray:
        if self.zeros is not None:
            return self.zeros
        return np.full(self.scales.shape, 1 << (self.grid.bits - 1), dtype=np.uint8)

    def dequantize(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """ŵ = (code − zero) · scale for rows [start, stop), as float32 (rows, columns)."""
        rows, columns = self.codes.shape
        stop = rows if stop is None else stop
        codes = self.codes[start:stop].astype(np.float32)
        if self.grid.granularity is Granularity.PER_TENSOR:
            return (codes - np.float32(self.zero_points()[0, 0])) * np.float32(self.scales[0, 0])
        group = columns if self.grid.granularity is Granularity.PER_CHANNEL else self.grid.group_size
        codes = codes.reshape(stop - start, columns // group, group)
        zeros = self.zero_points()[start:stop].astype(np.float32)[..., None]
        scales = self.scales[start:stop].astype(np.float32)[..., None]
        return ((codes - zeros) * scales).reshape(stop - start, columns)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, columns) uint8 codes -> storage: 4-bit codes two per byte (element 2i in the low nibble)."""
    if bits == 8:
        return codes
    if bits == 4:
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    raise ValueError(f"no packing for {bits}-bit codes")


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    if bits == 4:
        out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
        out[:, 0::2] = packed & 0x0F
        out[:, 1::2] = packed >> 4
        return out
    raise ValueError(f"no packing for {bits}-bit codes")


def packed_shape(rows: int, columns: int, bits: int) -> tuple[int, int]:
    return (rows, columns * bits // 8)


def scales_shape(rows: int, columns: int, grid: Grid) -> tuple[int, int]:
    if grid.granularity is Granularity.PER_TENSOR:
        return (1, 1)
    return (rows, columns // grid.group_columns(columns))
