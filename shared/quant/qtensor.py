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
    """(rows, columns) uint8 codes -> storage: codes of up to 4 bits two per byte (element 2i in the
    low nibble), wider codes one per byte."""
    if bits > 4:
        return codes
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits > 4:
        return packed
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def packed_shape(rows: int, columns: int, bits: int) -> tuple[int, int]:
    return (rows, columns // 2 if bits <= 4 else columns)


def scales_shape(rows: int, columns: int, grid: Grid) -> tuple[int, int]:
    if grid.granularity is Granularity.PER_TENSOR:
        return (1, 1)
    return (rows, columns // grid.group_columns(columns))


@dataclasses.dataclass
class GgufTensor:
    """A weight in one of llama.cpp's block types: the exact bytes a GGUF file stores, row by row."""
    grid: Grid
    shape: tuple[int, int]       # (rows, columns) of the weight
    data: np.ndarray             # (rows, columns / block · bytes_per_block) uint8

    def dequantize(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 rows [start, stop), decoded by gguf-py (bit-identical to llama.cpp's dequantizers)."""
        import gguf
        stop = self.shape[0] if stop is None else stop
        qtype = getattr(gguf.GGMLQuantizationType, self.grid.gguf_type.upper())
        return gguf.quants.dequantize(self.data[start:stop], qtype).astype(np.float32, copy=False)

    def rows(self, order: np.ndarray) -> "GgufTensor":
        return GgufTensor(self.grid, self.shape, self.data[order])


def gguf_row_bytes(grid: Grid, columns: int) -> int:
    from shared.quant.grids import GGUF_BLOCKS
    block, nbytes = GGUF_BLOCKS[grid.gguf_type]
    return columns // block * nbytes


def assemble(grid: Grid, codec, fits: list, codes: np.ndarray) -> "QuantizedTensor | GgufTensor":
    """Per-block fits (in column order) and the (rows, columns) codes -> the stored tensor."""
    rows, columns = codes.shape
    if grid.gguf_type:
        data = np.concatenate([codec.encode(fit, codes[:, i * codec.block:(i + 1) * codec.block])
                               for i, fit in enumerate(fits)], axis=1)
        return GgufTensor(grid, (rows, columns), np.ascontiguousarray(data))
    if grid.granularity is Granularity.PER_TENSOR:
        return QuantizedTensor(grid, codes, fits[0].stored["scale"][:1, :1].copy(),
                               None if grid.symmetric else fits[0].stored["zero"][:1, :1].copy())
    scales = np.concatenate([f.stored["scale"] for f in fits], axis=1)
    zeros = None if grid.symmetric else np.concatenate([f.stored["zero"] for f in fits], axis=1)
    return QuantizedTensor(grid, codes, scales, zeros)
