"""Compressor gRPC servicer: model import and quantization."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import torch

from edgeforge.v1 import common_pb2, compressor_pb2, compressor_pb2_grpc
from services.calibrator.stats import CalibrationStats
from services.compressor.compress import Calibration, check_steps, compress, needs_sequences
from services.compressor.convert import result_to_proto
from services.compressor.steps import CAUSAL_LM, TASKS, task_name
from shared.artifact_access import ArtifactAccess, open_model
from shared.artifact_convert import artifact_to_proto
from shared.errors import FailedPrecondition, InvalidArgument
from shared.grpc_status import rpc
from shared.models import bundle, module_import, modules
from shared.models.bundle import ModelDir
from shared.models.gguf_import import import_gguf, is_gguf
from shared.quant import compressed
from shared.quant.proto import quantization_from_proto
from shared.store.records import ArtifactKind, Lineage
from shared.versions import tool_versions

SERVICE_NAME = "edgeforge.v1.Compressor"
DEFAULT_SAMPLES = 128
DEFAULT_SEQUENCE_LENGTH = 512
TASK_PROTOS = {name: value for value, name in TASKS.items()}


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
        task = _requested_task(request.task)
        family = modules.tar_family(path) if bundle.is_bundle(path) else None
        if not is_gguf(path) and (family is not None or not bundle.is_bundle(path)):
            return self._import_module(request.source, source, path, family, task)
        if task not in (None, CAUSAL_LM):
            raise InvalidArgument(f"source {request.source} ({source.display_name}) is a causal LM; task {task} "
                                  "does not fit", field="task")
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
        else:
            model, _ = open_model(self.access, request.source, field="source")   # validates config and tensors
            for name in model.tensor_names():             # and every value, chunk by chunk: NaN/Inf is refused
                for _ in model.row_chunks(name):          # here, not halfway through a long compression
                    pass
            config, record = model.config, source
        return compressor_pb2.ImportModelResponse(model=artifact_to_proto(record), architecture="llama",
                                                  parameter_count=config.parameter_count(),
                                                  task=common_pb2.MODEL_TASK_CAUSAL_LM)

    def _import_module(self, name: str, source, path: Path, family: str | None,
                       task: str | None) -> compressor_pb2.ImportModelResponse:
        """An image classifier or text encoder: a module bundle is checked (manifest, files, weights, one
        forward pass) and returned unchanged; a BERT directory's bundle, an ONNX file, a .pt2 or a
        MobileNetV2 state dict becomes a new module bundle."""
        work = Path(tempfile.mkdtemp(dir=self._scratch(), prefix="import-"))
        try:
            with _as_source_field():
                if family == "module":
                    module_dir = modules.ModuleDir(modules.unpack(path, work / "source"))
                    if task not in (None, module_dir.task):
                        raise InvalidArgument(f"source {name} is a {module_dir.task} module; task {task} does "
                                              "not fit", field="task")
                    modules.validate(module_dir)
                    record = source
                else:
                    unpacked = modules.unpack(path, work / "source") if family == "bert" else path
                    module_dir = module_import.import_source(unpacked, work / "module", task)
                    if module_dir is None:
                        raise InvalidArgument(
                            f"source {name} ({source.display_name}) is not a model edgeforge imports: expected a "
                            "GGUF file, a model bundle (tar of an HF decoder or BERT directory, or of an edgeforge "
                            "module directory), an ONNX file, a torch ExportedProgram (.pt2) or a torchvision "
                            "MobileNetV2 state dict (.pth)", reason="UNKNOWN_MODEL_FORMAT", field="source")
                    modules.pack(module_dir.path, work / "model.tar")
                    record = self.access.put(
                        work / "model.tar", ArtifactKind.MODEL, display_name=f"{source.display_name}-module",
                        media_type=modules.MEDIA_TYPE,
                        lineage=Lineage((name,), {"import": module_dir.source["format"], "task": module_dir.task},
                                        tool_versions("torch", "safetensors", "onnx"), f"{SERVICE_NAME}/ImportModel"),
                        labels={"architecture": module_dir.architecture, "task": module_dir.task,
                                "dtype": "float32"})
                parameters = module_dir.parameter_count()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return compressor_pb2.ImportModelResponse(model=artifact_to_proto(record),
                                                  architecture=module_dir.architecture, parameter_count=parameters,
                                                  task=TASK_PROTOS[module_dir.task])

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


    @rpc
    def Transform(self, request: compressor_pb2.TransformRequest, context) -> compressor_pb2.TransformResponse:
        """Prune / distill / qat steps on a float model (services/compressor/transform.py)."""
        from services.compressor.steps import pipeline_from_protos, task_name
        from services.compressor.transform import TransformData, check_inputs, run_transform
        task = task_name(request.task, "task")
        pipeline = pipeline_from_protos(request.steps, task, "steps")
        if not pipeline.transforms or pipeline.quantize is not None and pipeline.qat is None:
            raise InvalidArgument("steps must be prune, distill or qat steps (post-training quantization is Compress "
                                  "or the exporter's grid)", field="steps")
        if not request.evaluation_dataset:
            raise InvalidArgument("evaluation_dataset is required (quality is reported after every step)",
                                  field="evaluation_dataset")
        datasets = {field: self.access.local_path(getattr(request, field)) if getattr(request, field) else None
                    for field in ("calibration_dataset", "training_dataset", "evaluation_dataset")}
        for field, path in datasets.items():     # before the source model's evaluation, which takes a while
            if path is not None and path.stat().st_size == 0:
                raise InvalidArgument(f"{field} {getattr(request, field)} is empty", reason="INSUFFICIENT_DATA",
                                      field=field)
        data = TransformData(task, datasets["calibration_dataset"], request.calibration_samples or
                             (32 if task == "causal_lm" else 128), request.calibration_sequence_length or
                             DEFAULT_SEQUENCE_LENGTH, datasets["training_dataset"], datasets["evaluation_dataset"],
                             request.evaluation_max_tokens or 4096, request.evaluation_window_tokens or 512)
        check_inputs(data, pipeline.transforms)
        source_dir = self._model_dir(request.model, task)
        started = time.perf_counter()
        work = Path(tempfile.mkdtemp(dir=self._scratch(), prefix="transform-"))
        try:
            reports, parameters = run_transform(source_dir, pipeline.transforms, data, work / "steps", work / "model")
            (bundle.pack if task == "causal_lm" else modules.pack)(work / "model", work / "model.tar")
            inputs = (request.model,) + tuple(name for name in (request.calibration_dataset, request.training_dataset,
                                                                request.evaluation_dataset) if name)
            record = self.access.put(
                work / "model.tar", ArtifactKind.MODEL, display_name="-".join(s.kind for s in pipeline.transforms),
                media_type=bundle.MEDIA_TYPE if task == "causal_lm" else modules.MEDIA_TYPE,
                lineage=Lineage(tuple(dict.fromkeys(inputs)), {"steps": pipeline.to_dicts(), "task": task},
                                tool_versions("numpy", "safetensors", "torch"), f"{SERVICE_NAME}/Transform"),
                labels={"steps": " → ".join(s.describe() for s in pipeline.transforms)[:250],
                        "parameters": str(parameters)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        return compressor_pb2.TransformResponse(model=artifact_to_proto(record), steps=reports,
                                                seconds=time.perf_counter() - started, device=device,
                                                parameter_count=parameters)

    def _model_dir(self, name: str, task: str) -> Path:
        """The unpacked float model: a decoder bundle for causal LMs, a module bundle otherwise."""
        if task == "causal_lm":
            model, _ = open_model(self.access, name)
            return model.path
        return modules.open_artifact(self.access, name).path


def _requested_task(task: int) -> str | None:
    if task == common_pb2.MODEL_TASK_UNSPECIFIED:
        return None
    return task_name(task, "task")


@contextlib.contextmanager
def _as_source_field():
    """The module core names the model it reads "model"; in this RPC that is the `source` field."""
    try:
        yield
    except (InvalidArgument, FailedPrecondition) as error:
        if error.field != "model":
            raise
        raise type(error)(error.message, reason=error.reason, field="source") from error


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
