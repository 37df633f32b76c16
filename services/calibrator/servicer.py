"""Calibrator gRPC servicer: validate -> convert -> core -> convert."""
from __future__ import annotations

import tempfile
from pathlib import Path

from edgeforge.v1 import calibrator_pb2, calibrator_pb2_grpc
from services.calibrator.stats import MEDIA_TYPE, CalibrationConfig, calibrate, write_stats
from shared.artifact_access import ArtifactAccess, open_model
from shared.artifact_convert import artifact_to_proto
from shared.datasets import load_text
from shared.grpc_status import rpc
from shared.store.records import ArtifactKind, Lineage
from shared.versions import tool_versions

SERVICE_NAME = "edgeforge.v1.Calibrator"


class CalibratorServicer(calibrator_pb2_grpc.CalibratorServicer):
    def __init__(self, access: ArtifactAccess):
        self.access = access

    @rpc
    def Calibrate(self, request: calibrator_pb2.CalibrateRequest, context) -> calibrator_pb2.CalibrateResponse:
        config = CalibrationConfig(request.samples or 64, request.sequence_length or 512).validated()
        model, model_sha = open_model(self.access, request.model)
        dataset = self.access.get(request.dataset)
        text = load_text(self.access.local_path(request.dataset), "calibration.dataset")
        result = calibrate(model, text, config)
        scratch = self.access.cache_dir / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=scratch, suffix=".safetensors", delete=False) as handle:
            out = Path(handle.name)
        recipe = {"samples": config.samples, "sequence_length": config.sequence_length}
        write_stats(out, result, {"model": model_sha, "dataset": dataset.sha256, **recipe})
        record = self.access.put(
            out, ArtifactKind.CALIBRATION_STATS, display_name=f"calibration-{config.samples}x{config.sequence_length}",
            media_type=MEDIA_TYPE, lineage=Lineage((request.model, request.dataset), recipe,
                                                   tool_versions("torch", "tokenizers"),
                                                   f"{SERVICE_NAME}/Calibrate"))
        return calibrator_pb2.CalibrateResponse(
            stats=artifact_to_proto(record), tokens=result.tokens,
            layers=[calibrator_pb2.LinearStats(weight=layer.weight, in_features=layer.abs_max.size,
                                               abs_max=float(layer.abs_max.max()),
                                               mean_abs=float(layer.mean_abs.mean())) for layer in result.layers])


def registration(access: ArtifactAccess):
    return (calibrator_pb2_grpc.add_CalibratorServicer_to_server, CalibratorServicer(access), SERVICE_NAME)
