"""The benchmark and selection stages of a build: match devices, queue one job per (device,
candidate), wait for the agents' measurements, choose per device, and write the reports."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from google.rpc import status_pb2

from edgeforge.v1 import agent_pb2, common_pb2, coordinator_pb2
from services.coordinator import report
from services.coordinator.selection import Budget, Measured, Objective, Status, select
from services.coordinator.state import CANCELLED, FAILED, QUEUED, LEASED, SUCCEEDED
from shared.errors import FailedPrecondition
from shared.store.records import ArtifactKind, Lineage, parse_artifact_name
from shared.versions import tool_versions

if TYPE_CHECKING:
    from services.coordinator.pipeline import BuildRunner

Stage = coordinator_pb2.BuildStage
_STATUS = {Status.CHOSEN: coordinator_pb2.CANDIDATE_STATUS_CHOSEN, Status.ELIGIBLE: coordinator_pb2.CANDIDATE_STATUS_ELIGIBLE,
           Status.REJECTED: coordinator_pb2.CANDIDATE_STATUS_REJECTED, Status.FAILED: coordinator_pb2.CANDIDATE_STATUS_FAILED}


def matches(device: coordinator_pb2.Device, target: coordinator_pb2.Target) -> bool:
    if target.device:
        return device.name == target.device
    return all(device.attributes.get(key) == value for key, value in target.selector.items())


def resolve_devices(runner: "BuildRunner") -> list[coordinator_pb2.Device]:
    """Online devices matching any target, waiting up to device_wait_s for each target to match one."""
    deadline = time.monotonic() + runner.ctx.device_wait_s
    while True:
        online = runner.ctx.online_devices()
        unmatched = [i for i, t in enumerate(runner.build.spec.targets) if not any(matches(d, t) for d in online)]
        if not unmatched:
            return [d for d in online if any(matches(d, t) for t in runner.build.spec.targets)]
        if time.monotonic() >= deadline:
            target = runner.build.spec.targets[unmatched[0]]
            wanted = target.device or json.dumps(dict(target.selector), sort_keys=True)
            known = ", ".join(f"{d.name} {dict(d.attributes).get('os', '?')}/{dict(d.attributes).get('arch', '?')}"
                              for d in online) or "none online"
            raise FailedPrecondition(f"no online device matches targets[{unmatched[0]}] {wanted} after "
                                     f"{runner.ctx.device_wait_s:.0f} s (devices: {known})", reason="NO_MATCHING_DEVICE",
                                     field=f"targets[{unmatched[0]}]")
        runner.step(Stage.BUILD_STAGE_BENCHMARK, 70, f"waiting for a device matching targets[{unmatched[0]}]")
        time.sleep(1.0)


def run(runner: "BuildRunner", candidates) -> None:
    build, ctx = runner.build, runner.ctx
    runner.step(Stage.BUILD_STAGE_BENCHMARK, 70, "matching devices")
    devices = resolve_devices(runner)
    ready = [c for c in build.candidates if not c.HasField("error")]
    if not ctx.state.jobs_of_build(runner.build_id):                  # a resumed build keeps its jobs
        for device in devices:
            for candidate in ready:
                sha = parse_artifact_name(candidate.artifact)
                job = agent_pb2.BenchmarkJob(build=build.name, candidate_id=candidate.id, format=candidate.format,
                                             artifact=candidate.artifact, sha256=sha, size_bytes=candidate.size_bytes,
                                             config=build.spec.benchmark)
                ctx.scheduler.enqueue(runner.build_id, candidate.id, device.name.removeprefix("devices/"), job)
    deadline = time.monotonic() + ctx.benchmark_timeout_s
    while True:
        ctx.scheduler.expire_stale()
        rows = ctx.state.jobs_of_build(runner.build_id)
        finished = [r for r in rows if r["state"] in (SUCCEEDED, FAILED, CANCELLED)]
        pending = len(rows) - len(finished)
        runner.step(Stage.BUILD_STAGE_BENCHMARK, 70 + 25 * len(finished) / max(len(rows), 1),
                    f"measured {len(finished)} of {len(rows)} (device, candidate) pairs")
        if pending == 0:
            break
        if time.monotonic() >= deadline:
            break
        with ctx.changed:
            ctx.changed.wait(1.0)
    assemble(runner, devices, ctx.state.jobs_of_build(runner.build_id))


def assemble(runner: "BuildRunner", devices, rows) -> None:
    """Per device: the measurements, the selection, and why every other candidate lost."""
    build = runner.build
    spec = build.spec
    budget = Budget(spec.constraints.max_size_bytes if spec.constraints.HasField("max_size_bytes") else None,
                    spec.constraints.max_p90_latency_ms if spec.constraints.HasField("max_p90_latency_ms") else None,
                    spec.constraints.max_quality_loss_pct if spec.constraints.HasField("max_quality_loss_pct") else None)
    objective = Objective.LOWEST_LATENCY if spec.objective == coordinator_pb2.OBJECTIVE_LOWEST_LATENCY \
        else Objective.BEST_QUALITY
    del build.devices[:]
    for device in devices:
        by_candidate = {r["candidate_id"]: r for r in rows if r["device_id"] == device.name.removeprefix("devices/")}
        result = coordinator_pb2.DeviceResult(device=device.name, attributes=device.attributes)
        measured = []
        for candidate in build.candidates:
            entry = coordinator_pb2.DeviceCandidate(candidate_id=candidate.id)
            row = by_candidate.get(candidate.id)
            error = candidate.error.message if candidate.HasField("error") else ""
            if not error and row is None:
                error = "not measured"
            elif not error and row["state"] == SUCCEEDED:
                entry.measurement.CopyFrom(common_pb2.Measurement.FromString(row["outcome"]))
            elif not error:
                status = status_pb2.Status.FromString(row["outcome"]) if row["outcome"] else None
                error = status.message if status else {QUEUED: "no measurement before the benchmark timeout",
                                                       LEASED: "no measurement before the benchmark timeout",
                                                       CANCELLED: "cancelled"}.get(row["state"], row["state"])
                if status:
                    entry.error.CopyFrom(status)                      # the agent's or scheduler's own status
            if error and not entry.HasField("error"):
                code = candidate.error.code if candidate.HasField("error") else 4     # DEADLINE_EXCEEDED / not run
                entry.error.CopyFrom(status_pb2.Status(code=code, message=error))
            measured.append(Measured(candidate.id, candidate.size_bytes, candidate.quality.value,
                                     candidate.quality.delta_pct, entry.measurement.latency.p90_ms, error))
            result.candidates.append(entry)
        chosen, verdicts = select(measured, budget, objective)
        result.chosen_candidate = chosen or ""
        for entry, verdict in zip(result.candidates, verdicts):
            entry.status, entry.rejected_by = _STATUS[verdict.status], verdict.reason
        build.devices.append(result)
    runner.save(done=False)


def write_reports(runner: "BuildRunner") -> None:
    build, store = runner.build, runner.ctx.store
    document = report.build_report(build)
    scratch = Path(tempfile.mkdtemp(dir=store.blobs.tmp))
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
