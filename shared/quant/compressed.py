"""The compressed-model artifact: one safetensors file of quantized weights plus its recipe.

For a quantized weight `W` (HF name) the file holds `W.codes` (uint8, 4-bit codes packed two per
byte), `W.scales` (float16, (rows, groups)) and, for asymmetric grids, `W.zeros` (uint8 zero
points). Tensors left float are stored under their own name as float32. `__metadata__` carries
`edgeforge.compressed`: JSON with the format version, the base model's sha256, the recipe and the
per-tensor grids, so a reader needs nothing else to dequantize.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import safe_open

from shared.errors import InvalidArgument
from shared.models.bundle import read_safetensors_header
from shared.quant.grids import Granularity, Grid, ScaleRule
from shared.quant.qtensor import QuantizedTensor, pack_codes, packed_shape, scales_shape, unpack_codes
from shared.tensors.safetensors_writer import write_safetensors

FORMAT_VERSION = 1
METADATA_KEY = "edgeforge.compressed"
MEDIA_TYPE = "application/x-edgeforge-compressed+safetensors"


def grid_to_dict(grid: Grid) -> dict:
    return {"bits": grid.bits, "granularity": grid.granularity.value, "group_size": grid.group_size,
            "symmetric": grid.symmetric, "rule": grid.rule.value, "gguf_type": grid.gguf_type}


def grid_from_dict(raw: dict) -> Grid:
    return Grid(int(raw["bits"]), Granularity(raw["granularity"]), int(raw["group_size"]), bool(raw["symmetric"]),
                ScaleRule(raw["rule"]), raw.get("gguf_type", ""))


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    grid: Grid | None                 # None: stored float32


def layout(plans: list[TensorPlan]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The safetensors layout (name -> (shape, dtype)) the plans produce, in write order."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for plan in plans:
        if plan.grid is None:
            out[plan.name] = (plan.shape, "F32")
            continue
        rows, columns = plan.shape
        out[plan.name + ".codes"] = (packed_shape(rows, columns, plan.grid.bits), "U8")
        out[plan.name + ".scales"] = (scales_shape(rows, columns, plan.grid), "F16")
        if not plan.grid.symmetric:
            out[plan.name + ".zeros"] = (scales_shape(rows, columns, plan.grid), "U8")
    return out


def write(path: Path, plans: list[TensorPlan], tensors: Iterator[tuple[str, np.ndarray | QuantizedTensor]],
          *, base_model_sha256: str, recipe: dict) -> None:
    """Streams tensors (in plan order) into the compressed file."""
    def arrays() -> Iterator[tuple[str, np.ndarray]]:
        for name, value in tensors:
            if isinstance(value, QuantizedTensor):
                yield name + ".codes", pack_codes(value.codes, value.grid.bits)
                yield name + ".scales", value.scales
                if value.zeros is not None:
                    yield name + ".zeros", value.zeros
            else:
                yield name, value
    metadata = {"version": FORMAT_VERSION, "base_model": base_model_sha256, "recipe": recipe,
                "tensors": {p.name: {"shape": list(p.shape), "grid": grid_to_dict(p.grid) if p.grid else None}
                            for p in plans}}
    write_safetensors(path, layout(plans), arrays(), metadata={METADATA_KEY: json.dumps(metadata)})


class CompressedModel:
    """Reads a compressed-model file one tensor at a time (memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path
        header = read_safetensors_header(path)
        raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
        if raw is None:
            raise InvalidArgument(f"{path.name} is not an edgeforge compressed model (no {METADATA_KEY} metadata)",
                                  reason="MALFORMED_MODEL", field="compressed")
        meta = json.loads(raw)
        if meta.get("version") != FORMAT_VERSION:
            raise InvalidArgument(f"compressed model format version {meta.get('version')} is not {FORMAT_VERSION}",
                                  reason="MALFORMED_MODEL", field="compressed")
        self.base_model: str = meta["base_model"]
        self.recipe: dict = meta["recipe"]
        self.plans = [TensorPlan(name, tuple(entry["shape"]), grid_from_dict(entry["grid"]) if entry["grid"] else None)
                      for name, entry in meta["tensors"].items()]
        self._plan = {p.name: p for p in self.plans}
        expected = layout(self.plans)
        for name, (shape, dtype) in expected.items():
            entry = header.get(name)
            if entry is None or tuple(entry["shape"]) != tuple(shape) or entry["dtype"] != dtype:
                raise InvalidArgument(f"{path.name}: tensor {name} is missing or not {dtype}{list(shape)}",
                                      reason="MALFORMED_MODEL", field="compressed")

    def plan(self, name: str) -> TensorPlan:
        return self._plan[name]

    def read(self, name: str) -> np.ndarray | QuantizedTensor:
        """A float32 array, or the QuantizedTensor with unpacked codes."""
        plan = self._plan[name]
        with safe_open(str(self.path), framework="np") as f:
            if plan.grid is None:
                return f.get_tensor(name)
            codes = unpack_codes(f.get_tensor(name + ".codes"), plan.grid.bits)
            zeros = f.get_tensor(name + ".zeros") if not plan.grid.symmetric else None
            return QuantizedTensor(plan.grid, codes, f.get_tensor(name + ".scales"), zeros)

    def dequantized(self, name: str) -> np.ndarray:
        value = self.read(name)
        return value.dequantize() if isinstance(value, QuantizedTensor) else value
