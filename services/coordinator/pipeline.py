"""One build, stage by stage: import → calibrate → (transform → compress → export → evaluate) per
candidate → benchmark on matching devices → select → report. Runs in its own thread; every step is
saved, and work whose inputs were seen before is reused from the memo instead of being redone.

After a coordinator restart the build runs again (its run number goes up): every stage finished before
the kill is in the memo and is reused, not redone, so the build resumes from its last completed stage.
The resumed run says so: in the progress message of each reused stage, in its final message ("done;
resumed after a restart, reusing N finished stages: ..."), in the log, and per stage in
CoordinatorState.stage_runs. Progress never goes backwards across the restart.

Causal LMs are quantized by the compressor (Compress) and exported from the compressed model; image
classifiers and encoders are quantized by the exporter (ExportRequest.quantization, RTN onto a generic
grid). A candidate with prune/distill/qat steps first gets its own float model from Transform, and that
model is what it is compressed, exported and validated from; its quality is always measured against
the build's source model.
"""
from __future__ import annotations

import logging

from edgeforge.v1 import calibrator_pb2, common_pb2, compressor_pb2, coordinator_pb2, exporter_pb2
from services.calibrator.stats_file import VERSION as STATS_VERSION
from services.compressor.steps import CAUSAL_LM, quality_loss_pct, step_to_proto, task_name
from services.coordinator import benchmarks, steps as coordinator_steps
from services.coordinator.claims import ClaimLost
from services.coordinator.context import CoordinatorContext
from services.coordinator.spec import PlannedCandidate, plan
from services.coordinator.state import digest
from services.exporter.base import ExportFormat
from services.exporter.convert import format_to_proto, options_to_proto
from shared import logs
from shared.artifact_convert import struct
from shared.errors import Cancelled, EdgeforgeError, ResourceExhausted
from shared.grpc_status import status_of
from shared.quant.grids import Method
from shared.quant.proto import quantization_to_proto
from shared.store.records import parse_artifact_name

log = logging.getLogger(__name__)
Stage = coordinator_pb2.BuildStage


