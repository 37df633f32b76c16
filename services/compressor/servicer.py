"""Compressor gRPC servicer: model import and quantization."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from edgeforge.v1 import compressor_pb2, compressor_pb2_grpc
from services.calibrator.stats import CalibrationStats
from services.compressor.compress import Calibration, check_steps, compress, needs_sequences
from services.compressor.convert import result_to_proto
from shared.artifact_access import ArtifactAccess, open_model
from shared.artifact_convert import artifact_to_proto
from shared.errors import InvalidArgument
from shared.grpc_status import rpc
from shared.models import bundle
from shared.models.bundle import ModelDir
from shared.models.gguf_import import import_gguf, is_gguf
from shared.quant import compressed
from shared.quant.proto import quantization_from_proto
from shared.store.records import ArtifactKind, Lineage
from shared.versions import tool_versions

SERVICE_NAME = "edgeforge.v1.Compressor"
DEFAULT_SAMPLES = 128
DEFAULT_SEQUENCE_LENGTH = 512


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
            for name in model.tensor_names():             # and every value, chunk by chunk: NaN/Inf is refused
                for _ in model.row_chunks(name):          # here, not halfway through a long compression
                    pass
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
        pre_steps = tuple(quantization_from_proto(step, f"pre_steps[{i}]") for i, step in enumerate(request.pre_steps))
        try:
            steps = check_steps([*pre_steps, recipe])
        except InvalidArgument as error:                  # the RPC's steps are pre_steps[i] + quantization
            field = (error.field or "").replace("recipe[", "pre_steps[")
            raise InvalidArgument(error.message.replace("recipe step", "pre_steps"), reason=error.reason, field=field)
        model, model_sha = open_model(self.access, request.model)
        calibration = Calibration()
        if request.calibration_stats and (recipe.calibrated or any(s.calibrated for s in pre_steps)):
            calibration.stats = CalibrationStats.open(self.access.local_path(request.calibration_stats))
            if calibration.stats.metadata.get("model") != model_sha:
                raise InvalidArgument(f"calibration_stats {request.calibration_stats} were computed for model "
                                      f"artifacts/{calibration.stats.metadata.get('model')}, not {request.model}",
                                      field="calibration_stats")
        if needs_sequences(steps):
            if not request.calibration_dataset:
                raise InvalidArgument(f"method {'+'.join(s.method.value for s in steps)} runs the model block by block: "
                                      "calibration_dataset is required", field="calibration_dataset")
            calibration.sequences = calibration_sequences(
                model, self.access.local_path(request.calibration_dataset),
                request.calibration_samples or DEFAULT_SAMPLES,
                request.calibration_sequence_length or DEFAULT_SEQUENCE_LENGTH)
        with tempfile.NamedTemporaryFile(dir=self._scratch(), suffix=".safetensors", delete=False) as handle:
            out = Path(handle.name)
        try:
            result = compress(model, model_sha, recipe, out, pre_steps=pre_steps, calibration=calibration)
            inputs = (request.model,) + tuple(name for name in (request.calibration_stats, request.calibration_dataset)
                                              if name)
            params = {"steps": [s.to_dict() for s in steps]} if pre_steps else recipe.to_dict()
            if calibration.sequences is not None:
                params["calibration"] = {"samples": int(calibration.sequences.shape[0]),
                                         "sequence_length": int(calibration.sequences.shape[1])}
            label = "+".join(s.method.value for s in steps)
            record = self.access.put(
                out, ArtifactKind.COMPRESSED_MODEL,
                display_name=f"compressed-{recipe.grid().name.replace('/', '-')}-{label}",
                media_type=compressed.MEDIA_TYPE,
                lineage=Lineage(inputs, params, tool_versions("numpy", "safetensors", "torch"),
                                f"{SERVICE_NAME}/Compress"),
                labels={"grid": recipe.grid().name, "method": label,
                        "bits_per_weight": f"{result.bits_per_weight:.3f}"})
        finally:
            out.unlink(missing_ok=True)
        return compressor_pb2.CompressResponse(compressed=artifact_to_proto(record), tensors=result_to_proto(result),
                                               payload_bytes=result.payload_bytes,
                                               bits_per_weight=result.bits_per_weight, seconds=result.seconds,
                                               device=result.device)


def calibration_sequences(model: ModelDir, path: Path, samples: int, sequence_length: int) -> torch.Tensor:
    """(samples, sequence_length) token ids: [BOS] + consecutive chunks of the dataset, as the calibrator
    cuts them, so both see the same sequences."""
    from services.calibrator.stats import CalibrationConfig, sequences
    from shared.datasets import load_text
    from shared.models.tokenizer import TextTokenizer
    config = CalibrationConfig(samples, sequence_length).validated()
    tokenizer = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    if tokenizer.bos_id is None:
        raise InvalidArgument("the model's tokenizer has no BOS token", reason="UNSUPPORTED_OP", field="model")
    text = load_text(path, "calibration_dataset")
    return torch.tensor(sequences(tokenizer.encode(text), tokenizer.bos_id, config), dtype=torch.int64)


def registration(access: ArtifactAccess):
    return (compressor_pb2_grpc.add_CompressorServicer_to_server, CompressorServicer(access), SERVICE_NAME)
