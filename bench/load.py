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
import collections
import json
import math
import os
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

ASSETS = ROOT / ".edgeforge-assets"
LABELS = {"bench": "load"}
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
TIMED_RPCS = ("RegisterAgent", "Heartbeat", "LeaseJob", "ReportResult")
# children import this tree (not whichever one the venv's editable install points at), one thread each
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")]), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------- the coordinator process
def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status size (VmHWM, VmRSS) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def host_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, all cores (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]                                  # idle + iowait
    return sum(values) - idle, sum(values)


def io_counters(pid: int) -> dict[str, int]:
    """/proc/PID/io: write syscalls (syscw) and bytes sent to storage (write_bytes), whole process."""
    pairs = (line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {key: int(value) for key, value in pairs if key in ("syscw", "write_bytes")}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CoordinatorProcess:
    """`python -m services.coordinator.server` under /usr/bin/time -v; `pid` is the Python process."""

    def __init__(self, data_dir: Path, log_dir: Path):
        self.data_dir = data_dir
        self.rusage_path, self.log_path = log_dir / "coordinator.time", log_dir / "coordinator.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            ["/usr/bin/time", "-v", "-o", str(self.rusage_path), sys.executable, "-m", "services.coordinator.server",
             "--data-dir", str(data_dir), "--port", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True, env=CHILD_ENV)
        line = self.process.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        if not match:
            self.process.kill()
            raise RuntimeError(f"the coordinator did not start: {line!r}; log: {self.log_path.read_text()[-2000:]}")
        self.address = match.group(1)
        self.pid = int(Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()[0])

    def client(self, token: str | None = None):
        """An SDK client with `token`; by default the admin token the coordinator wrote to its data dir."""
        from clients.python.client import Client
        return Client(self.address, token=token or (self.data_dir / "admin.token").read_text().strip())

    def sample(self) -> dict:
        return {"vm_hwm_bytes": proc_status(self.pid, "VmHWM"), "vm_rss_bytes": proc_status(self.pid, "VmRSS"),
                "cpu_s": round(cpu_seconds(self.pid), 2), **io_counters(self.pid)}

    def stop(self) -> int:
        """SIGTERM (the server drains for up to 5 s); returns time -v's maximum resident set size in bytes."""
        os.kill(self.pid, signal.SIGTERM)
        self.process.wait(timeout=60)
        self.log.close()
        text = self.rusage_path.read_text()
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        if not peak:
            raise RuntimeError(f"no maximum resident set size from /usr/bin/time: {text[-1000:]}")
        return int(peak.group(1)) * 1024


def create_tokens(coordinator: CoordinatorProcess, role: str, names: list[str]) -> list[str]:
    """One token of `role` per name (their secrets), made over the Tokens RPC with the admin token."""
    admin = coordinator.client()
    try:
        return [admin.create_token(role, f"bench/load.py {name}")[1] for name in names]
    finally:
        admin.close()


# ---------------------------------------------------------------------- the agents (child processes)
class TimedStub:
    """An AgentGateway stub whose unary calls append {method, start (wall s), ms, code, ...} to `records`."""

    def __init__(self, stub, device_id: str, records: list):
        self.stub, self.device_id, self.records = stub, device_id, records

    def __getattr__(self, name):
        method = getattr(self.stub, name)
        if name not in TIMED_RPCS:
            return method

        def call(request, **kwargs):
            import grpc
            record = {"method": name, "device": self.device_id, "start": time.time(), "code": "OK"}
            started = time.perf_counter()
            try:
                response = method(request, **kwargs)
            except grpc.RpcError as error:
                record["code"] = error.code().name
                raise
            except ValueError:                             # the channel was closed by Agent.stop()
                record["code"] = "CLOSED"
                raise
            finally:
                record["ms"] = 1000 * (time.perf_counter() - started)
                record["end"] = record["start"] + record["ms"] / 1000
                self.records.append(record)
            if name == "LeaseJob":
                record["wait_ms"] = request.wait_ms
                if response.HasField("lease"):
                    job = response.lease.job
                    record.update(lease=response.lease.name, build=job.build, candidate=job.candidate_id,
                                  target=job.target, attempt=response.lease.attempt)
            elif name == "ReportResult":
                record.update(lease=request.lease, accepted=response.accepted,
                              outcome=request.WhichOneof("outcome"),
                              error=request.error.message if request.HasField("error") else "")
            return response
        return call


