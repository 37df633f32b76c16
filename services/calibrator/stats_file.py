"""The calibration statistics artifact: one safetensors file, written as the blocks are calibrated and
read back by `CalibrationStats` (what the compressor's AWQ, GPTQ and importance-weighted RTN use).

Statistics belong to an input *site*: the input that a group of linears reads
(shared.models.blockwise.INPUT_GROUPS: q/k/v, o, gate/up, down), so q, k and v share one Hessian.
A site is named after its group's first linear, e.g. "model.layers.0.self_attn.q_proj". Tensors:

    {site}.abs_max    (in,)      F32   max |x_c|
    {site}.mean_abs   (in,)      F32   E[|x_c|]
    {site}.sq_mean    (in,)      F32   E[x_c²], the importance matrix (= diag of the Hessian)
    {site}.range      (5,)       F32   min x, max x, and the 99th, 99.9th, 99.99th percentiles of |x|
    {site}.hessian    (in, in)   F32   H = E[x xᵀ] = XᵀX / tokens; only for sites with "hessian": true

Metadata key "edgeforge.calibration" (JSON): version, model and dataset (sha256), samples,
sequence_length, tokens, hessians ("auto" | "all" | "none"), percentiles ("exact"), and
sites: {site: {"weights": [weight names], "in_features": n, "hessian": bool}}.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from safetensors import SafetensorError, safe_open

from services.calibrator.accumulate import RANGE_KEYS, SiteSummary
from shared.errors import Internal, InvalidArgument
from shared.tensors.safetensors_writer import write_safetensors

METADATA_KEY = "edgeforge.calibration"
MEDIA_TYPE = "application/x-edgeforge-calibration+safetensors"
VERSION = 2                    # 1: per-weight abs_max and mean_abs only (no sites, Hessians or ranges)
FIELD = "calibration_stats"
PROVENANCE_KEYS = ("model", "dataset", "samples", "sequence_length", "tokens")


@dataclasses.dataclass(frozen=True)
class Site:
    name: str                      # the group's first linear, "model.layers.0.self_attn.q_proj"
    weights: tuple[str, ...]       # every weight reading this input
    in_features: int
    hessian: bool                  # whether H is computed and stored


def layout(sites: list[Site]) -> dict[str, tuple[tuple[int, ...], str]]:
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for site in sites:
        for kind in ("abs_max", "mean_abs", "sq_mean"):
            shapes[f"{site.name}.{kind}"] = ((site.in_features,), "F32")
        shapes[f"{site.name}.range"] = ((len(RANGE_KEYS),), "F32")
        if site.hessian:
            shapes[f"{site.name}.hessian"] = ((site.in_features, site.in_features), "F32")
    return shapes


def write_stats_file(path: Path, sites: list[Site], summaries: Iterable[tuple[Site, SiteSummary]],
                     provenance: dict) -> None:
    """Writes each site's summary as it arrives (`summaries` may be a generator that calibrates)."""
    expected = iter(sites)

    def arrays():
        for site, summary in summaries:
            if site != next(expected, None):
                raise Internal(f"calibration produced site {site.name} out of order")
            yield f"{site.name}.abs_max", summary.abs_max
            yield f"{site.name}.mean_abs", summary.mean_abs
            yield f"{site.name}.sq_mean", summary.sq_mean
            yield f"{site.name}.range", summary.value_range
            if site.hessian:
                yield f"{site.name}.hessian", summary.hessian
    header = {**provenance, "version": VERSION, "percentiles": "exact",
              "sites": {site.name: {"weights": list(site.weights), "in_features": site.in_features,
                                    "hessian": site.hessian} for site in sites}}
    write_safetensors(path, layout(sites), arrays(), metadata={METADATA_KEY: json.dumps(header)})


def _malformed(message: str) -> InvalidArgument:
    return InvalidArgument(f"{FIELD}: {message}", reason="MALFORMED_MODEL", field=FIELD)


