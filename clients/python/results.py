"""Typed results of a build: what `Client.build` and `AsyncClient.build` return.

A `BuildResult` is read from the coordinator's `Build` resource (the source of truth; its proto stays
at `.proto`) plus the parsed report.json. Per target it says which candidate was chosen, with the
numbers a release gate needs: the artifact, its size, its p90 latency on the device and its quality
loss against the float32 source.

    result = client.build("build.yaml")
    for target in result.targets:
        print(target.target, target.candidate_id, target.size_bytes, target.p90_ms, target.quality_delta_pct)
    sys.exit(0 if result.passed else 1)
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

from google.longrunning import operations_proto_pb2 as operations_pb2

from clients.python.errors import ApiError, from_status
from edgeforge.v1 import common_pb2, coordinator_pb2


class BuildState(enum.Enum):
    """Where a build is: the BuildState enum without its prefix."""
    UNSPECIFIED = coordinator_pb2.BUILD_STATE_UNSPECIFIED
    RUNNING = coordinator_pb2.BUILD_STATE_RUNNING
    SUCCEEDED = coordinator_pb2.BUILD_STATE_SUCCEEDED
    FAILED = coordinator_pb2.BUILD_STATE_FAILED
    CANCELLED = coordinator_pb2.BUILD_STATE_CANCELLED


@dataclasses.dataclass(frozen=True)
class Quality:
    """A candidate's quality on the evaluation data against the float32 source model."""
    metric: str               # "perplexity" (lower is better), "top1_accuracy", "cosine_similarity", ...
    value: float
    baseline: float           # the float32 source's value on the same data
    delta_pct: float          # degradation in percent: positive is worse, negative better than the source
    higher_is_better: bool


@dataclasses.dataclass(frozen=True)
class TargetResult:
    """One target's (with each_device, one device's) outcome: the chosen candidate, or why none was."""
    target: str                        # "pixel-8"; "targets-0" when the spec named none
    device: str                        # "devices/{device}" that measured (most of) the candidates
    attributes: dict[str, str]         # that device's attributes when it measured
    constraints: dict[str, float]      # the budgets applied: the build's, overridden by the target's
    candidate_id: str | None           # the chosen candidate, e.g. "gguf-q4_0"; None when none met the budgets
    artifact: str | None               # "artifacts/{sha256}" of the chosen exported file
    format: str | None                 # "gguf", "onnx", "tflite" or "coreml"
    size_bytes: int | None             # the chosen file's size
    p90_ms: float | None               # its p90 latency of one benchmark run on the device
    quality: Quality | None            # its quality against the float32 source
    nearest_misses: tuple[str, ...]    # when nothing was chosen: "<id>: <what it broke>", closest first

    @property
    def chosen(self) -> bool:
        """True when a candidate met every budget on this target."""
        return self.candidate_id is not None

    @property
    def quality_delta_pct(self) -> float | None:
        """The chosen candidate's quality loss in percent (positive is worse), or None."""
        return self.quality.delta_pct if self.quality is not None else None

    def why_not_chosen(self) -> str:
        """One line saying why this target has no artifact ("" when it has one)."""
        if self.chosen:
            return ""
        misses = "; ".join(self.nearest_misses[:3])
        return f"no candidate met the constraints{f' (nearest misses: {misses})' if misses else ''}"