def serve_agents(config_path: Path) -> None:
    """Child: one Agent per (device_id, token) in the config, each in its own thread, until stdin closes;
    then writes every timed call to the config's "out" file."""
    import logging

    from clients.agent.main import Agent, AgentConfig
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s agents %(levelname)s %(message)s")
    config = json.loads(config_path.read_text())
    records: list[dict] = []
    agents, threads = [], []
    for device_id, token in config["devices"]:
        agent = Agent(AgentConfig(config["coordinator"], token=token, labels=LABELS, device_id=device_id,
                                  cache_dir=Path(config["cache_root"]) / device_id, cache_max_bytes=256 << 20,
                                  runtimes=frozenset({"llama.cpp"}),
                                  host_lock=Path(config["host_lock"]) if config["host_lock"] else None))
        agent.stub = TimedStub(agent.stub, device_id, records)
        agents.append(agent)
        threads.append(threading.Thread(target=agent.run_forever, name=device_id, daemon=True))
    for thread in threads:
        thread.start()
    print("started", flush=True)
    sys.stdin.read()                                       # the driver closes stdin to stop us
    stopped = time.time()
    for agent in agents:
        agent.stop()
    for thread in threads:
        thread.join(timeout=30)
    for record in records:                                 # long-polls the stop cut short are not failures
        if record["end"] >= stopped and record["code"] in ("CANCELLED", "CLOSED"):
            record["code"] = "STOPPED"
    Path(config["out"]).write_text(json.dumps(records))


class AgentProcesses:
    def __init__(self, coordinator: CoordinatorProcess, devices: list[tuple[str, str]], processes: int, work: Path,
                 host_lock: bool):
        self.children, self.outs = [], []
        per = math.ceil(len(devices) / processes)
        for index in range(processes):
            config = {"coordinator": coordinator.address, "devices": devices[index * per:(index + 1) * per],
                      "cache_root": str(work / "agents"), "out": str(work / f"agents-{index}.json"),
                      "host_lock": str(work / "host.lock") if host_lock else ""}
            path = work / f"agents-{index}.config.json"
            path.write_text(json.dumps(config))
            log = open(work / f"agents-{index}.log", "w")
            self.children.append(subprocess.Popen([sys.executable, __file__, "--serve-agents", str(path)], cwd=ROOT,
                                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                                  env=CHILD_ENV))
            self.outs.append(Path(config["out"]))
        for child in self.children:
            if child.stdout.readline().strip() != "started":
                raise RuntimeError(f"an agent process did not start; see {work}/agents-*.log")

    def stop(self) -> list[dict]:
        for child in self.children:
            child.stdin.close()
        records = []
        for child, out in zip(self.children, self.outs):
            child.wait(timeout=120)
            records += json.loads(out.read_text())
        return records


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


# ---------------------------------------------------------------------- checks and numbers
def check_jobs(db_path: Path, builds: list[dict], records: list[dict], candidates: int) -> dict:
    """No job lost, none run twice: the coordinator's database and the agents' own calls, job by job."""
    ids = [b["name"].removeprefix("builds/") for b in builds if b["name"]]
    with sqlite3.connect(db_path) as conn:
        conn.row_factory = sqlite3.Row
        jobs = {r["id"]: dict(r) for r in conn.execute(
            f"SELECT id, build_id, candidate_id, target, state, attempts, create_time FROM jobs "
            f"WHERE build_id IN ({','.join('?' * len(ids))})", ids)}
        leases = [dict(r) for r in conn.execute("SELECT id, job_id, device_id, state FROM leases")]
    by_key = {(f"builds/{j['build_id']}", j["candidate_id"], j["target"]): job_id for job_id, j in jobs.items()}
    lease_job = {f"leases/{lease['id']}": lease["job_id"] for lease in leases}
    failures = []
    for build in builds:
        if build["state"] != "BUILD_STATE_SUCCEEDED":
            failures.append(f"{build['name'] or 'a build'} ended {build['state']}: {build['error']}")
    expected = len(builds) * candidates
    if len(jobs) != expected:
        failures.append(f"{len(jobs)} jobs in the database for {len(builds)} builds × {candidates} candidates; "
                        f"expected {expected}")
    count = {job_id: {"db_leases": 0, "db_reported": 0, "agent_leases": 0, "agent_accepted": 0, "agent_reports": 0}
             for job_id in jobs}
    for lease in leases:
        if lease["job_id"] in count:
            count[lease["job_id"]]["db_leases"] += 1
            count[lease["job_id"]]["db_reported"] += lease["state"] == "REPORTED"
    for record in records:
        if record["method"] == "LeaseJob" and "lease" in record:
            job_id = by_key.get((record["build"], record["candidate"], record["target"]))
            if job_id is None:
                failures.append(f"an agent leased {record['lease']} for a job not in the database: {record}")
            elif lease_job.get(record["lease"]) != job_id:
                failures.append(f"{record['lease']} is not a lease of job {job_id} in the database")
            else:
                count[job_id]["agent_leases"] += 1
        elif record["method"] == "ReportResult" and record["code"] == "OK":
            job_id = lease_job.get(record["lease"])
            if job_id in count:
                count[job_id]["agent_reports"] += 1
                count[job_id]["agent_accepted"] += record["accepted"]
    exactly_once = 0
    for job_id, job in jobs.items():
        seen = count[job_id]
        if job["state"] == "SUCCEEDED" and job["attempts"] == 1 and seen["db_leases"] == seen["db_reported"] == 1 \
                and seen["agent_leases"] == seen["agent_accepted"] == 1:
            exactly_once += 1
        else:
            failures.append(f"job {job_id} ({job['build_id']} {job['candidate_id']}): state {job['state']}, "
                            f"attempts {job['attempts']}, {seen}")
    errors = [r for r in records if r["method"] == "ReportResult" and r.get("outcome") == "error"]
    failures += [f"{r['lease']} was reported as an error: {r['error']}" for r in errors]
    totals = {key: sum(c[key] for c in count.values()) for key in next(iter(count.values()), {})}
    return {"builds": len(builds), "builds_succeeded": sum(b["state"] == "BUILD_STATE_SUCCEEDED" for b in builds),
            "jobs_expected": expected, "jobs_in_database": len(jobs),
            "jobs_succeeded": sum(j["state"] == "SUCCEEDED" for j in jobs.values()), "jobs_run_exactly_once": exactly_once,
            "jobs_with_more_than_one_attempt": sum(j["attempts"] > 1 for j in jobs.values()),
            "report_calls_not_accepted": sum(c["agent_reports"] - c["agent_accepted"] for c in count.values()),
            "devices_that_measured": len({lease["device_id"] for lease in leases if lease["job_id"] in jobs}),
            "totals": totals, "failures": failures, "create_time": {j: jobs[j]["create_time"] for j in jobs},
            "lease_job": {name: job_id for name, job_id in lease_job.items() if job_id in jobs}}


