"""The benchmark and selection stages of a build: resolve each target to its devices, queue one job
per (target, candidate), wait for the agents' measurements, choose per target, write the reports.

A target is a pool by default: each candidate is measured once, by whichever matching device that
has the runtime is free (another one if it dies). With each_device, every matching device measures
every candidate and gets its own choice, as the target "<name>/<device id>". A candidate whose runtime
no matching device has (Core ML on Linux, an agent started without llama.cpp) fails at once for that
target with RUNTIME_UNAVAILABLE and every device's reason, instead of waiting for the timeout.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import time
from typing import TYPE_CHECKING

from google.rpc import status_pb2

from edgeforge.v1 import agent_pb2, common_pb2, coordinator_pb2
from services.coordinator import predictions, report, selectors
from services.coordinator.selection import Budget, Measured, Objective, Status, select
from services.coordinator.spec import effective_constraints
from services.coordinator.state import CANCELLED, FAILED, SUCCEEDED, digest
from shared.errors import Cancelled, FailedPrecondition
from shared.grpc_status import status_of
from shared.store.records import ArtifactKind, Lineage, parse_artifact_name
from shared.versions import tool_versions

if TYPE_CHECKING:
    from services.coordinator.pipeline import BuildRunner

Stage = coordinator_pb2.BuildStage
_STATUS = {Status.CHOSEN: coordinator_pb2.CANDIDATE_STATUS_CHOSEN, Status.ELIGIBLE: coordinator_pb2.CANDIDATE_STATUS_ELIGIBLE,
           Status.REJECTED: coordinator_pb2.CANDIDATE_STATUS_REJECTED, Status.FAILED: coordinator_pb2.CANDIDATE_STATUS_FAILED}
_OBJECTIVES = {coordinator_pb2.OBJECTIVE_BEST_QUALITY: Objective.BEST_QUALITY,
               coordinator_pb2.OBJECTIVE_LOWEST_LATENCY: Objective.LOWEST_LATENCY,
               coordinator_pb2.OBJECTIVE_SMALLEST: Objective.SMALLEST}
RUNTIME_OF_FORMAT = {common_pb2.EXPORT_FORMAT_GGUF: "llama.cpp", common_pb2.EXPORT_FORMAT_ONNX: "onnxruntime",
                     common_pb2.EXPORT_FORMAT_TFLITE: "litert", common_pb2.EXPORT_FORMAT_COREML: "coreml"}


@dataclasses.dataclass(frozen=True)
class Pool:
    """One target as scheduled: a named pool (selector) or one device (each_device, or a device target)."""
    name: str
    target: coordinator_pb2.Target
    device_id: str = ""                    # pinned device; "" for a pool

    def matches(self, device: coordinator_pb2.Device) -> bool:
        if self.device_id:
            return device.name == f"devices/{self.device_id}"
        if self.target.device:
            return device.name == self.target.device
        return selectors.parse(self.target.selector).matches(device.attributes)

    @property
    def selector(self) -> dict[str, str]:
        return {} if self.device_id or self.target.device else dict(self.target.selector)

    @property
    def pinned(self) -> str:
        return self.device_id or self.target.device.removeprefix("devices/")


def matches(device: coordinator_pb2.Device, target: coordinator_pb2.Target) -> bool:
    return Pool("", target).matches(device)


def resolve_pools(runner: "BuildRunner") -> list[Pool]:
    """The pools of every target, waiting up to device_wait_s for each target to match an online device."""
    deadline = time.monotonic() + runner.ctx.device_wait_s
    targets = runner.build.spec.targets
    while True:
        online = runner.ctx.online_devices()
        unmatched = [i for i, t in enumerate(targets) if not any(matches(d, t) for d in online)]
        if not unmatched:
            break
        if time.monotonic() >= deadline:
            target = targets[unmatched[0]]
            wanted = target.device or json.dumps(dict(target.selector), sort_keys=True)
            known = ", ".join(f"{d.name} {dict(d.attributes).get('os', '?')}/{dict(d.attributes).get('arch', '?')}"
                              for d in online) or "none online"
            raise FailedPrecondition(f"no online device matches targets[{unmatched[0]}] {wanted} after "
                                     f"{runner.ctx.device_wait_s:.0f} s (devices: {known})", reason="NO_MATCHING_DEVICE",
                                     field=f"targets[{unmatched[0]}]")
        runner.step(Stage.BUILD_STAGE_BENCHMARK, 70, f"waiting for a device matching targets[{unmatched[0]}]")
        time.sleep(1.0)
    pools = []
    for target in targets:
        if target.each_device and not target.device:
            pools += [Pool(f"{target.name}/{d.name.removeprefix('devices/')}", target, d.name.removeprefix("devices/"))
                      for d in online if matches(d, target)]
        else:
            pools.append(Pool(target.name, target))
    return pools


def _no_runtime(pool: Pool, runtime: str, online: list[coordinator_pb2.Device]) -> status_pb2.Status | None:
    """RUNTIME_UNAVAILABLE when no online device of `pool` has `runtime`, with each device's reason."""
    members = [d for d in online if pool.matches(d)]
    if not runtime or any(f"runtime:{runtime}" in d.attributes for d in members):
        return None
    reasons = "; ".join(f"{d.name}: {d.unavailable_runtimes.get(runtime) or 'its agent does not offer ' + runtime}"
                        for d in members)
    return status_of(FailedPrecondition(f"no device of target {pool.name} can run {runtime} ({reasons})",
                                        reason="RUNTIME_UNAVAILABLE"))


