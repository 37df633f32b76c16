"""bench/load.py's processes: the coordinator under /usr/bin/time -v, tokens over RPC, and agents as
threads in child processes whose AgentGateway calls are timed where the agent waits for them.
Run as `python bench/load_fleet.py --serve-agents CONFIG` it is one such child."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

LABELS = {"bench": "load"}
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



if __name__ == "__main__" and sys.argv[1:2] == ["--serve-agents"]:
    serve_agents(Path(sys.argv[2]))
