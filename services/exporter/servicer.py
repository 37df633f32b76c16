"""Exporter gRPC servicer: write a format, prove it in its runtime, store it; evaluate perplexity."""
from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from edgeforge.v1 import common_pb2, exporter_pb2, exporter_pb2_grpc
from services.exporter.base import ExportFormat, ExportInput, ExportOptions
from services.exporter.convert import format_from_proto, validation_to_proto
from services.exporter.formats.gguf import GgufExporter
from services.exporter.formats.onnx import OnnxExporter
from services.exporter.quality import VALIDATION_PROMPTS, perplexity, validate, windows
from services.exporter.runtimes import ReferenceRuntime, open_runtime
from shared.artifact_access import ArtifactAccess, open_model
from shared.artifact_convert import artifact_to_proto
from shared.datasets import load_text
from shared.errors import FailedPrecondition, InvalidArgument
from shared.grpc_status import rpc
from shared.models.bundle import ModelDir
from shared.models.tokenizer import TextTokenizer
from shared.quant.compressed import CompressedModel
from shared.store.records import ArtifactKind, Lineage
from shared.versions import tool_versions

SERVICE_NAME = "edgeforge.v1.Exporter"
EXPORTERS = {ExportFormat.GGUF: GgufExporter(), ExportFormat.ONNX: OnnxExporter()}
SUFFIX = {ExportFormat.GGUF: ".gguf", ExportFormat.ONNX: ".onnx"}
RUNTIME_LIBRARIES = {ExportFormat.GGUF: ("gguf", "llama_cpp_python"), ExportFormat.ONNX: ("onnx", "onnxruntime")}


def tokenizer_for(model: ModelDir) -> TextTokenizer:
    tokenizer = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    if tokenizer.bos_id is None:
        raise FailedPrecondition("the model's tokenizer defines no BOS token", field="model")
    return tokenizer


class ExporterServicer(exporter_pb2_grpc.ExporterServicer):
    def __init__(self, access: ArtifactAccess):
        self.access = access
        self._reference: dict[str, tuple[list[list[int]], list]] = {}     # model sha -> (prompts, logits)
        self._lock = threading.Lock()

    def _reference_logits(self, model: ModelDir, model_sha: str):
        with self._lock:
            if model_sha not in self._reference:
                tokenizer = tokenizer_for(model)
                prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in VALIDATION_PROMPTS]
                runtime = ReferenceRuntime(model.path)
                self._reference = {model_sha: (prompts, [runtime.logits(p) for p in prompts])}
            return self._reference[model_sha]

    @rpc
    def Export(self, request: exporter_pb2.ExportRequest, context) -> exporter_pb2.ExportResponse:
        export_format = format_from_proto(request.format)
        if export_format not in EXPORTERS:
            raise InvalidArgument(f"format {export_format.value} cannot be exported", field="format")
        model, model_sha = open_model(self.access, request.model)
        compressed = CompressedModel(self.access.local_path(request.compressed)) if request.compressed else None
        source = ExportInput(model, model_sha, compressed, ExportOptions(float_type=request.float_type or "f32"))
        scratch = self.access.cache_dir / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=scratch, suffix=SUFFIX[export_format], delete=False) as handle:
            out = Path(handle.name)
        try:
            exported = EXPORTERS[export_format].export(source, out)
            prompts, expected = self._reference_logits(model, model_sha)
            runtime = open_runtime(export_format, out, 512)
            try:
                result = validate(runtime, expected, prompts)
            finally:
                runtime.close()
            if not result.passed:
                raise FailedPrecondition(
                    f"{export_format.value} file failed validation in {result.runtime}: top-1 agreement "
                    f"{result.top1_agreement:.2f}, max |Δlogit| {result.max_abs_diff:.3g}", reason="VALIDATION_FAILED")
            inputs = (request.model,) + ((request.compressed,) if request.compressed else ())
            labels = {**exported.labels, "validation_runtime": result.runtime,
                      "validation_top1": f"{result.top1_agreement:.4f}",
                      "validation_max_abs_diff": f"{result.max_abs_diff:.4g}"}
            record = self.access.put(
                out, ArtifactKind.EXPORTED_MODEL, display_name=f"{model.path.name}{SUFFIX[export_format]}",
                media_type=exported.media_type,
                lineage=Lineage(inputs, {"format": export_format.value, **source.recipe},
                                tool_versions(*RUNTIME_LIBRARIES[export_format]), f"{SERVICE_NAME}/Export"),
                labels=labels)
        finally:
            out.unlink(missing_ok=True)
        return exporter_pb2.ExportResponse(exported=artifact_to_proto(record), validation=validation_to_proto(result))

    @rpc
    def Evaluate(self, request: exporter_pb2.EvaluateRequest, context) -> exporter_pb2.EvaluateResponse:
        export_format = format_from_proto(request.format)
        window_tokens = request.window_tokens or 512
        max_tokens = request.max_tokens or 4096
        if not 2 <= window_tokens <= 8192:
            raise InvalidArgument(f"window_tokens must be in [2, 8192], got {window_tokens}", field="window_tokens")
        if max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be positive, got {max_tokens}", field="max_tokens")
        if export_format is ExportFormat.REFERENCE:
            model, _ = open_model(self.access, request.model)
            tokenizer_model, runtime_path = model, model.path
        else:
            if not request.tokenizer_model:
                raise InvalidArgument("tokenizer_model is required to evaluate an exported file",
                                      field="tokenizer_model")
            tokenizer_model, _ = open_model(self.access, request.tokenizer_model, field="tokenizer_model")
            runtime_path = self.access.local_path(request.model)
        tokenizer = tokenizer_for(tokenizer_model)
        text = load_text(self.access.local_path(request.dataset), "evaluation.dataset")
        token_windows = windows(tokenizer.encode(text), tokenizer.bos_id, window_tokens, max_tokens)
        runtime = open_runtime(export_format, runtime_path, window_tokens)
        try:
            result = perplexity(runtime, token_windows)
        finally:
            runtime.close()
        return exporter_pb2.EvaluateResponse(
            quality=common_pb2.Quality(metric="perplexity", value=result.value, tokens=result.tokens),
            runtime=result.runtime)


def registration(access: ArtifactAccess):
    return (exporter_pb2_grpc.add_ExporterServicer_to_server, ExporterServicer(access), SERVICE_NAME)