def run(runner: "BuildRunner", candidates) -> None:
    build, ctx = runner.build, runner.ctx
    runner.step(Stage.BUILD_STAGE_BENCHMARK, 70, "matching devices")
    # A resumed build keeps the jobs it has; when a crash interrupted this loop (no "all queued" mark),
    # it queues only the (target, candidate) pairs left out: none is queued twice, none is lost.
    all_queued = digest(["benchmark jobs queued", runner.build_id])
    if ctx.state.memo_get(all_queued) is None:
        queued = {(row["target"], row["candidate_id"]) for row in ctx.state.jobs_of_build(runner.build_id)}
        ready = [c for c in build.candidates if not c.HasField("error")]
        pools = resolve_pools(runner)
        online = ctx.online_devices()
        for pool in pools:
            for candidate in ready:
                if (pool.name, candidate.id) in queued:
                    continue
                runtime = RUNTIME_OF_FORMAT.get(candidate.format, "")
                job = agent_pb2.BenchmarkJob(build=build.name, candidate_id=candidate.id, format=candidate.format,
                                             artifact=candidate.artifact, sha256=parse_artifact_name(candidate.artifact),
                                             size_bytes=candidate.size_bytes, config=build.spec.benchmark,
                                             task=build.spec.model.task, runtime=runtime, target=pool.name)
                missing = _no_runtime(pool, runtime, online)
                if missing is not None:
                    ctx.state.add_job(runner.build_id, candidate.id, pool.pinned, job, target=pool.name,
                                      selector=pool.selector, failed=missing.SerializeToString())
                else:
                    ctx.scheduler.enqueue(runner.build_id, candidate.id, pool.pinned, job, selector=pool.selector,
                                          priority=build.spec.priority)
        ctx.state.memo_put(all_queued, b"1")
    deadline = time.monotonic() + ctx.benchmark_timeout_s
    reported = None
    while True:
        ctx.scheduler.expire_stale()
        rows = ctx.state.jobs_of_build(runner.build_id)
        finished = [r for r in rows if r["state"] in (SUCCEEDED, FAILED, CANCELLED)]
        # Save progress (a commit that wakes every waiter) only when the count moved: with many builds
        # waiting they would otherwise wake each other in a loop of commits (bench/load.py measured it).
        if len(finished) != reported:
            runner.step(Stage.BUILD_STAGE_BENCHMARK, 70 + 25 * len(finished) / max(len(rows), 1),
                        f"measured {len(finished)} of {len(rows)} (target, candidate) pairs")
            reported = len(finished)
        elif ctx.state.load_build(runner.build_id)[3]:
            raise Cancelled(f"build {build.name} was cancelled")
        else:
            runner.fence()         # another coordinator took the build over: it waits for these results now
        if len(finished) == len(rows) or time.monotonic() >= deadline:
            break
        with ctx.changed:
            ctx.changed.wait(1.0)
    assemble(runner, ctx.state.jobs_of_build(runner.build_id))


def _budget(constraints: coordinator_pb2.Constraints) -> Budget:
    def field(name):
        return getattr(constraints, name) if constraints.HasField(name) else None
    return Budget(field("max_size_bytes"), field("max_p90_latency_ms"), field("max_quality_loss_pct"),
                  field("max_peak_memory_bytes"))


