"""The control plane under load: concurrent builds and a fleet of agents against one coordinator process.

    .venv/bin/python bench/load.py [--builds 20] [--agents 100] [--agent-processes 4] [--quick]
                                   [--no-host-lock] [--no-warmup] [--idle-s 10] [--out bench/results/load.json]

Everything is real and talks over loopback, with auth on:
- the coordinator: `python -m services.coordinator.server --data-dir D --port 0` (workers embedded) under
  `/usr/bin/time -v`, so its peak memory is what the OS counted ("Maximum resident set size", mapped
  file pages included); its VmHWM/VmRSS, CPU seconds and write counters (/proc/PID/io) are also read at
  each phase. Tokens are made over the Tokens RPC with the admin token it writes to D/admin.token: one
  agent token per agent, and a builder token that submits and follows the builds.
- the agents: --agents `clients.agent.main.Agent`s (one device each, its own token and channel) as
  threads in --agent-processes child processes. They register, heartbeat, long-poll LeaseJob, fetch the
  artifact, measure it in a real `clients.agent.measure` child (llama.cpp) and ReportResult. Each agent's
  AgentGateway stub is wrapped (TimedStub) so every unary call is timed where the agent waits for it.
  They share a host lock (the agent's --host-lock, as emulated devices on one host do), so one
  measurement runs at a time and the coordinator is not starved of this machine's 2 cores by 40
  measurement processes; --no-host-lock lets every leased job measure at once.
- the builds: a tiny llama (width 64, 2 layers, random weights, SmolLM2's tokenizer: tests/arm/tiny_llama.py)
  with two GGUF candidates (q4_0 RTN and f16) on one pool target of all the agents, and a small benchmark
  (8 + 4 tokens, 2 timed runs, 1 thread), so the control plane, not compute, is what is loaded. Inputs
  are uploaded once; then --builds CreateBuild calls start together, each build followed by GetOperation
  every 0.5 s (GetBuild every 4th poll, and once at the end) from its own thread.
  A warm-up build first (unless --no-warmup) fills the coordinator's memo, so the measured builds reuse
  import, export and evaluation and go straight to their benchmark jobs (jobs are never reused).
- a probe: one more registered device that matches no target calls LeaseJob with wait_ms=0 every 0.25 s
  from the idle phase on: what one LeaseJob costs without its long-poll wait (it scans the whole queue).

Checked (exit 1 if any fails): every build reaches a terminal state and succeeds; each build has one
job per candidate; every job SUCCEEDED at its first attempt with exactly one lease, and that lease
REPORTED (the coordinator's database, read after it stopped); on the agents' side every job was leased
exactly once and had exactly one accepted ReportResult, and no result was an error.
Latency: client-side, per RPC and phase — the idle fleet (--idle-s, nothing queued), the builds, or the
fleet's start-up (RegisterAgent); p50/p90/p99/max by nearest rank. LeaseJob is split: dispatch (job
created in the database → lease in the agent's hands, one wall clock), empty long-polls (time past
wait_ms), and the probe (wait_ms=0).
Results: --out (JSON) and the same path with .md; the tables are printed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from load_fleet import (LABELS, AgentProcesses, CoordinatorProcess, TimedStub, cpu_seconds,  # noqa: E402
                        create_tokens, host_busy, io_counters, serve_agents)
from load_report import check_jobs, failures_by_code, latency_rows, machine, table, versions  # noqa: E402

ASSETS = ROOT / ".edgeforge-assets"
AGENTS_PER_PROCESS = 25
POLL_S = 0.5
PROBE_INTERVAL_S = 0.25
SPEC = {
    "name": "load", "model": {"path": "tiny-llama"},
    "calibration": {"text_file": str(ASSETS / "data" / "calib.txt"), "samples": 2, "sequence_length": 32},
    "evaluation": {"text_file": str(ASSETS / "data" / "eval.txt"), "max_tokens": 128, "window_tokens": 64},
    "targets": [{"name": "fleet", "selector": LABELS}],
    "candidates": [{"format": "gguf", "quantization": {"type": "q4_0"}},
                   {"format": "gguf", "quantization": {"method": "none", "type": "f16"}}],
    "benchmark": {"prompt_tokens": 8, "generation_tokens": 4, "warmup_runs": 1, "timed_runs": 2, "threads": 1,
                  "min_duration_ms": 0, "cooldown_ms": 0, "cv_repeats": 0, "skip_throughput": True},
}

# ---------------------------------------------------------------------- the driver
def timed(records: list, method: str, call, *args, **kwargs):
    started_wall, started = time.time(), time.perf_counter()
    try:
        return call(*args, **kwargs)
    finally:
        records.append({"method": method, "start": started_wall, "ms": 1000 * (time.perf_counter() - started)})


def build_spec(client, work: Path):
    """The tiny model and the evaluation text, uploaded once; the BuildSpec every build submits."""
    from clients.python import spec as spec_file
    from edgeforge.v1 import coordinator_pb2
    from tests.arm.tiny_llama import write_tiny_llama
    write_tiny_llama(work / "tiny-llama", ASSETS / "models" / "smollm2-fp32")
    parsed = spec_file.parse(SPEC, work)
    spec = coordinator_pb2.BuildSpec()
    spec.CopyFrom(parsed.spec)
    spec.model.artifact = client.upload_model(parsed.model_path).name
    spec.calibration.dataset = client.upload_dataset(parsed.calibration_path).name   # required; RTN/f16 skip it
    spec.evaluation.dataset = client.upload_dataset(parsed.evaluation_path).name
    return spec


def follow_build(client, spec, request_id: str, barrier: threading.Barrier | None, records: list) -> dict:
    """CreateBuild, then GetOperation every POLL_S (GetBuild every 4th poll) until done, then GetBuild."""
    from clients.python.client import build_name
    from edgeforge.v1 import coordinator_pb2
    from google.longrunning import operations_proto_pb2 as operations_pb2
    if barrier is not None:
        barrier.wait()
    operation = timed(records, "CreateBuild", client.coordinator.CreateBuild,
                      coordinator_pb2.CreateBuildRequest(spec=spec, request_id=request_id), timeout=120)
    name = build_name(operation.name)
    polls = 0
    while not operation.done:
        time.sleep(POLL_S)
        polls += 1
        operation = timed(records, "GetOperation", client.operations.GetOperation,
                          operations_pb2.GetOperationRequest(name=operation.name), timeout=60)
        if polls % 4 == 0:
            timed(records, "GetBuild", client.coordinator.GetBuild, coordinator_pb2.GetBuildRequest(name=name),
                  timeout=60)
    finished = time.time()
    build = timed(records, "GetBuild", client.coordinator.GetBuild, coordinator_pb2.GetBuildRequest(name=name),
                  timeout=60)
    return {"name": name, "state": coordinator_pb2.BuildState.Name(build.state), "finished": finished,
            "error": build.error.message, "candidates": [c.id for c in build.candidates]}


def run_builds(client, spec, count: int, records: list) -> list[dict]:
    barrier = threading.Barrier(count)
    results: list[dict | Exception] = [RuntimeError("not run")] * count

    def one(index: int) -> None:
        try:
            results[index] = follow_build(client, spec, f"bench-load-{index}", barrier, records)
        except Exception as error:               # reported per build below; the others go on
            results[index] = error
    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r if isinstance(r, dict) else {"name": "", "state": "CLIENT_ERROR", "error": repr(r)} for r in results]


class Probe:
    """A registered device matching no target: LeaseJob(wait_ms=0) every PROBE_INTERVAL_S."""

    def __init__(self, address: str, token: str, records: list):
        from clients.agent.main import Agent, AgentConfig
        from edgeforge.v1 import agent_pb2
        self.agent = Agent(AgentConfig(address, token=token, device_id="load-probe", cache_dir=Path("/nonexistent")))
        self.stub = TimedStub(self.agent.stub, "load-probe", records)
        self.stub.RegisterAgent(agent_pb2.RegisterAgentRequest(device_id="load-probe", attributes={"bench": "probe"}),
                                timeout=30)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from edgeforge.v1 import agent_pb2
        while not self.stopping.wait(PROBE_INTERVAL_S):
            response = self.stub.LeaseJob(agent_pb2.LeaseJobRequest(device="devices/load-probe", wait_ms=0), timeout=30)
            if response.HasField("lease"):
                raise RuntimeError(f"the probe was given {response.lease.name}, which matches no target of it")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.agent.stop()


def wait_for_fleet(client, count: int, timeout_s: float = 300) -> None:
    from edgeforge.v1 import coordinator_pb2
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        devices = client.list_devices(LABELS)
        if sum(d.state == coordinator_pb2.DEVICE_STATE_ONLINE for d in devices) >= count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"only {len(devices)} of {count} agents registered in {timeout_s:.0f} s")

# ---------------------------------------------------------------------- the run
def measure(args, coordinator: CoordinatorProcess, work: Path, result: dict) -> None:
    memory = result["coordinator"] = {"phases": {"listening": coordinator.sample()}}
    seconds = result["seconds"]
    names = [f"load-{index:03d}" for index in range(args.agents)]
    tokens = create_tokens(coordinator, "agent", names + ["load-probe"])
    client = coordinator.client(create_tokens(coordinator, "builder", ["builds"])[0])   # builds as a CI client would
    admin = coordinator.client()
    started = time.monotonic()
    fleet = AgentProcesses(coordinator, list(zip(names, tokens)), args.agent_processes, work,
                           host_lock=not args.no_host_lock)
    try:
        wait_for_fleet(admin, args.agents)
        seconds["fleet start-up (processes started → all registered)"] = time.monotonic() - started
        memory["phases"]["fleet registered"] = coordinator.sample()
        driver, probe_records = [], []
        probe = Probe(coordinator.address, tokens[-1], probe_records)
        probe.thread.start()
        idle = (time.time(), cpu_seconds(coordinator.pid), host_busy(), io_counters(coordinator.pid))
        time.sleep(args.idle_s)
        idle_end = (time.time(), cpu_seconds(coordinator.pid), host_busy(), io_counters(coordinator.pid))
        spec = build_spec(client, work)
        if not args.no_warmup:
            started, warmup_start = time.monotonic(), time.time()
            result["warmup_build"] = follow_build(client, spec, "bench-load-warmup", None, [])
            seconds["warm-up build (fills the memo)"] = time.monotonic() - started
            result["phase_wall_times"] = {"warm-up": [warmup_start, time.time()]}
            memory["phases"]["after the warm-up build"] = coordinator.sample()
        load = (time.time(), cpu_seconds(coordinator.pid), host_busy(), io_counters(coordinator.pid))
        builds = run_builds(client, spec, args.builds, driver)
        load_end = (time.time(), cpu_seconds(coordinator.pid), host_busy(), io_counters(coordinator.pid))
        probe.stop()
        seconds["idle fleet"], seconds["builds"] = idle_end[0] - idle[0], load_end[0] - load[0]
        result.setdefault("phase_wall_times", {}).update(idle=[idle[0], idle_end[0]], builds=[load[0], load_end[0]])
        memory["cpu_pct"] = {"idle": 100 * (idle_end[1] - idle[1]) / (idle_end[0] - idle[0]),
                             "builds": 100 * (load_end[1] - load[1]) / (load_end[0] - load[0])}
        memory["writes_per_s"] = {phase: {key: round((end[3][key] - begin[3][key]) / (end[0] - begin[0]))
                                          for key in ("syscw", "write_bytes")}
                                   for phase, begin, end in (("idle", idle, idle_end), ("builds", load, load_end))}
        result["host_cpu_busy_pct"] = {  # all processes on the machine (other users' included), of all cores
            "idle": 100 * (idle_end[2][0] - idle[2][0]) / (idle_end[2][1] - idle[2][1]),
            "builds": 100 * (load_end[2][0] - load[2][0]) / (load_end[2][1] - load[2][1])}
        memory["phases"]["after the builds"] = coordinator.sample()
    finally:
        agent_records = fleet.stop()
        client.close()
        admin.close()
    memory["time_v_max_rss_bytes"] = coordinator.stop()
    checked = builds + ([result["warmup_build"]] if "warmup_build" in result else [])
    jobs = check_jobs(coordinator.data_dir / "edgeforge.db", checked, agent_records, len(SPEC["candidates"]))
    result["latency"] = latency_rows(driver, agent_records, probe_records, jobs, (idle[0], idle_end[0]),
                                     (load[0], load_end[0]))
    result["agent_call_failures"] = failures_by_code(agent_records + probe_records, result["phase_wall_times"])
    result["builds_detail"] = [{**b, "seconds": round(b.get("finished", load[0]) - load[0], 2)} for b in builds]
    result["checks"] = {k: v for k, v in jobs.items() if k not in ("create_time", "lease_job")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", type=int, help="concurrent builds (default 20; --quick 3)")
    parser.add_argument("--agents", type=int, help="agents, one device each (default 100; --quick 10)")
    parser.add_argument("--agent-processes", type=int, help=f"processes the agents run in (default: "
                                                            f"{AGENTS_PER_PROCESS} agents per process)")
    parser.add_argument("--quick", action="store_true", help="3 builds, 10 agents (for development)")
    parser.add_argument("--no-warmup", action="store_true", help="no warm-up build: the builds compute everything")
    parser.add_argument("--no-host-lock", action="store_true",
                        help="let every leased job measure at once (on this host: beside the coordinator)")
    parser.add_argument("--idle-s", type=float, default=10.0, help="seconds of idle fleet measured (default 10)")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/load.json; --quick "
                                                 "load-quick.json); the tables go beside it as .md")
    parser.add_argument("--serve-agents", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_agents:
        serve_agents(args.serve_agents)
        return
    args.builds = args.builds or (3 if args.quick else 20)
    args.agents = args.agents or (10 if args.quick else 100)
    args.agent_processes = args.agent_processes or math.ceil(args.agents / AGENTS_PER_PROCESS)
    args.out = args.out or ROOT / "bench" / "results" / ("load-quick.json" if args.quick else "load.json")
    if not (ASSETS / "models" / "smollm2-fp32" / "tokenizer.json").is_file() or not Path(SPEC["evaluation"]
                                                                                          ["text_file"]).is_file():
        sys.exit(f"bench/load.py: {ASSETS} lacks SmolLM2's tokenizer or the evaluation text (run make setup)")
    result = {"command": " ".join(["bench/load.py", *sys.argv[1:]]), "machine": machine(), "versions": versions(),
              "builds": args.builds, "candidates": len(SPEC["candidates"]), "agents": args.agents,
              "agent_processes": args.agent_processes, "benchmark": SPEC["benchmark"],
              "host_lock": not args.no_host_lock, "warmup": not args.no_warmup, "seconds": {},
              "load_average_before": os.getloadavg()}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeforge-bench-load-") as scratch:
        work = Path(scratch)
        coordinator = CoordinatorProcess(work / "data", work)
        try:
            measure(args, coordinator, work, result)
        except BaseException:
            if coordinator.process.poll() is None:
                os.kill(coordinator.pid, signal.SIGKILL)
            for log in sorted(work.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
            raise
    result["seconds"]["whole script"] = time.monotonic() - started
    result["seconds"] = {k: round(v, 1) for k, v in result["seconds"].items()}
    result["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    args.out.with_suffix(".md").write_text(f"Command: `.venv/bin/python {result['command']}`\n\n{text}\n")
    print(text)
    for failure in result["checks"]["failures"]:
        print(f"FAILED: {failure}", file=sys.stderr)
    sys.exit(1 if result["checks"]["failures"] else 0)


if __name__ == "__main__":
    main()