class CalibrationStats:
    """Read access to a calibration statistics file, by linear weight name. Arrays are read on demand."""

    def __init__(self, path: Path, metadata: dict, sites: dict[str, Site]):
        self.path = path
        self.metadata = metadata
        self._sites = sites
        self._site_of = {weight: site for site in sites.values() for weight in site.weights}

    @classmethod
    def open(cls, path: Path) -> "CalibrationStats":
        """Validates the header, the metadata and every tensor's shape (no data is read)."""
        try:
            with safe_open(str(path), framework="np") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except (SafetensorError, OSError) as error:
            raise _malformed(f"not a readable safetensors file ({error})")
        if raw is None:
            raise _malformed(f"no metadata key {METADATA_KEY!r}; not a calibration statistics file")
        try:
            header = json.loads(raw)
        except json.JSONDecodeError as error:
            raise _malformed(f"metadata {METADATA_KEY!r} is not JSON: {error.msg}")
        if not isinstance(header, dict) or header.get("version") != VERSION:
            found = header.get("version", 1) if isinstance(header, dict) else None
            raise _malformed(f"statistics format version {found}; this reader needs version {VERSION} "
                             "(recalibrate the model)")
        missing = [key for key in PROVENANCE_KEYS + ("sites",) if key not in header]
        if missing:
            raise _malformed(f"metadata lacks {missing}")
        sites = {name: cls._site(name, entry) for name, entry in header["sites"].items()}
        declared = layout(list(sites.values()))
        for name, (shape, _) in declared.items():
            if shapes.get(name) != shape:
                raise _malformed(f"tensor {name} has shape {shapes.get(name)}, the metadata implies {shape}")
        metadata = {key: header[key] for key in PROVENANCE_KEYS + ("version", "hessians") if key in header}
        return cls(path, metadata, sites)

    @staticmethod
    def _site(name: str, entry) -> Site:
        try:
            return Site(name, tuple(str(w) for w in entry["weights"]), int(entry["in_features"]),
                        bool(entry["hessian"]))
        except (TypeError, KeyError, ValueError) as error:
            raise _malformed(f"site {name!r} metadata is malformed ({type(error).__name__}: {error})")

    # ------------------------------------------------------------------ queries
    def weights(self) -> list[str]:
        """Every linear weight covered, in model order."""
        return list(self._site_of)

    def site(self, weight: str) -> Site:
        site = self._site_of.get(weight)
        if site is None:
            raise InvalidArgument(f"{FIELD} (model {str(self.metadata['model'])[:12]}…) has no statistics for "
                                  f"{weight}; were they computed for another model?", field=FIELD)
        return site

    def has_hessian(self, weight: str) -> bool:
        return self.site(weight).hessian

    def hessian(self, weight: str) -> np.ndarray:
        """(in, in) float32, E[x xᵀ] over the calibration tokens."""
        site = self.site(weight)
        if not site.hessian:
            raise InvalidArgument(f"{FIELD} has no Hessian for {weight} (calibrated with hessians="
                                  f"{self.metadata.get('hessians')!r}); recalibrate with hessians enabled",
                                  field=FIELD)
        return self._read(f"{site.name}.hessian")

    def importance(self, weight: str) -> np.ndarray:
        """(in,) float32, E[x_c²] per input channel."""
        return self._read(f"{self.site(weight).name}.sq_mean")

    def mean_abs(self, weight: str) -> np.ndarray:
        return self._read(f"{self.site(weight).name}.mean_abs")

    def abs_max(self, weight: str) -> np.ndarray:
        return self._read(f"{self.site(weight).name}.abs_max")

    def activation_range(self, weight: str) -> dict:
        """{"min", "max"} of the input values, {"p99", "p99.9", "p99.99"} percentiles of |x|."""
        values = self._read(f"{self.site(weight).name}.range")
        return {key: float(value) for key, value in zip(RANGE_KEYS, values)}

    def _read(self, name: str) -> np.ndarray:
        with safe_open(str(self.path), framework="np") as f:
            return f.get_tensor(name)