@dataclasses.dataclass(frozen=True)
class Report:
    """A build's report: report.json parsed, and the names of both report artifacts."""
    build: str                         # "builds/{build}"
    document: dict[str, Any]           # report.json (docs/REPORT.md describes its keys)
    json_artifact: str                 # "artifacts/{sha256}" of report.json
    html_artifact: str                 # "artifacts/{sha256}" of the self-contained report.html


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """A finished build: its state, per target the chosen candidate, and the report."""
    build: str                         # "builds/{build}"
    operation: str                     # "operations/{build}"
    state: BuildState
    targets: tuple[TargetResult, ...]
    error: ApiError | None             # why the build failed or was cancelled; None when it succeeded
    report: dict[str, Any] | None      # report.json; None when the build ended before writing one
    proto: coordinator_pb2.Build = dataclasses.field(repr=False)

    @property
    def passed(self) -> bool:
        """True when the build succeeded and every target has a chosen candidate."""
        return self.state is BuildState.SUCCEEDED and bool(self.targets) and all(t.chosen for t in self.targets)

    def failures(self) -> list[str]:
        """Why the build did not pass, one line each ("" lines never); empty when it passed."""
        if self.state is not BuildState.SUCCEEDED:
            why = f": {self.error}" if self.error is not None else ""
            return [f"{self.build} {self.state.name.lower()}{why}"]
        if not self.targets:
            return [f"{self.build} has no target results"]
        return [f"{t.target} ({device_label(t)}): {t.why_not_chosen()}" for t in self.targets if not t.chosen]


def device_label(target: TargetResult) -> str:
    """A short name for the device of a target: its "device" attribute, else its resource id."""
    return target.attributes.get("device") or target.device.removeprefix("devices/") or "no device"


def format_name(value: int) -> str:
    return common_pb2.ExportFormat.Name(value).removeprefix("EXPORT_FORMAT_").lower()


def constraints_dict(message: coordinator_pb2.Constraints) -> dict[str, float]:
    return {field.name: value for field, value in message.ListFields()}


def target_result(device: coordinator_pb2.DeviceResult,
                  candidates: dict[str, coordinator_pb2.CandidateResult]) -> TargetResult:
    chosen = candidates.get(device.chosen_candidate) if device.chosen_candidate else None
    measured = next((c for c in device.candidates if c.candidate_id == device.chosen_candidate), None)
    quality = None
    if chosen is not None and chosen.HasField("quality"):
        q = chosen.quality
        quality = Quality(q.metric or "perplexity", q.value, q.baseline, q.delta_pct, q.higher_is_better)
    return TargetResult(
        target=device.target or device.device, device=device.device, attributes=dict(device.attributes),
        constraints=constraints_dict(device.constraints), candidate_id=device.chosen_candidate or None,
        artifact=chosen.artifact if chosen is not None else None,
        format=format_name(chosen.format) if chosen is not None else None,
        size_bytes=chosen.size_bytes if chosen is not None else None,
        p90_ms=measured.measurement.latency.p90_ms if measured is not None else None,
        quality=quality, nearest_misses=tuple(device.nearest_misses))


def build_result(operation: operations_pb2.Operation, build: coordinator_pb2.Build,
                 report: dict[str, Any] | None) -> BuildResult:
    """The typed result of a finished operation and its Build resource."""
    candidates = {c.id: c for c in build.candidates}
    error = None
    if operation.HasField("error"):
        error = from_status(operation.error.code, operation.error.message, operation.error.details)
    elif build.HasField("error"):
        error = from_status(build.error.code, build.error.message, build.error.details)
    return BuildResult(build=build.name, operation=operation.name, state=BuildState(build.state),
                       targets=tuple(target_result(d, candidates) for d in build.devices), error=error,
                       report=report, proto=build)


def progress_line(progress: coordinator_pb2.BuildProgress) -> str:
    """One line for a log: "[ 42%] benchmark gguf-q4_0: measuring on test-host"."""
    stage = coordinator_pb2.BuildStage.Name(progress.stage).removeprefix("BUILD_STAGE_").lower()
    candidate = f" {progress.candidate_id}" if progress.candidate_id else ""
    message = f": {progress.message}" if progress.message else ""
    return f"[{progress.percent:3.0f}%] {stage}{candidate}{message}"


def build_name(operation_name: str) -> str:
    """"operations/{build}" -> "builds/{build}" (a build and its operation share the id)."""
    return "builds/" + operation_name.removeprefix("operations/")


def operation_name(build: str) -> str:
    """"builds/{build}" -> "operations/{build}"; an operation name is returned as it is."""
    return "operations/" + build.removeprefix("builds/").removeprefix("operations/")
