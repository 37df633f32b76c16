"""Calibrator gRPC servicer: validate -> convert -> core -> convert."""
from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

from edgeforge.v1 import calibrator_pb2, calibrator_pb2_grpc
from services.calibrator.cache import CalibrationIndex, cache_key
from services.calibrator.stats import DATASET_FIELD, CalibrationConfig, calibrate_to_file, tokenizer_of
from services.calibrator.stats_file import MEDIA_TYPE, VERSION, CalibrationStats
from shared.artifact_access import ArtifactAccess, open_model
from shared.artifact_convert import artifact_to_proto
from shared.datasets import load_tokens
from shared.errors import InvalidArgument
from shared.grpc_status import rpc
from shared.store.records import ArtifactKind, Lineage
from shared.versions import tool_versions

SERVICE_NAME = "edgeforge.v1.Calibrator"
log = logging.getLogger(__name__)


def config_from_proto(request: calibrator_pb2.CalibrateRequest) -> CalibrationConfig:
    hessians = ("all" if request.hessians else "none") if request.HasField("hessians") else "auto"
    defaults = CalibrationConfig()
    return CalibrationConfig(request.samples or defaults.samples, request.sequence_length or defaults.sequence_length,
                             hessians).validated()


class CalibratorServicer(calibrator_pb2_grpc.CalibratorServicer):
    def __init__(self, access: ArtifactAccess):
        self.access = access
        self.index = CalibrationIndex(access.cache_dir / "calibration-index.json")
        self._key_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @rpc
    def Calibrate(self, request: calibrator_pb2.CalibrateRequest, context) -> calibrator_pb2.CalibrateResponse:
        config = config_from_proto(request)
        model, model_sha = open_model(self.access, request.model)
        dataset = self.access.get(request.dataset)
        if dataset.kind != ArtifactKind.DATASET:
            raise InvalidArgument(f"{DATASET_FIELD} {request.dataset} is a {dataset.kind.value}, not a dataset",
                                  field=DATASET_FIELD)
        key = cache_key(model_sha, dataset.sha256, config.samples, config.sequence_length, config.hessians, VERSION)
        with self._guard:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:                              # one computation per key; a concurrent twin waits and reuses it
            name = self.index.lookup(key, self.access.get)
            if name is not None:
                log.info("reusing calibration %s for model %s, dataset %s", name, request.model, request.dataset)
            else:
                name = self._calibrate(request, config, model, model_sha, dataset.sha256)
                self.index.remember(key, name)
        record = self.access.get(name)
        stats = CalibrationStats.open(self.access.local_path(name))
        return calibrator_pb2.CalibrateResponse(stats=artifact_to_proto(record), tokens=stats.metadata["tokens"],
                                                layers=[_linear_stats(stats, w) for w in stats.weights()])

    def _calibrate(self, request, config: CalibrationConfig, model, model_sha: str, dataset_sha: str) -> str:
        tokens = load_tokens(self.access.local_path(request.dataset), tokenizer_of(model).encode,
                             vocab_size=model.config.vocab_size, field=DATASET_FIELD)
        scratch = self.access.cache_dir / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=scratch, suffix=".safetensors", delete=False) as handle:
            out = Path(handle.name)
        try:
            calibrate_to_file(model, tokens, config, out, {"model": model_sha, "dataset": dataset_sha})
            recipe = {"samples": config.samples, "sequence_length": config.sequence_length,
                      "hessians": config.hessians}
            record = self.access.put(
                out, ArtifactKind.CALIBRATION_STATS,
                display_name=f"calibration-{config.samples}x{config.sequence_length}", media_type=MEDIA_TYPE,
                lineage=Lineage((request.model, request.dataset), recipe, tool_versions("torch", "tokenizers"),
                                f"{SERVICE_NAME}/Calibrate"))
        finally:
            out.unlink(missing_ok=True)
        return record.name


def _linear_stats(stats: CalibrationStats, weight: str) -> calibrator_pb2.LinearStats:
    abs_max, mean_abs = stats.abs_max(weight), stats.mean_abs(weight)
    site = stats.site(weight)
    return calibrator_pb2.LinearStats(weight=weight, in_features=abs_max.size, abs_max=float(abs_max.max()),
                                      mean_abs=float(mean_abs.mean()), site=site.name, has_hessian=site.hessian)


def registration(access: ArtifactAccess):
    return (calibrator_pb2_grpc.add_CalibratorServicer_to_server, CalibratorServicer(access), SERVICE_NAME)
