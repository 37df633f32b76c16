"""Quantization grids and recipes.

A grid says which integer codes a weight may take and how scales are shared:
bits, granularity (per tensor / channel / group along the input dimension), symmetric or not, and
the scale rule. `ScaleRule.GGML` reproduces llama.cpp's reference quantizers exactly (Q8_0:
d = amax/127; Q4_0: d = max/-8 with the signed value of largest magnitude), so weights quantized
here ship as native GGUF blocks bit-identical to llama.cpp's own.

Codes are stored unsigned: symmetric grids add 2^(bits-1) (so Q4_0's nibble is the code itself),
asymmetric grids carry an integer zero point per group. Dequantization is always
ŵ = (code − zero) · scale, with zero = 2^(bits-1) for symmetric grids.
"""
from __future__ import annotations

import dataclasses
import enum

from shared.errors import InvalidArgument


class Granularity(enum.Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"


class ScaleRule(enum.Enum):
    MINMAX = "minmax"      # symmetric: amax / (2^(b-1) - 1); asymmetric: (max - min) / (2^b - 1)
    GGML = "ggml"          # llama.cpp's reference quantizer for the named block type


class Method(enum.Enum):
    NONE = "none"
    RTN = "rtn"


@dataclasses.dataclass(frozen=True)
class Grid:
    bits: int
    granularity: Granularity
    group_size: int = 0              # weights per group along the input dim; only for PER_GROUP
    symmetric: bool = True
    rule: ScaleRule = ScaleRule.MINMAX
    gguf_type: str = ""              # the llama.cpp block type this grid is, if any

    @property
    def name(self) -> str:
        if self.gguf_type:
            return self.gguf_type
        where = f"g{self.group_size}" if self.granularity is Granularity.PER_GROUP else self.granularity.value
        return f"int{self.bits}/{where}/{'sym' if self.symmetric else 'asym'}"

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def group_columns(self, columns: int) -> int:
        """Columns per scale for a row of `columns` weights."""
        if self.granularity is Granularity.PER_GROUP:
            return self.group_size
        return columns

    def check_shape(self, rows: int, columns: int, tensor: str = "") -> None:
        if self.granularity is Granularity.PER_GROUP and columns % self.group_size:
            raise InvalidArgument(
                f"group_size {self.group_size} does not divide the {columns} input columns of {tensor or 'the tensor'}",
                reason="UNSUPPORTED_OP", field="quantization.group_size")


GGUF_GRIDS = {
    "q8_0": Grid(8, Granularity.PER_GROUP, 32, True, ScaleRule.GGML, "q8_0"),
    "q4_0": Grid(4, Granularity.PER_GROUP, 32, True, ScaleRule.GGML, "q4_0"),
}
FLOAT_TYPES = ("f32", "f16")


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """A weight-quantization recipe; mirrors edgeforge.v1.QuantizationConfig field for field."""
    method: Method = Method.RTN
    gguf_type: str = ""
    bits: int = 0
    granularity: Granularity | None = None
    group_size: int = 0
    symmetric: bool = True

    def validated(self) -> "QuantizationConfig":
        """Returns self after checking every field; raises InvalidArgument naming the field."""
        if self.gguf_type:
            known = sorted(GGUF_GRIDS) + list(FLOAT_TYPES)
            if self.gguf_type not in known:
                raise InvalidArgument(f"quantization.type {self.gguf_type!r} is not one of {known}",
                                      field="quantization.type")
            if self.bits or self.granularity or self.group_size or not self.symmetric:
                raise InvalidArgument("quantization.type names a llama.cpp grid; leave bits/granularity/"
                                      "group_size/symmetric unset", field="quantization.type")
            if self.gguf_type in FLOAT_TYPES and self.method is not Method.NONE:
                raise InvalidArgument(f"type {self.gguf_type} is a float type; use method: none",
                                      field="quantization.method")
            if self.gguf_type in GGUF_GRIDS and self.method is not Method.RTN:
                raise InvalidArgument(f"type {self.gguf_type} needs method: rtn at this version",
                                      field="quantization.method")
            return self
        if self.method is Method.NONE:
            if self.bits or self.granularity or self.group_size:
                raise InvalidArgument("method none takes no bits/granularity/group_size", field="quantization")
            return self
        if self.bits not in (4, 8):
            raise InvalidArgument(f"quantization.bits must be 4 or 8, got {self.bits}", field="quantization.bits")
        if self.granularity is None:
            raise InvalidArgument("quantization.granularity is required (per_tensor, per_channel or per_group)",
                                  field="quantization.granularity")
        if self.granularity is Granularity.PER_GROUP:
            if self.group_size not in (32, 64, 128):
                raise InvalidArgument(f"quantization.group_size must be 32, 64 or 128, got {self.group_size}",
                                      field="quantization.group_size")
        elif self.group_size:
            raise InvalidArgument("quantization.group_size is only valid with granularity per_group",
                                  field="quantization.group_size")
        return self

    def grid(self) -> Grid | None:
        """The grid for linear weights; None for float recipes."""
        if self.gguf_type in GGUF_GRIDS:
            return GGUF_GRIDS[self.gguf_type]
        if self.method is Method.NONE or self.gguf_type:
            return None
        return Grid(self.bits, self.granularity, self.group_size, self.symmetric)

    def to_dict(self) -> dict:
        out: dict = {"method": self.method.value}
        if self.gguf_type:
            out["type"] = self.gguf_type
        if self.bits:
            out.update(bits=self.bits, granularity=self.granularity.value, symmetric=self.symmetric)
        if self.group_size:
            out["group_size"] = self.group_size
        return out
