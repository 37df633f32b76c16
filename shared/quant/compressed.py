"""The compressed-model artifact: one safetensors file of quantized weights plus its recipe.

For a weight `W` (HF name) on a generic grid the file holds `W.codes` (uint8; codes of up to 4 bits
packed two per byte), `W.scales` (float16, (rows, groups)) and, for asymmetric grids, `W.zeros`
(uint8 zero points). A weight on a GGUF block type is stored as `W.gguf`: llama.cpp's block bytes,
(rows, bytes per row) uint8, exactly what the GGUF exporter writes. Tensors left float are stored
under their own name as float32. `__metadata__` carries `edgeforge.compressed`: JSON with the
format version, the base model's sha256, the recipe and the per-tensor grids, so a reader needs
nothing else to dequantize.

Memory: the writer takes a big tensor as a `ChunkedTensor` (its rows in consecutive chunks) and the
reader hands out row ranges (`read_rows`, `row_chunks`) through positioned reads, so neither side
ever holds more than one chunk of a tensor of any size, and nothing stays memory-mapped.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from shared.errors import InvalidArgument
from shared.models.bundle import CHUNK_BYTES, read_rows, read_safetensors_header, stored_tensors
from shared.quant.grids import Granularity, Grid, ScaleRule
from shared.quant.qtensor import (GgufTensor, QuantizedTensor, gguf_row_bytes, pack_codes, packed_shape,
                                  scales_shape, unpack_codes)
from shared.tensors.safetensors_writer import write_safetensors

FORMAT_VERSION = 2                  # 2: GGUF block types stored as `.gguf` block bytes
METADATA_KEY = "edgeforge.compressed"
MEDIA_TYPE = "application/x-edgeforge-compressed+safetensors"


def grid_to_dict(grid: Grid) -> dict:
    return {"bits": grid.bits, "granularity": grid.granularity.value, "group_size": grid.group_size,
            "symmetric": grid.symmetric, "rule": grid.rule.value, "gguf_type": grid.gguf_type,
            "percentile": grid.percentile}


def grid_from_dict(raw: dict) -> Grid:
    return Grid(int(raw["bits"]), Granularity(raw["granularity"]), int(raw["group_size"]), bool(raw["symmetric"]),
                ScaleRule(raw["rule"]), raw.get("gguf_type", ""), float(raw.get("percentile", 99.9)))


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    grid: Grid | None                 # None: stored float32


@dataclasses.dataclass
class ChunkedTensor:
    """One tensor delivered as consecutive row chunks, in order, to be consumed once: float32 arrays
    (grid None) or the QuantizedTensor / GgufTensor of each chunk's rows (grid not per-tensor)."""
    grid: Grid | None
    shape: tuple[int, ...]
    chunks: Iterable[np.ndarray | QuantizedTensor | GgufTensor]


