"""Exporter gRPC servicer: write a format, prove it in its runtime, store it; evaluate perplexity."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path

from edgeforge.v1 import common_pb2, exporter_pb2, exporter_pb2_grpc
from services.exporter import modules as module_export
from services.exporter.base import ActivationRanges, ExportedFile, Exporter, ExportFormat, ExportInput, ExportOptions
from services.exporter.convert import format_from_proto, options_from_proto, validation_to_proto
from services.exporter.quality import VALIDATION_PROMPTS, ValidationResult, perplexity, validate, windows
from services.exporter.runtimes import ReferenceRuntime, open_runtime
from shared.archive import pack_tree, unpack_tree
from shared.artifact_access import ArtifactAccess, open_model
from shared.artifact_convert import artifact_to_proto
from shared.datasets import load_text
from shared.errors import FailedPrecondition, InvalidArgument
from shared.grpc_status import rpc
from shared.models import modules
from shared.models.bundle import ModelDir
from shared.models.module_data import load_samples
from shared.models.tokenizer import TextTokenizer
from shared.quant.compressed import CompressedModel
from shared.quant.proto import quantization_from_proto
from shared.store.records import ArtifactKind, Lineage, parse_artifact_name
from shared.versions import tool_versions

SERVICE_NAME = "edgeforge.v1.Exporter"
# Each format's module and class, imported on first use (each imports its own SDK lazily in turn).
EXPORTER_CLASSES = {ExportFormat.GGUF: ("services.exporter.formats.gguf", "GgufExporter"),
                    ExportFormat.ONNX: ("services.exporter.formats.onnx", "OnnxExporter"),
                    ExportFormat.TFLITE: ("services.exporter.formats.tflite", "TfliteExporter"),
                    ExportFormat.COREML: ("services.exporter.formats.coreml", "CoremlExporter")}
RUNTIME_LIBRARIES = {ExportFormat.GGUF: ("gguf", "llama_cpp_python"), ExportFormat.ONNX: ("onnx", "onnxruntime"),
                     ExportFormat.TFLITE: ("litert-torch", "ai-edge-litert", "torch"),
                     ExportFormat.COREML: ("coremltools", "torch")}


@functools.cache
def exporter_for(export_format: ExportFormat) -> Exporter:
    if export_format not in EXPORTER_CLASSES:
        raise InvalidArgument(f"format {export_format.value} cannot be exported", field="format")
    module, name = EXPORTER_CLASSES[export_format]
    return getattr(importlib.import_module(module), name)()


def provenance(export_format: ExportFormat) -> dict[str, str]:
    """Versions of the libraries that wrote and checked the file (llama.cpp: its build's features)."""
    versions = dict(tool_versions(*RUNTIME_LIBRARIES[export_format]))
    if export_format is ExportFormat.GGUF:
        import llama_cpp
        versions["llama.cpp"] = f"vendored in llama-cpp-python {llama_cpp.__version__}; " + \
            llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return versions


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
        exporter = exporter_for(export_format)
        options = options_from_proto(request.options)
        module_dir = self._module_bundle(request.model)
        if module_dir is not None:
            return self._export_module(request, module_dir, export_format, options)
        if request.HasField("quantization"):
            raise InvalidArgument("quantization is the weight grid of image and encoder models (module bundles); "
                                  "an LM carries its grid in compressed", field="quantization")
        model, model_sha = open_model(self.access, request.model)
        compressed = self._compressed(request.compressed) if request.compressed else None
        activations = None
        if options.int8_activations:
            if not request.calibration:
                raise FailedPrecondition("options.int8_activations needs calibration, a calibration statistics "
                                         "artifact with the activation ranges", reason="MISSING_CALIBRATION",
                                         field="calibration")
            activations = ActivationRanges.from_stats(self.access.local_path(request.calibration),
                                                      request.calibration)
        source = ExportInput(model, model_sha, compressed, options, activations)
        exporter.check(source)                          # UNSUPPORTED_ARCH / UNSUPPORTED_OP before any work
        work = self._scratch()
        try:
            exported = exporter.export(source, work / f"{model.path.name}{exporter.suffix}")
            package = exporter.read_back(exported, source)
            result = self._validate(export_format, exporter, exported, model, model_sha)
            inputs = (request.model,) + ((request.compressed,) if request.compressed else ()) + \
                ((request.calibration,) if activations else ())
            fidelity = {**dataclasses.asdict(result), **({"package": package} if package else {})}
            lineage = Lineage(inputs, {"format": export_format.value, **source.recipe, "export": options.to_dict(),
                                       **exported.provenance},
                              provenance(export_format), f"{SERVICE_NAME}/Export", fidelity)
            record = self._store(work, exported, f"{model.path.name}{exporter.suffix}", lineage, exported.labels,
                                 result)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return exporter_pb2.ExportResponse(exported=artifact_to_proto(record), validation=validation_to_proto(result))

    def _compressed(self, name: str) -> CompressedModel:
        """The compressed model `name`; any other kind of artifact is refused before its bytes are parsed."""
        record = self.access.get(name)
        if record.kind != ArtifactKind.COMPRESSED_MODEL:
            raise InvalidArgument(f"compressed {name} is a {record.kind.value}, not a compressed model",
                                  reason="UNKNOWN_MODEL_FORMAT", field="compressed")
        return CompressedModel(self.access.local_path(name))

    def _scratch(self) -> Path:
        scratch = self.access.cache_dir / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=scratch, prefix="export-"))

    def _store(self, work: Path, exported: ExportedFile, display_name: str, lineage: Lineage,
               labels: dict[str, str], result: ValidationResult):
        """Stores a validated file (a directory export as one tar), labelled with its validation."""
        blob = exported.path
        if blob.is_dir():                               # Core ML package, ONNX + external data: one tar
            blob = work / f"{exported.path.name}.tar"
            pack_tree(exported.path, blob)
        labels = {**labels, "validation_runtime": result.runtime}
        if result.positions:
            labels.update(validation_top1=f"{result.top1_agreement:.4f}",
                          validation_max_abs_diff=f"{result.max_abs_diff:.4g}")
        return self.access.put(blob, ArtifactKind.EXPORTED_MODEL, display_name=display_name,
                               media_type=exported.media_type, lineage=lineage, labels=labels)

    def _runnable(self, artifact: str) -> Path:
        """The local path a runtime opens: the blob itself, or for a directory export (a tar) the
        directory unpacked once into the cache."""
        path = self.access.local_path(artifact)
        if not tarfile.is_tarfile(path):
            return path
        return unpack_tree(path, self.access.cache_dir / "unpacked" / parse_artifact_name(artifact))

    def _validate(self, export_format: ExportFormat, exporter: Exporter, exported: ExportedFile, model: ModelDir,
                  model_sha: str) -> ValidationResult:
        """Logits of the file in its own runtime versus the source model's; where the runtime cannot run
        here (Core ML off macOS) the read-back alone proved the file, and the result says so."""
        if not exporter.runs_here():
            return ValidationResult(f"{export_format.value}: read back only ({exporter.why_not_here()})",
                                    math.nan, math.nan, math.nan, 0, loaded=True)
        prompts, expected = self._reference_logits(model, model_sha)
        runtime = open_runtime(export_format, exported.path, 512)
        try:
            result = validate(runtime, expected, prompts)
        finally:
            runtime.close()
        if not result.passed:
            raise FailedPrecondition(
                f"{export_format.value} file failed validation in {result.runtime}: top-1 agreement "
                f"{result.top1_agreement:.2f}, max |Δlogit| {result.max_abs_diff:.3g}", reason="VALIDATION_FAILED")
        return result

    @rpc
    def Evaluate(self, request: exporter_pb2.EvaluateRequest, context) -> exporter_pb2.EvaluateResponse:
        export_format = format_from_proto(request.format)
        reference = request.model if export_format is ExportFormat.REFERENCE else request.tokenizer_model
        field = "model" if export_format is ExportFormat.REFERENCE else "tokenizer_model"
        module_dir = self._module_bundle(reference, field) if reference else None
        if module_dir is not None:
            return self._evaluate_module(request, export_format, module_dir)
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
            runtime_path = self._runnable(request.model)
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

    # ------------------------------------------------------------ module bundles (image and encoder models)

    def _module_bundle(self, name: str, field: str = "model") -> modules.ModuleDir | None:
        """The module bundle `name`, unpacked; None when it is something else (an LM bundle, a GGUF)."""
        family = modules.tar_family(self.access.local_path(name))
        if family == "bert":
            raise InvalidArgument(f"{field} {name} is an HF BERT directory: import it (Compressor.ImportModel) "
                                  "into a module bundle first", reason="UNKNOWN_MODEL_FORMAT", field=field)
        return modules.open_artifact(self.access, name, field) if family == "module" else None

    def _export_module(self, request: exporter_pb2.ExportRequest, module_dir: modules.ModuleDir,
                       export_format: ExportFormat, options: ExportOptions) -> exporter_pb2.ExportResponse:
        if request.compressed:
            raise InvalidArgument("compressed is an LM's quantized weights; an image or encoder model takes its "
                                  "weight grid in quantization", field="compressed")
        config = quantization_from_proto(request.quantization) if request.HasField("quantization") else None
        grid = module_export.weight_grid(config)
        module_export.check(module_dir, export_format, options, grid)   # UNSUPPORTED_* before any work
        suffix = module_export.SUFFIXES[export_format]
        work = self._scratch()
        try:
            done = module_export.export(module_dir, export_format, options, grid,
                                        work / f"{module_dir.path.name}{suffix}")
            result = done.validation
            recipe = {"method": "rtn", "grid": grid.name, "quantization": config.to_dict()} if grid else \
                {"method": "none", "type": options.float_type}
            fidelity = {**dataclasses.asdict(result), "reference": done.reference, "inputs": done.inputs,
                        **({"package": done.package} if done.package else {})}
            lineage = Lineage((request.model,), {"format": export_format.value, **recipe, "export": options.to_dict(),
                                                 **done.exported.provenance},
                              provenance(export_format), f"{SERVICE_NAME}/Export", fidelity)
            labels = {**done.exported.labels, "task": module_dir.task, "architecture": module_dir.architecture}
            record = self._store(work, done.exported, f"{module_dir.path.name}{suffix}", lineage, labels, result)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return exporter_pb2.ExportResponse(exported=artifact_to_proto(record), validation=validation_to_proto(result))

    def _evaluate_module(self, request: exporter_pb2.EvaluateRequest, export_format: ExportFormat,
                         reference: modules.ModuleDir) -> exporter_pb2.EvaluateResponse:
        """module_quality.evaluate of a module bundle (REFERENCE) or a file exported from one, against the
        float model: for REFERENCE tokenizer_model when given (e.g. the source of a pruned model), else itself."""
        if request.max_samples < 0:
            raise InvalidArgument(f"max_samples must be ≥ 0, got {request.max_samples}", field="max_samples")
        module_export.check_evaluation(export_format)
        if export_format is ExportFormat.REFERENCE:
            module_dir, path = reference, reference.path
            if request.tokenizer_model:
                reference = self._module_bundle(request.tokenizer_model, "tokenizer_model")
                if reference is None:
                    raise InvalidArgument("tokenizer_model must be the float module bundle the model was made from",
                                          reason="UNKNOWN_MODEL_FORMAT", field="tokenizer_model")
        else:
            module_dir, path = reference, self._runnable(request.model)
        samples = load_samples(self.access.local_path(request.dataset), module_dir.task, "dataset")
        result, runtime = module_export.evaluate(export_format, path, module_dir, reference, samples,
                                                 request.max_samples)
        quality = common_pb2.Quality(metric=result["metric"], value=result["value"],
                                     higher_is_better=result["higher_is_better"], tokens=result["samples"],
                                     metrics=result["metrics"])
        return exporter_pb2.EvaluateResponse(quality=quality, runtime=runtime)


def registration(access: ArtifactAccess):
    return (exporter_pb2_grpc.add_ExporterServicer_to_server, ExporterServicer(access), SERVICE_NAME)