def _entry(candidate: coordinator_pb2.CandidateResult, row: dict | None) -> coordinator_pb2.DeviceCandidate:
    """One candidate on one target: its measurement, or the error that stopped it (with its status)."""
    entry = coordinator_pb2.DeviceCandidate(candidate_id=candidate.id)
    if candidate.HasField("error"):
        entry.error.CopyFrom(candidate.error)
        return entry
    if row is None:
        entry.error.CopyFrom(status_pb2.Status(code=4, message="not measured"))
        return entry
    entry.device = f"devices/{row['measured_by']}" if row["measured_by"] else ""
    entry.attempts = row["attempts"]
    if row["state"] == SUCCEEDED:
        entry.measurement.CopyFrom(common_pb2.Measurement.FromString(row["outcome"]))
    elif row["outcome"]:
        entry.error.CopyFrom(status_pb2.Status.FromString(row["outcome"]))       # the agent's or scheduler's own
    else:
        message = "cancelled" if row["state"] == CANCELLED else "no measurement before the benchmark timeout"
        entry.error.CopyFrom(status_pb2.Status(code=1 if row["state"] == CANCELLED else 4, message=message))
    return entry


def assemble(runner: "BuildRunner", rows) -> None:
    """Per target: the measurements, the selection, the Pareto front and why every other candidate lost."""
    build, spec = runner.build, runner.build.spec
    targets = {t.name: t for t in spec.targets}
    devices = {d.name: d for d, _ in runner.ctx.state.devices()}
    pools: dict[str, list[dict]] = collections.OrderedDict()
    for row in rows:
        pools.setdefault(row["target"], []).append(row)
    objective = _OBJECTIVES.get(spec.objective, Objective.BEST_QUALITY)
    del build.devices[:]
    for name, pool_rows in pools.items():
        target = targets.get(name.split("/", 1)[0], coordinator_pb2.Target())
        constraints = effective_constraints(spec, target)
        by_candidate = {r["candidate_id"]: r for r in pool_rows}
        result = coordinator_pb2.DeviceResult(target=name, constraints=constraints)
        measured = []
        for candidate in build.candidates:
            entry = _entry(candidate, by_candidate.get(candidate.id))
            error = entry.error.message if entry.HasField("error") else ""
            # Selection ranks lower-is-better numbers: perplexity itself, or the loss in percent of a
            # higher-is-better metric (accuracy, agreement, cosine similarity).
            quality = candidate.quality.delta_pct if candidate.quality.higher_is_better else candidate.quality.value
            measured.append(Measured(candidate.id, candidate.size_bytes, quality, candidate.quality.delta_pct,
                                     entry.measurement.latency.p90_ms, error, entry.measurement.peak_rss_bytes))
            result.candidates.append(entry)
        measured_by = collections.Counter(e.device for e in result.candidates if e.device)
        pinned = next((r["device_id"] for r in pool_rows if r["device_id"]), "")
        result.device = measured_by.most_common(1)[0][0] if measured_by else (f"devices/{pinned}" if pinned else "")
        if result.device in devices:
            result.attributes.update(devices[result.device].attributes)
        selection = select(measured, _budget(constraints), objective)
        result.chosen_candidate = selection.chosen or ""
        result.nearest_misses.extend(selection.nearest_misses)
        for entry, verdict in zip(result.candidates, selection.verdicts):
            entry.status, entry.rejected_by = _STATUS[verdict.status], verdict.reason
            entry.pareto = verdict.pareto
            entry.dominated_by.extend(verdict.dominated_by)
        build.devices.append(result)
    runner.save(done=False)


def write_reports(runner: "BuildRunner") -> None:
    build, store = runner.build, runner.ctx.store
    document = report.build_report(build)
    predictions.add_predictions(document, predictions.model_shape(store, build.reference_model))
    scratch = store.blobs.temp_dir()
    lineage = Lineage(tuple(c.artifact for c in build.candidates if c.artifact), {"build": build.name},
                      tool_versions(), "edgeforge.v1.Coordinator/CreateBuild")
    json_path = scratch / "report.json"
    json_path.write_text(json.dumps(document, indent=2, sort_keys=False))
    html_path = scratch / "report.html"
    html_path.write_text(report.render_html(document))
    build.report_json_artifact = store.put_file(json_path, ArtifactKind.REPORT, display_name="report.json",
                                                media_type="application/json", lineage=lineage, move=True).name
    build.report_html_artifact = store.put_file(html_path, ArtifactKind.REPORT, display_name="report.html",
                                                media_type="text/html", lineage=lineage, move=True).name
    scratch.rmdir()