def layout(plans: list[TensorPlan]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The safetensors layout (name -> (shape, dtype)) the plans produce, in write order."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for plan in plans:
        if plan.grid is None:
            out[plan.name] = (plan.shape, "F32")
            continue
        rows, columns = plan.shape
        if plan.grid.gguf_type:
            out[plan.name + ".gguf"] = ((rows, gguf_row_bytes(plan.grid, columns)), "U8")
            continue
        out[plan.name + ".codes"] = (packed_shape(rows, columns, plan.grid.bits), "U8")
        out[plan.name + ".scales"] = (scales_shape(rows, columns, plan.grid), "F16")
        if not plan.grid.symmetric:
            out[plan.name + ".zeros"] = (scales_shape(rows, columns, plan.grid), "U8")
    return out


def write(path: Path, plans: list[TensorPlan],
          tensors: Iterator[tuple[str, np.ndarray | QuantizedTensor | GgufTensor | ChunkedTensor]],
          *, base_model_sha256: str, recipe: dict, extra: dict | None = None) -> None:
    """Streams tensors (in plan order) into the compressed file; a ChunkedTensor is written chunk by
    chunk as it is drained. `extra` goes into the metadata (e.g. the mixed-precision allocation)."""
    def arrays() -> Iterator[tuple[str, np.ndarray | Iterator[np.ndarray]]]:
        for name, value in tensors:
            if isinstance(value, ChunkedTensor):
                yield from _chunked_arrays(name, value)
            elif isinstance(value, GgufTensor):
                yield name + ".gguf", value.data
            elif isinstance(value, QuantizedTensor):
                yield name + ".codes", pack_codes(value.codes, value.grid.bits)
                yield name + ".scales", value.scales
                if value.zeros is not None:
                    yield name + ".zeros", value.zeros
            else:
                yield name, value
    metadata = {"version": FORMAT_VERSION, "base_model": base_model_sha256, "recipe": recipe,
                "tensors": {p.name: {"shape": list(p.shape), "grid": grid_to_dict(p.grid) if p.grid else None}
                            for p in plans}, **(extra or {})}
    write_safetensors(path, layout(plans), arrays(), metadata={METADATA_KEY: json.dumps(metadata)})


def _chunked_arrays(name: str, value: ChunkedTensor) -> Iterator[tuple[str, np.ndarray | Iterator[np.ndarray]]]:
    """The stored arrays of a chunked tensor. `.codes` come first in the file, so codes stream
    chunk by chunk while the small scales and zeros (1/group of the weights) are kept for after."""
    if value.grid is None:
        yield name, iter(value.chunks)
        return
    if value.grid.gguf_type:
        yield name + ".gguf", (chunk.data for chunk in value.chunks)
        return
    scales: list[np.ndarray] = []
    zeros: list[np.ndarray] = []

    def codes() -> Iterator[np.ndarray]:
        for chunk in value.chunks:
            scales.append(chunk.scales)
            if chunk.zeros is not None:
                zeros.append(chunk.zeros)
            yield pack_codes(chunk.codes, value.grid.bits)
    yield name + ".codes", codes()                # the writer drains this before asking for the next
    yield name + ".scales", np.concatenate(scales)
    if not value.grid.symmetric:
        yield name + ".zeros", np.concatenate(zeros)


class CompressedModel:
    """Reads a compressed-model file a tensor, or a range of its rows, at a time (positioned reads)."""

    def __init__(self, path: Path):
        self.path = path
        header = read_safetensors_header(path)
        self._stored = stored_tensors(path)
        raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
        if raw is None:
            raise InvalidArgument(f"{path.name} is not an edgeforge compressed model (no {METADATA_KEY} metadata)",
                                  reason="MALFORMED_MODEL", field="compressed")
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError) as error:
            raise InvalidArgument(f"{path.name}: its {METADATA_KEY} metadata is not JSON ({error})",
                                  reason="MALFORMED_MODEL", field="compressed") from error
        if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
            meta = meta if isinstance(meta, dict) else {}
            raise InvalidArgument(f"compressed model format version {meta.get('version')} is not {FORMAT_VERSION}",
                                  reason="MALFORMED_MODEL", field="compressed")
        self.base_model: str = meta["base_model"]
        self.recipe: dict = meta["recipe"]
        self.metadata: dict = meta
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

    def read(self, name: str) -> np.ndarray | QuantizedTensor | GgufTensor:
        """A float32 array, the GgufTensor's block bytes, or the QuantizedTensor with unpacked codes."""
        return self.read_rows(name, 0, self._plan[name].shape[0])

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray | QuantizedTensor | GgufTensor:
        """Rows [start, stop) of a weight, in the form `read` gives the whole (per-tensor grids keep
        their one scale). Memory: those rows only."""
        plan = self._plan[name]
        if plan.grid is None:
            return read_rows(self._stored[name], start, stop)
        if plan.grid.gguf_type:
            data = read_rows(self._stored[name + ".gguf"], start, stop)
            return GgufTensor(plan.grid, (stop - start, plan.shape[1]), data)
        codes = unpack_codes(read_rows(self._stored[name + ".codes"], start, stop), plan.grid.bits)
        first, last = (0, 1) if plan.grid.granularity is Granularity.PER_TENSOR else (start, stop)
        zeros = None if plan.grid.symmetric else read_rows(self._stored[name + ".zeros"], first, last)
        return QuantizedTensor(plan.grid, codes, read_rows(self._stored[name + ".scales"], first, last), zeros)

    def row_chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES
                   ) -> Iterator[tuple[int, np.ndarray | QuantizedTensor | GgufTensor]]:
        """(first row, rows) over a whole weight; a chunk stores at most `chunk_bytes` (at least one row)."""
        plan = self._plan[name]
        key = name if plan.grid is None else name + (".gguf" if plan.grid.gguf_type else ".codes")
        rows = plan.shape[0] if plan.shape else 1
        step = max(1, chunk_bytes // max(1, self._stored[key].row_bytes))
        for start in range(0, rows, step):
            yield start, self.read_rows(name, start, min(rows, start + step))

    def dequantized(self, name: str) -> np.ndarray:
        value = self.read(name)
        return value if isinstance(value, np.ndarray) else value.dequantize()
