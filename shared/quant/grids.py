"""Quantization grids and recipes.

A grid says which integer codes a weight may take and how scales are shared: bits, granularity
(per tensor / channel / group along the input dimension), symmetric or not, and the scale rule.
Every grid — generic integer grids and llama.cpp's GGUF block types alike — is the affine family

    ŵ = q · scale − offset,   q ∈ [0, 2^bits − 1],

with one (scale, offset) per sub-block of consecutive input columns (`shared/quant/codecs.py`).
Generic symmetric grids store codes offset by 2^(bits-1) (offset = 2^(bits-1)·scale); asymmetric
ones carry an integer zero point per group (offset = zero·scale). GGUF grids store llama.cpp's own
block bytes, so GPTQ/AWQ-optimised weights ship as native GGUF.
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
    MINMAX = "minmax"          # symmetric: amax / (2^(b-1) - 1); asymmetric: (max - min) / (2^b - 1)
    PERCENTILE = "percentile"  # MINMAX of the percentile-clipped range
    MSE = "mse"                # grid search of the scale minimising (weighted) squared error
    GGML = "ggml"              # llama.cpp's reference quantizer for the named block type


class Method(enum.Enum):
    NONE = "none"
    RTN = "rtn"
    IMATRIX = "imatrix"
    GPTQ = "gptq"
    AWQ = "awq"


CALIBRATED_METHODS = (Method.IMATRIX, Method.GPTQ, Method.AWQ)


@dataclasses.dataclass(frozen=True)
class Grid:
    bits: int
    granularity: Granularity
    group_size: int = 0              # weights per group along the input dim; only for PER_GROUP
    symmetric: bool = True
    rule: ScaleRule = ScaleRule.MINMAX
    gguf_type: str = ""              # the llama.cpp block type this grid is, if any
    percentile: float = 99.9         # for ScaleRule.PERCENTILE

    @property
    def name(self) -> str:
        if self.gguf_type:
            return self.gguf_type
        where = f"g{self.group_size}" if self.granularity is Granularity.PER_GROUP else self.granularity.value
        rule = "" if self.rule is ScaleRule.MINMAX else f"/{self.rule.value}"
        return f"int{self.bits}/{where}/{'sym' if self.symmetric else 'asym'}{rule}"

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def group_columns(self, columns: int) -> int:
        """Columns per scale for a row of `columns` weights."""
        if self.granularity is Granularity.PER_GROUP:
            return self.group_size
        return columns

    def block_columns(self, columns: int) -> int:
        """Columns fitted together: a GGUF (super-)block, a group, or the whole row."""
        if self.gguf_type:
            return GGUF_BLOCKS[self.gguf_type][0]
        return self.group_columns(columns)

    def check_shape(self, rows: int, columns: int, tensor: str = "") -> None:
        block = GGUF_BLOCKS[self.gguf_type][0] if self.gguf_type else (
            self.group_size if self.granularity is Granularity.PER_GROUP else 1)
        if columns % block:
            what = f"type {self.gguf_type}'s {block}-wide blocks" if self.gguf_type else f"group_size {block}"
            raise InvalidArgument(f"{what} do not divide the {columns} input columns of {tensor or 'the tensor'}",
                                  reason="UNSUPPORTED_OP",
                                  field="quantization.type" if self.gguf_type else "quantization.group_size")

    def bits_per_weight(self, columns: int) -> float:
        """Storage per weight, scales and zero points included."""
        if self.gguf_type:
            block, nbytes = GGUF_BLOCKS[self.gguf_type]
            return 8.0 * nbytes / block
        if self.granularity is Granularity.PER_TENSOR:
            return float(self.bits)
        per_group = 16 + (0 if self.symmetric else 8)                   # float16 scale (+ uint8 zero)
        return self.bits + per_group / self.group_columns(columns)


# llama.cpp block types: (weights per block, bytes per block), ggml-common.h.
GGUF_BLOCKS = {
    "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24),
    "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
}
GGUF_BITS = {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "q2_k": 2, "q3_k": 3, "q4_k": 4,
             "q5_k": 5, "q6_k": 6}
GGUF_GRIDS = {name: Grid(GGUF_BITS[name], Granularity.PER_GROUP, GGUF_BLOCKS[name][0],
                         name in ("q8_0", "q4_0", "q5_0", "q3_k", "q6_k"), ScaleRule.GGML, name)
              for name in GGUF_BLOCKS}
GGUF_MIXES = ("q4_k_m", "q5_k_m")          # llama.cpp's per-tensor type mixes (shared/quant/rules.py)
FLOAT_TYPES = ("f32", "f16", "bf16")          # bf16: GGUF only (the coordinator refuses it elsewhere)
GGUF_TYPES = tuple(GGUF_GRIDS) + GGUF_MIXES


@dataclasses.dataclass(frozen=True)
class GptqOptions:
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = True
    sequential: bool = True


@dataclasses.dataclass(frozen=True)
class AwqOptions:
    grid: int = 20
    clip: bool = True


@dataclasses.dataclass(frozen=True)
class MixedPrecision:
    options: tuple[str, ...]
    max_bits_per_weight: float


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """A weight-quantization recipe; mirrors edgeforge.v1.QuantizationConfig field for field."""
    method: Method = Method.RTN
    gguf_type: str = ""
    bits: int = 0
    granularity: Granularity | None = None
    group_size: int = 0
    symmetric: bool = True
    scale: ScaleRule = ScaleRule.MINMAX
    percentile: float = 99.9
    gptq: GptqOptions = GptqOptions()
    awq: AwqOptions = AwqOptions()
    mixed: MixedPrecision | None = None

    def validated(self) -> "QuantizationConfig":
        """Returns self after checking every field; raises InvalidArgument naming the field."""
        self._check_options()
        if self.gguf_type:
            known = list(GGUF_TYPES) + list(FLOAT_TYPES)
            if self.gguf_type not in known:
                raise InvalidArgument(f"quantization.type {self.gguf_type!r} is not one of {known}",
                                      field="quantization.type")
            if self.bits or self.granularity or self.group_size or not self.symmetric \
                    or self.scale is not ScaleRule.MINMAX:
                raise InvalidArgument("quantization.type names a llama.cpp grid; leave bits/granularity/"
                                      "group_size/symmetric/scale unset", field="quantization.type")
            if self.gguf_type in FLOAT_TYPES and self.method is not Method.NONE:
                raise InvalidArgument(f"type {self.gguf_type} is a float type; use method: none",
                                      field="quantization.method")
            if self.gguf_type in GGUF_TYPES and self.method is Method.NONE:
                raise InvalidArgument(f"type {self.gguf_type} is quantized; give a method (rtn, imatrix, gptq, awq)",
                                      field="quantization.method")
            self._check_mixed()
            return self
        if self.method is Method.NONE:
            if self.bits or self.granularity or self.group_size or self.mixed:
                raise InvalidArgument("method none takes no bits/granularity/group_size/mixed_precision",
                                      field="quantization")
            return self
        if not 2 <= self.bits <= 8:
            raise InvalidArgument(f"quantization.bits must be in [2, 8], got {self.bits}", field="quantization.bits")
        if self.granularity is None:
            raise InvalidArgument("quantization.granularity is required (per_tensor, per_channel or per_group)",
                                  field="quantization.granularity")
        if self.granularity is Granularity.PER_GROUP:
            if not 2 <= self.group_size <= 1 << 16:
                raise InvalidArgument(f"quantization.group_size must be in [2, 65536] with per_group, got "
                                      f"{self.group_size}", field="quantization.group_size")
        elif self.group_size:
            raise InvalidArgument("quantization.group_size is only valid with granularity per_group",
                                  field="quantization.group_size")
        if self.scale is ScaleRule.GGML:
            raise InvalidArgument("scale ggml belongs to the GGUF types; name quantization.type instead",
                                  field="quantization.scale")
        if self.scale is ScaleRule.PERCENTILE and not 50.0 < self.percentile <= 100.0:
            raise InvalidArgument(f"quantization.percentile must be in (50, 100], got {self.percentile}",
                                  field="quantization.percentile")
        self._check_mixed()
        return self

    def _check_options(self) -> None:
        g = self.gptq
        if not 0.0 < g.damp_percent <= 1.0:
            raise InvalidArgument(f"quantization.gptq.damp_percent must be in (0, 1], got {g.damp_percent}",
                                  field="quantization.gptq.damp_percent")
        if not 1 <= g.block_size <= 4096:
            raise InvalidArgument(f"quantization.gptq.block_size must be in [1, 4096], got {g.block_size}",
                                  field="quantization.gptq.block_size")
        if not 2 <= self.awq.grid <= 100:
            raise InvalidArgument(f"quantization.awq.grid must be in [2, 100], got {self.awq.grid}",
                                  field="quantization.awq.grid")

    def _check_mixed(self) -> None:
        if self.mixed is None:
            return
        if self.method is Method.AWQ:
            raise InvalidArgument("mixed_precision is not available with method awq (its scales are searched "
                                  "for one grid); use rtn, imatrix or gptq", field="quantization.mixed_precision")
        if len(self.mixed.options) < 2:
            raise InvalidArgument("mixed_precision.options needs at least two grids",
                                  field="quantization.mixed_precision.options")
        for option in self.mixed.options:
            if self.gguf_type:
                if option not in GGUF_GRIDS:
                    raise InvalidArgument(f"mixed_precision option {option!r} is not a GGUF block type "
                                          f"({', '.join(GGUF_GRIDS)})", field="quantization.mixed_precision.options")
            elif not (option.isdigit() and 2 <= int(option) <= 8):
                raise InvalidArgument(f"mixed_precision option {option!r} must be a bit width 2-8 for a generic "
                                      "grid", field="quantization.mixed_precision.options")
        if self.mixed.max_bits_per_weight <= 0:
            raise InvalidArgument("mixed_precision.max_bits_per_weight must be positive",
                                  field="quantization.mixed_precision.max_bits_per_weight")

    @property
    def calibrated(self) -> bool:
        """Whether the method needs calibration data."""
        return self.method in CALIBRATED_METHODS or self.mixed is not None

    def grid(self) -> Grid | None:
        """The grid for linear weights (a mix: its base type); None for float recipes."""
        if self.gguf_type in GGUF_GRIDS:
            return GGUF_GRIDS[self.gguf_type]
        if self.gguf_type in GGUF_MIXES:
            return GGUF_GRIDS[self.gguf_type[:4]]
        if self.method is Method.NONE or self.gguf_type:
            return None
        return Grid(self.bits, self.granularity, self.group_size, self.symmetric, self.scale,
                    percentile=self.percentile)

    def option_grid(self, option: str) -> Grid:
        """A mixed-precision option as a grid."""
        if self.gguf_type:
            return GGUF_GRIDS[option]
        return dataclasses.replace(self.grid(), bits=int(option))

    def to_dict(self) -> dict:
        out: dict = {"method": self.method.value}
        if self.gguf_type:
            out["type"] = self.gguf_type
        if self.bits:
            out.update(bits=self.bits, granularity=self.granularity.value, symmetric=self.symmetric)
            if self.scale is not ScaleRule.MINMAX:
                out["scale"] = self.scale.value
            if self.scale is ScaleRule.PERCENTILE:
                out["percentile"] = self.percentile
        if self.group_size:
            out["group_size"] = self.group_size
        if self.method is Method.GPTQ:
            out["gptq"] = dataclasses.asdict(self.gptq)
        if self.method is Method.AWQ:
            out["awq"] = dataclasses.asdict(self.awq)
        if self.mixed is not None:
            out["mixed_precision"] = {"options": list(self.mixed.options),
                                      "max_bits_per_weight": self.mixed.max_bits_per_weight}
        return out