class BuildRunner:
    """Runs one build on the coordinator that claimed it at `epoch` (services/coordinator/claims.py): when
    another coordinator takes the build over, this runner stops before its next stage or write."""

    def __init__(self, build_id: str, ctx: CoordinatorContext, epoch: int = 0):
        self.build_id, self.ctx, self.epoch = build_id, ctx, epoch
        self.coordinator_id = ctx.claims.coordinator_id if ctx.claims is not None else ""
        self.build, self.progress, _, _ = ctx.state.load_build(build_id)
        self.run_number = ctx.state.begin_run(build_id)
        self.resumed = self.run_number > 1             # a coordinator restarted, or another took the build over
        self.reused: list[str] = []                    # stages of a resumed run reused from before the restart
        self.finished_before = {r["key"] for r in ctx.state.stage_runs(build_id)} if self.resumed else set()

    # ------------------------------------------------------------------ bookkeeping
    def step(self, stage: int, percent: float, message: str, candidate: str = "") -> None:
        _, _, _, cancel = self.ctx.state.load_build(self.build_id)
        if cancel:
            raise Cancelled(f"build {self.build.name} was cancelled")
        # A resumed build walks through its finished stages again (each a memo hit): progress never goes back.
        self.progress.stage, self.progress.message = stage, message
        self.progress.percent = max(percent, self.progress.percent)
        self.progress.candidate_id = candidate
        logs.bind(candidate=candidate)             # the build's thread: its log lines name the candidate
        self.progress.update_time.GetCurrentTime()
        self.save(done=False)
        log.info("%s %5.1f%% %s", self.build.name, percent, message)

    def fence(self) -> None:
        """Raises ClaimLost unless this coordinator still holds the build at this runner's epoch. Checked
        before every stage and every write: once another coordinator took the build over (this one was
        frozen or cut off for longer than the claim's ttl), only that one may run or record anything."""
        claims = self.ctx.claims
        if claims is not None and not claims.holds(self.build_id, self.epoch):
            raise ClaimLost(self.build_id, claims.owner(self.build_id))

    def save(self, done: bool) -> None:
        self.fence()
        self.build.update_time.GetCurrentTime()
        self.ctx.state.save_build(self.build, self.progress, done)
        self.ctx.notify()

    def memoized(self, stage: str, key_parts: list, call, response_cls, artifacts):
        """Returns (response, reused). `artifacts(response)` lists the artifact names it depends on; a memo
        entry is reused only while each of them still has its row and its blob."""
        key = digest([stage, key_parts])
        label = " ".join(filter(None, [stage, self.progress.candidate_id]))
        self.fence()
        cached = self.ctx.state.memo_get(key)
        if cached is not None:
            response = response_cls.FromString(cached)
            if all(self._stored(name) for name in artifacts(response)):
                self.ctx.state.record_reuse(self.build_id, self.run_number, label, key, coordinator=self.coordinator_id)
                if key in self.finished_before:
                    self.reused.append(label)
                    self.progress.message = f"{self.progress.message}: reused from before the restart"
                    self.save(done=False)
                    log.info("%s: %s reused from before the restart", self.build.name, label)
                return response, True
        response = call()
        self.fence()              # a runner taken over during the call must not record its result
        self.ctx.state.memo_put(key, response.SerializeToString(), build_id=self.build_id, run=self.run_number,
                                stage=label, coordinator=self.coordinator_id)
        return response, False

    def _stored(self, name: str) -> bool:
        sha256 = parse_artifact_name(name)
        return self.ctx.store.exists(sha256) and self.ctx.store.blobs.exists(sha256)

    # ------------------------------------------------------------------ the build
    def run(self) -> None:
        # The build's log lines name it (and, through step(), the candidate), until run returns: fields bound
        # here are restored then, so a caller's thread (a test calling run() directly) keeps its own.
        with logs.fields(build=self.build.name, candidate=None):
            try:
                self._run_recorded()
            except ClaimLost as lost:       # the new owner resumes the build from the memo; nothing to record
                log.warning("%s: stopped here, %s (this runner's claim, epoch %d, lapsed)", self.build.name, lost,
                            self.epoch)

    def _run_recorded(self) -> None:
        try:
            self._run()
            self.build.state = coordinator_pb2.BUILD_STATE_SUCCEEDED
            self.progress.stage, self.progress.percent, self.progress.message = Stage.BUILD_STAGE_DONE, 100.0, "done"
            if self.resumed:
                self.progress.message += (f"; resumed after a restart, reusing {len(self.reused)} finished stages"
                                          + (f": {', '.join(self.reused)}" if self.reused else ""))
        except Cancelled as error:
            self.ctx.scheduler.cancel_build(self.build_id)
            self.build.state = coordinator_pb2.BUILD_STATE_CANCELLED
            self.build.error.CopyFrom(status_of(error))
            self.progress.message = "cancelled"
        except EdgeforgeError as error:
            log.warning("%s failed: %s", self.build.name, error.message)
            self.ctx.scheduler.cancel_build(self.build_id)
            self.build.state = coordinator_pb2.BUILD_STATE_FAILED
            self.build.error.CopyFrom(status_of(error))
            self.progress.message = f"failed: {error.message}"
        except ClaimLost:
            raise
        except Exception as error:     # a bug: the build fails with INTERNAL, the coordinator keeps serving
            log.exception("%s crashed", self.build.name)
            self.build.state = coordinator_pb2.BUILD_STATE_FAILED
            self.build.error.CopyFrom(status_of(EdgeforgeError(f"internal error: {type(error).__name__}: {error}")))
            self.progress.message = "failed: internal error"
        self.progress.update_time.GetCurrentTime()
        try:
            self.save(done=True)
            if self.ctx.metrics is not None:
                self.ctx.metrics.build_finished(self.build)
        except EdgeforgeError as error:     # e.g. the disk is full: the build stays unfinished on disk
            log.error("%s: could not record its end (%s); it will run again when the coordinator restarts",
                      self.build.name, error.message)

    def _run(self) -> None:
        spec, workers = self.build.spec, self.ctx.workers
        self.step(Stage.BUILD_STAGE_IMPORT, 1, "importing the source model")
        task = spec.model.task if task_name(spec.model.task) != CAUSAL_LM else 0     # LM keys predate the field
        imported, _ = self.memoized(
            "import", [spec.model.artifact] + ([task] if task else []),
            lambda: workers.call(workers.compressor.ImportModel,
                                 compressor_pb2.ImportModelRequest(source=spec.model.artifact, task=spec.model.task)),
            compressor_pb2.ImportModelResponse, lambda r: [r.model.name])
        model = imported.model.name
        self.build.reference_model = model

        if self.needs_calibration():
            self.step(Stage.BUILD_STAGE_CALIBRATE, 5, "calibrating activation statistics")
            calibration = {"samples": spec.calibration.samples, "sequence_length": spec.calibration.sequence_length,
                           "hessians": self.needs_hessians()}      # XᵀX doubles calibration time: only when used
            calibrated, reused = self.memoized(
                "calibrate", [model, spec.calibration.dataset, calibration, STATS_VERSION],
                lambda: workers.call(workers.calibrator.Calibrate, calibrator_pb2.CalibrateRequest(
                    model=model, dataset=spec.calibration.dataset, **calibration)),
                calibrator_pb2.CalibrateResponse, lambda r: [r.stats.name])
            self.build.calibration_stats = calibrated.stats.name
            if reused:
                log.info("%s reused calibration %s", self.build.name, calibrated.stats.name)

        self.step(Stage.BUILD_STAGE_EVALUATE, 12, "evaluating the float32 reference")
        baseline = self.evaluate(model, ExportFormat.REFERENCE, model)
        self.build.baseline.CopyFrom(baseline)

        candidates = plan(spec)
        del self.build.candidates[:]
        for index, candidate in enumerate(candidates):
            self.build.candidates.append(self.make_candidate(candidate, model, index, len(candidates)))
            self.save(done=False)

        benchmarks.run(self, candidates)
        self.step(Stage.BUILD_STAGE_SELECT, 97, "writing the report")
        self.build.state = coordinator_pb2.BUILD_STATE_SUCCEEDED      # what the report describes
        benchmarks.write_reports(self)

    def needs_calibration(self) -> bool:
        """Calibrated methods, multi-step recipes and int8 activations of causal LMs read the calibrator's
        statistics; RTN and float candidates do not (so a build of only those skips the stage). Pipeline steps
        (Wanda, SparseGPT, structured) and image/encoder models gather their own statistics in Transform."""
        return any(not candidate.module and (candidate.quantization.calibrated and candidate.pipeline is None
                                             or candidate.pre_steps or candidate.options.int8_activations)
                   for candidate in plan(self.build.spec))

    def needs_hessians(self) -> bool:
        """Mixed precision and GPTQ without sequential calibration read the calibrator's Hessians."""
        for candidate in plan(self.build.spec):
            for step in (*candidate.pre_steps, candidate.quantization):
                if step.mixed is not None or (step.method is Method.GPTQ and not step.gptq.sequential):
                    return True
        return False

    def evaluate(self, artifact: str, export_format: ExportFormat, model: str) -> common_pb2.Quality:
        """Quality of `artifact` on the evaluation data; `model` is the build's source model (its tokenizer,
        and for image/encoder models the outputs that agreement and cosine similarity compare with)."""
        spec, workers = self.build.spec, self.ctx.workers
        evaluation = {"max_tokens": spec.evaluation.max_tokens, "window_tokens": spec.evaluation.window_tokens}
        if spec.evaluation.max_samples:
            evaluation["max_samples"] = spec.evaluation.max_samples
        request = exporter_pb2.EvaluateRequest(model=artifact, format=format_to_proto(export_format),
                                               dataset=spec.evaluation.dataset, tokenizer_model=model, **evaluation)
        response, _ = self.memoized("evaluate", [artifact, export_format.value, spec.evaluation.dataset, model,
                                                 evaluation],
                                    lambda: workers.call(workers.exporter.Evaluate, request),
                                    exporter_pb2.EvaluateResponse, lambda r: [])
        return response.quality

    def transform(self, candidate: PlannedCandidate, model: str) -> compressor_pb2.TransformResponse:
        """The candidate's prune/distill/qat steps on the source model (memoized like every stage)."""
        spec, workers = self.build.spec, self.ctx.workers
        steps = candidate.pipeline.transforms
        request = compressor_pb2.TransformRequest(
            model=model, task=spec.model.task, steps=[step_to_proto(step) for step in steps],
            calibration_dataset=spec.calibration.dataset, calibration_samples=spec.calibration.samples,
            calibration_sequence_length=spec.calibration.sequence_length,
            training_dataset=spec.training.dataset or spec.calibration.dataset,
            evaluation_dataset=spec.evaluation.dataset, evaluation_max_tokens=spec.evaluation.max_tokens,
            evaluation_window_tokens=spec.evaluation.window_tokens)
        key = [model, [step.to_dict() for step in steps], request.calibration_dataset, request.calibration_samples,
               request.calibration_sequence_length, request.training_dataset, request.evaluation_dataset,
               request.evaluation_max_tokens, request.evaluation_window_tokens]
        response, _ = self.memoized("transform", key, lambda: workers.call(workers.compressor.Transform, request),
                                    compressor_pb2.TransformResponse, lambda r: [r.model.name])
        return response

    def make_candidate(self, candidate: PlannedCandidate, model: str, index: int,
                       count: int) -> coordinator_pb2.CandidateResult:
        workers = self.ctx.workers
        result = coordinator_pb2.CandidateResult(id=candidate.id, format=format_to_proto(candidate.format),
                                                 recipe=struct(candidate.recipe()))
        base = 15 + 55 * index / count
        source = model
        try:
            compressed = ""
            if candidate.pipeline is not None and candidate.pipeline.transforms:
                self.step(Stage.BUILD_STAGE_COMPRESS, base, f"transforming {candidate.id}", candidate.id)
                transformed = self.transform(candidate, model)
                model = result.transformed_model = transformed.model.name
                result.steps.extend(transformed.steps)
                result.compress_seconds += transformed.seconds
            if candidate.quantized and not candidate.module:
                self.step(Stage.BUILD_STAGE_COMPRESS, base, f"compressing {candidate.id}", candidate.id)
                spec = self.build.spec
                request = compressor_pb2.CompressRequest(
                    model=model, quantization=quantization_to_proto(candidate.quantization),
                    pre_steps=[quantization_to_proto(step) for step in candidate.pre_steps],
                    calibration_stats=self.build.calibration_stats, calibration_dataset=spec.calibration.dataset,
                    calibration_samples=spec.calibration.samples,
                    calibration_sequence_length=spec.calibration.sequence_length)
                key = [model, candidate.quantization.to_dict(), [step.to_dict() for step in candidate.pre_steps]]
                if candidate.quantization.calibrated or candidate.pre_steps:      # RTN ignores calibration
                    key += [self.build.calibration_stats, spec.calibration.dataset, spec.calibration.samples,
                            spec.calibration.sequence_length]
                response, _ = self.memoized(
                    "compress", key,
                    lambda: workers.call(workers.compressor.Compress, request),
                    compressor_pb2.CompressResponse, lambda r: [r.compressed.name])
                compressed = result.compressed_artifact = response.compressed.name
                result.tensors.extend(response.tensors)
                result.bits_per_weight = response.bits_per_weight
                result.compress_seconds += response.seconds
                if candidate.pipeline is not None:
                    result.steps.append(coordinator_steps.quantize_report(len(result.steps), candidate.quantization,
                                                                          response))
            self.step(Stage.BUILD_STAGE_EXPORT, base + 55 / count / 3, f"exporting {candidate.id}", candidate.id)
            calibration = self.build.calibration_stats if candidate.options.int8_activations else ""
            request = exporter_pb2.ExportRequest(model=model, compressed=compressed,
                                                 format=format_to_proto(candidate.format),
                                                 options=options_to_proto(candidate.options), calibration=calibration)
            key = [model, compressed, candidate.format.value, candidate.options.to_dict(), calibration]
            if candidate.module and candidate.quantized:         # the exporter rounds the weights
                request.quantization.CopyFrom(quantization_to_proto(candidate.quantization))
                key.append(candidate.quantization.to_dict())
            exported, _ = self.memoized(
                "export", key, lambda: workers.call(workers.exporter.Export, request),
                exporter_pb2.ExportResponse, lambda r: [r.exported.name])
            result.artifact, result.size_bytes = exported.exported.name, exported.exported.size_bytes
            result.validation.CopyFrom(exported.validation)
            self.step(Stage.BUILD_STAGE_EVALUATE, base + 2 * 55 / count / 3, f"evaluating {candidate.id}",
                      candidate.id)
            if exported.validation.positions == 0:
                # The format's runtime cannot run on this machine (Core ML off macOS): the file was proven
                # by reading it back, and its quality can only be measured where it runs.
                log.info("%s: %s not evaluated here (%s)", self.build.name, candidate.id, exported.validation.runtime)
                if candidate.pipeline is not None:
                    result.steps.append(coordinator_steps.export_report(len(result.steps), candidate, result))
                return result
            quality = self.evaluate(result.artifact, candidate.format, source)
            quality.baseline = self.build.baseline.value
            quality.delta_pct = quality_loss_pct(quality)
            result.quality.CopyFrom(quality)
            if candidate.pipeline is not None:
                result.steps.append(coordinator_steps.export_report(len(result.steps), candidate, result))
        except Cancelled:
            raise
        except ResourceExhausted as error:
            if error.reason == "STORAGE_FULL":   # not this candidate's fault: every later stage would fail too
                raise
            log.warning("%s candidate %s failed: %s", self.build.name, candidate.id, error.message)
            result.error.CopyFrom(status_of(error))
        except EdgeforgeError as error:
            log.warning("%s candidate %s failed: %s", self.build.name, candidate.id, error.message)
            result.error.CopyFrom(status_of(error))
        return result