def percentiles(values: list[float]) -> dict:
    """Nearest-rank percentiles, in ms."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(math.ceil(q * len(ordered)) - 1, 0))]
    return {"count": len(ordered), "p50_ms": round(at(0.5), 2), "p90_ms": round(at(0.9), 2),
            "p99_ms": round(at(0.99), 2), "max_ms": round(ordered[-1], 2)}


def latency_rows(driver: list[dict], agents: list[dict], probe: list[dict], jobs: dict, idle: tuple,
                 builds: tuple) -> list[dict]:
    """Per control RPC and phase: the idle fleet (`idle`, wall seconds), the builds (`builds`), or the
    fleet's start-up (RegisterAgent). A call belongs to the phase it ended in (long-polls start earlier)."""
    def ok(rows, method, window=None):
        return [r for r in rows if r["method"] == method and r.get("code", "OK") == "OK"
                and (window is None or window[0] <= r["start"] + r["ms"] / 1000 <= window[1])]

    def failed(rows, method, window=None):
        return sum(r["method"] == method and r["code"] not in ("OK", "STOPPED")
                   and (window is None or window[0] <= r["end"] <= window[1]) for r in rows)
    during = [r for r in ok(agents, "LeaseJob", builds)]
    fleet = [r for r in agents if r["device"] != "load-probe"]
    rows = [("CreateBuild (all at once)", "builds", [r["ms"] for r in ok(driver, "CreateBuild")], 0),
            ("GetOperation (each build every 0.5 s)", "builds", [r["ms"] for r in ok(driver, "GetOperation")], 0),
            ("GetBuild", "builds", [r["ms"] for r in ok(driver, "GetBuild")], 0),
            ("RegisterAgent (the whole fleet at once)", "start-up", [r["ms"] for r in ok(fleet, "RegisterAgent")],
             failed(fleet, "RegisterAgent"))]
    for phase, window in (("idle", idle), ("builds", builds)):
        rows += [("Heartbeat", phase, [r["ms"] for r in ok(agents, "Heartbeat", window)],
                  failed(agents, "Heartbeat", window)),
                 ("LeaseJob, wait_ms=0 (the probe)", phase, [r["ms"] for r in ok(probe, "LeaseJob", window)],
                  failed(probe, "LeaseJob", window))]
    rows += [("LeaseJob dispatch: job created → lease in the agent", "builds",
              [1000 * (r["end"] - jobs["create_time"][jobs["lease_job"][r["lease"]]])
               for r in during if r.get("lease") in jobs["lease_job"]], failed(agents, "LeaseJob", builds)),
             ("LeaseJob without a job: time past wait_ms", "builds", [r["ms"] - r["wait_ms"] for r in during
                                                                      if "lease" not in r], 0),
             ("ReportResult", "builds", [r["ms"] for r in ok(agents, "ReportResult", builds)],
              failed(agents, "ReportResult", builds))]
    return [{"rpc": name, "phase": phase, **percentiles(values), "errors": errors}
            for name, phase, values, errors in rows]


