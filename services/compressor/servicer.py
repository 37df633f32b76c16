"""Compressor gRPC servicer: model import and quantization."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from edgeforge.v1 import compressor_pb2, compressor_pb2_grpc
from services.compressor.compress import compress
from services.compressor.convert import quantization_from_proto, result_to_proto
from shared.artifact_access import ArtifactAccess, open_model
from shared.artifact_convert import artifact_to_proto
from shared.errors import InvalidArgument
from shared.grpc_status import rpc
from shared.models import bundle
from shared.models.bundle import ModelDir
from shared.models.gguf_import import import_gguf, is_gguf
from shared.quant import compressed
from shared.store.records import ArtifactKind, Lineage
from shared.versions import tool_versions

SERVICE_NAME = "edgeforge.v1.Compressor"


class CompressorServicer(compressor_pb2_grpc.CompressorServicer):
    def __init__(self, access: ArtifactAccess):
        self.access = access

    def _scratch(self) -> Path:
        path = self.access.cache_dir / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @rpc
    def ImportModel(self, request: compressor_pb2.ImportModelRequest, context) -> compressor_pb2.ImportModelResponse:
        source = self.access.get(request.source)
        path = self.access.local_path(request.source)
        if is_gguf(path):
            work = Path(tempfile.mkdtemp(dir=self._scratch(), prefix="import-"))
            try:
                config = import_gguf(path, work / "model")
                ModelDir(work / "model")                      # proves the result opens
                bundle.pack(work / "model", work / "model.tar")
                record = self.access.put(
                    work / "model.tar", ArtifactKind.MODEL, display_name=f"{source.display_name}-f32",
                    media_type=bundle.MEDIA_TYPE,
                    lineage=Lineage((request.source,), {"dequantize": "float32"}, tool_versions("gguf", "numpy"),
                                    f"{SERVICE_NAME}/ImportModel"),
                    labels={"architecture": "llama", "dtype": "float32"})
            finally:
                shutil.rmtree(work, ignore_errors=True)
        elif bundle.is_bundle(path):
            model, _ = open_model(self.access, request.source, field="source")   # validates config and tensors
            config, record = model.config, source
        else:
            raise InvalidArgument(f"source {request.source} ({source.display_name}) is neither a GGUF file "
                                  "(magic 'GGUF') nor a model bundle (tar of an HF directory with config.json)",
                                  reason="UNKNOWN_MODEL_FORMAT", field="source")
        return compressor_pb2.ImportModelResponse(model=artifact_to_proto(record), architecture="llama",
                                                  parameter_count=config.parameter_count())

    @rpc
    def Compress(self, request: compressor_pb2.CompressRequest, context) -> compressor_pb2.CompressResponse:
        recipe = quantization_from_proto(request.quantization)
        if recipe.grid() is None:
            raise InvalidArgument(f"recipe {recipe.to_dict()} quantizes nothing; export the float model instead",
                                  field="quantization")
        model, model_sha = open_model(self.access, request.model)
        with tempfile.NamedTemporaryFile(dir=self._scratch(), suffix=".safetensors", delete=False) as handle:
            out = Path(handle.name)
        try:
            result = compress(model, model_sha, recipe, out)
            inputs = (request.model,) + ((request.calibration_stats,) if request.calibration_stats else ())
            record = self.access.put(
                out, ArtifactKind.COMPRESSED_MODEL, display_name=f"compressed-{recipe.grid().name.replace('/', '-')}",
                media_type=compressed.MEDIA_TYPE,
                lineage=Lineage(inputs, recipe.to_dict(), tool_versions("numpy", "safetensors"),
                                f"{SERVICE_NAME}/Compress"),
                labels={"grid": recipe.grid().name, "bits_per_weight": f"{result.bits_per_weight:.3f}"})
        finally:
            out.unlink(missing_ok=True)
        return compressor_pb2.CompressResponse(compressed=artifact_to_proto(record), tensors=result_to_proto(result),
                                               payload_bytes=result.payload_bytes,
                                               bits_per_weight=result.bits_per_weight)


def registration(access: ArtifactAccess):
    return (compressor_pb2_grpc.add_CompressorServicer_to_server, CompressorServicer(access), SERVICE_NAME)
