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

from services.calibrator.accumulate import RANGE_KEYS, SiteSummary
from shared import untrusted
from shared.errors import EdgeforgeError, Internal, InvalidArgument
from shared.models.bundle import read_rows, stored_tensors
from shared.tensors.safetensors_writer import write_safetensors

METADATA_KEY = "edgeforge.calibration"
MEDIA_TYPE = "application/x-edgeforge-calibration+safetensors"
VERSION = 2                    # 1: per-weight abs_max and mean_abs only (no sites, Hessians or ranges)
FIELD = "calibration_stats"
PROVENANCE_KEYS = ("model", "dataset", "samples", "sequence_length", "tokens")
MAX_IN_FEATURES = 1 << 20      # input channels of one linear; a Hessian of this side is already 4 TiB


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
        self._stored = stored_tensors(path)
        self.metadata = metadata
        self._sites = sites
        self._site_of = {weight: site for site in sites.values() for weight in site.weights}

    @classmethod
    def open(cls, path: Path) -> "CalibrationStats":
        """Validates the header, the metadata and every tensor's shape (no data is read)."""
        try:
            header = untrusted.read_safetensors_header(path)     # lengths, dtypes, offsets vs the file size
        except OSError as error:
            raise _malformed(f"not a readable safetensors file ({error.strerror})")
        except EdgeforgeError as error:
            raise type(error)(f"{FIELD}: not a readable safetensors file ({error.message})", reason=error.reason,
                              field=FIELD) from error
        raw = header.metadata.get(METADATA_KEY)
        shapes = {name: entry.shape for name, entry in header.tensors.items()}
        stored = header.tensors
        if raw is None:
            raise _malformed(f"no metadata key {METADATA_KEY!r}; not a calibration statistics file")
        try:
            header = json.loads(raw)
        except RecursionError:
            raise _malformed(f"metadata {METADATA_KEY!r} nests too deeply")
        except ValueError as error:               # JSONDecodeError, or an integer too long to convert
            raise _malformed(f"metadata {METADATA_KEY!r} is not JSON: {str(error)[:200]}")
        if not isinstance(header, dict) or header.get("version") != VERSION:
            found = header.get("version", 1) if isinstance(header, dict) else None
            raise _malformed(f"statistics format version {found}; this reader needs version {VERSION} "
                             "(recalibrate the model)")
        missing = [key for key in PROVENANCE_KEYS + ("sites",) if key not in header]
        if missing:
            raise _malformed(f"metadata lacks {missing}")
        if not isinstance(header["sites"], dict):
            raise _malformed("metadata sites must be an object {site: {weights, in_features, hessian}}")
        sites = {name: cls._site(name, entry) for name, entry in header["sites"].items()}
        declared = layout(list(sites.values()))
        dtypes = {name: entry.dtype for name, entry in stored.items()}
        for name, (shape, dtype) in declared.items():
            if shapes.get(name) != shape:
                raise _malformed(f"tensor {name} has shape {shapes.get(name)}, the metadata implies {shape}")
            if dtypes[name] != dtype:
                raise _malformed(f"tensor {name} is {dtypes[name]}, the metadata implies {dtype}")
        metadata = {key: header[key] for key in PROVENANCE_KEYS + ("version", "hessians") if key in header}
        return cls(path, metadata, sites)

    @staticmethod
    def _site(name: str, entry) -> Site:
        try:
            site = Site(name, tuple(str(w) for w in entry["weights"]), int(entry["in_features"]),
                        bool(entry["hessian"]))
        except (TypeError, KeyError, ValueError, OverflowError) as error:
            raise _malformed(f"site {name[:100]!r} metadata is malformed ({type(error).__name__}: {str(error)[:100]})")
        if not 1 <= site.in_features <= MAX_IN_FEATURES:
            raise _malformed(f"site {name[:100]!r} in_features {site.in_features} is outside [1, {MAX_IN_FEATURES}]")
        return site

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
        """One statistic (positioned read of a header-checked file); NaN or Inf is refused here, not
        spread through a Hessian inverse."""
        stored = self._stored.get(name)
        if stored is None:
            raise _malformed(f"tensor {name} is missing")
        values = read_rows(stored, 0, stored.shape[0] if stored.shape else 1)
        untrusted.check_finite(values, name, FIELD)
        return values