def failures_by_code(records: list[dict], phases: dict[str, list[float]]) -> dict[str, int]:
    """Failed agent calls of the whole run by method, code and the phase they ended in (calls cut short by
    the agents' stop excluded)."""
    def phase(t: float) -> str:
        return next((name for name, (begin, end) in phases.items() if begin <= t <= end), "between phases")
    return dict(collections.Counter(f"{r['method']} {r['code']} ({phase(r['end'])})" for r in records
                                    if r["code"] not in ("OK", "STOPPED")))


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    from clients.agent.profile import cpu_model, ram_bytes
    return {"cpu": cpu_model(), "nproc": os.cpu_count(), "ram_bytes": ram_bytes(), "arch": platform.machine(),
            "lscpu_head": [" ".join(line.split()) for line in lscpu], "gpu": "none"}


def versions() -> dict:
    import google.protobuf
    import grpc
    import llama_cpp
    return {"python": platform.python_version(), "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__,
            "llama_cpp_python": llama_cpp.__version__}


def table(result: dict) -> str:
    mib = lambda value: f"{value / (1 << 20):.0f} MiB"
    checks, memory = result["checks"], result["coordinator"]
    lines = [f"{result['builds']} builds × {result['candidates']} candidates, {result['agents']} agents in "
             f"{result['agent_processes']} processes, one coordinator process; measurements "
             f"{'one at a time (host lock)' if result['host_lock'] else 'all at once'}; builds' phase "
             f"{result['seconds']['builds']:.1f} s wall\n",
             "| control RPC (client side) | phase | calls | p50 ms | p90 ms | p99 ms | max ms | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["latency"]:
        numbers = " | ".join(f"{row[k]:.1f}" if row["count"] else "–" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))
        lines.append(f"| {row['rpc']} | {row['phase']} | {row['count']} | {numbers} | {row['errors']} |")
    totals = checks["totals"]
    lines += ["", "| check | value |", "|---|---|",
              f"| builds succeeded{' (the warm-up build included)' if 'warmup_build' in result else ''} "
              f"| {checks['builds_succeeded']} / {checks['builds']} |",
              f"| jobs in the database / expected | {checks['jobs_in_database']} / {checks['jobs_expected']} |",
              f"| jobs succeeded | {checks['jobs_succeeded']} |",
              f"| jobs run exactly once (one lease, reported; leased once and reported once by the agents) "
              f"| {checks['jobs_run_exactly_once']} |",
              f"| jobs leased more than once (attempts > 1) | {checks['jobs_with_more_than_one_attempt']} |",
              f"| agent side: leases received / accepted ReportResults | {totals.get('agent_leases', 0)} / "
              f"{totals.get('agent_accepted', 0)} |",
              f"| ReportResult calls not accepted (duplicates) | {checks['report_calls_not_accepted']} |",
              f"| distinct devices that measured | {checks['devices_that_measured']} |",
              f"| failures | {len(checks['failures'])} |",
              f"| agent calls that failed, by code (whole run) | "
              f"{', '.join(f'{k}: {v}' for k, v in result['agent_call_failures'].items()) or 'none'} |",
              "", "| coordinator process | value |", "|---|---|",
              f"| peak RSS, `/usr/bin/time -v` maximum resident set size | {mib(memory['time_v_max_rss_bytes'])} |"]
    for phase, sample in memory["phases"].items():
        lines.append(f"| {phase}: VmHWM · VmRSS · CPU s | {mib(sample['vm_hwm_bytes'])} · {mib(sample['vm_rss_bytes'])}"
                     f" · {sample['cpu_s']:.1f} |")
    lines += [f"| CPU, idle fleet ({result['agents']} agents long-polling, nothing queued; the probe's "
              f"4 LeaseJob/s) | {memory['cpu_pct']['idle']:.0f} % of one core |",
              f"| CPU, during the builds | {memory['cpu_pct']['builds']:.0f} % of one core |",
              f"| write syscalls/s · bytes to storage/s, idle · builds | "
              f"{memory['writes_per_s']['idle']['syscw']} · {memory['writes_per_s']['idle']['write_bytes'] / 1e6:.1f} MB"
              f" · {memory['writes_per_s']['builds']['syscw']} · "
              f"{memory['writes_per_s']['builds']['write_bytes'] / 1e6:.1f} MB |",
              f"| the whole machine's CPU busy (all processes, all {result['machine']['nproc']} cores), idle · builds "
              f"| {result['host_cpu_busy_pct']['idle']:.0f} % · {result['host_cpu_busy_pct']['builds']:.0f} % |",
              "", "| wall time | s |", "|---|---:|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in result["seconds"].items()]
    return "\n".join(lines)


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
