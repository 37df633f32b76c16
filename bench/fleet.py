"""The fleet's plumbing measured: artifact transfer over gRPC beside a raw loopback TCP copy of the same
bytes, dispatch latency (enqueue, or LeaseJob, to a lease in the agent's hands), and how repeatable one
job's measurement is.

    .venv/bin/python bench/fleet.py [--quick] [--parts transfer,dispatch,repeatability] [--repeats 5]
                                    [--jobs 60] [--measure-repeats 5] [--gguf PATH]

Processes talk over loopback, so both ends of every transfer are real and each has its own peak RSS:
- the coordinator: `services.coordinator.server.create_server` (what `python -m services.coordinator.server`
  runs; agent tokens required) in a child under `/usr/bin/time -v`, whose "Maximum resident set size"
  (mapped file pages included) is its peak memory. The child also takes commands on stdin to call
  `scheduler.enqueue`: only a build's pipeline enqueues jobs, inside the coordinator's process, and no
  RPC does so short of a whole build — so the wake-up is measured on the in-process path a build takes.
  Its store (the artifact, an agent token) is prepared through the same SQLite file before it starts.
  A second such child, started with glibc malloc thresholds fixed (TUNED_MALLOC), serves the transfer
  variants marked "malloc-tuned": what a deployment could set without a code change.
- the peer: a raw TCP server child, also under `/usr/bin/time -v`, that sends the blob file on each
  connection with `socket.sendfile` (zero-copy) or with `readinto` + `sendall` of 1 MiB.
- this process, the agent side: AgentGateway stubs built as the agent builds them (its channel options,
  its bearer-token interceptor) and the agent's `ArtifactCache` (clients/agent/cache.py).

Transfer: one lease of a job whose artifact is SmolLM2's model.safetensors (538 MB; --quick: the q4_0
GGUF, 92 MB). Each repeat fetches it into an empty cache through `ArtifactCache.fetch`, timed to the last
byte written (stream) and to the verified file (total: stream + the cache's sha256 pass over the file);
the raw client receives the same bytes into a file with `recv_into` (1 MiB) + `write` (the same disk
writes, no hash). Variants (GRPC_VARIANTS: chunk size, client HTTP/2 window, malloc-tuned server, and
the two raw peers) are interleaved within each repeat, each after `os.sync()` so no writeback of the last
copy is in flight; the median repeat is reported with both processes' CPU seconds and minor page faults
during the copy. Ratios divide by the faster raw peer. The first fetch of each coordinator process is
timed apart: it hashes the blob once before serving it.
Dispatch: (a) wake-up — the agent is blocked in LeaseJob (for 100-200 ms, so the server is in its wait)
when a job is enqueued: time from just before `enqueue` in the coordinator to LeaseJob's return in the
agent (CLOCK_MONOTONIC, one clock for both processes); (b) queued — --jobs jobs queued first, then each
LeaseJob round trip (queue depth --jobs down to 1). Each lease is reported before the next LeaseJob, as
an agent does.
Repeatability: the q4_0 GGUF measured --measure-repeats times through the agent's own `run_local` (a
`python -m clients.agent.measure gguf` child), 1 s sleep between, BenchmarkConfig prompt 128 + generation
32 tokens, 5 timed runs, no throughput tests (other fields at their defaults, as a job gets them); each
repeat's p50 and its own cv_pct, and the CV (stddev/mean) of the p50s. --quick: 32 + 8 tokens, 3 repeats.
Results: bench/results/fleet.json and markdown tables on stdout.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

MODEL = ROOT / ".edgeforge-assets" / "models" / "smollm2-fp32"
DEMO_DATA = ROOT / "demo-out" / "edgeforge-data"
BUILD = "builds/bench-fleet"
DEVICE = "bench-fleet"
LEASE_TTL_S = 3600.0                    # one lease serves every repeat of the transfer
RAW_BUFFER_BYTES = 1 << 20
MEASURE_CONFIG = {"prompt_tokens": 128, "generation_tokens": 32, "timed_runs": 5, "skip_throughput": True}
QUICK_MEASURE_CONFIG = {"prompt_tokens": 32, "generation_tokens": 8, "timed_runs": 5, "skip_throughput": True}
# gRPC variants: (label, FetchArtifactRequest.chunk_size_bytes (0: the server's 1 MiB default, which is
# what the agent asks for), channel options added to the agent's, served by the malloc-tuned coordinator)
GRPC_VARIANTS = [("gRPC, as shipped (1 MiB chunks)", 0, [], False),
                 ("gRPC, 4 MiB chunks", 4 << 20, [], False),
                 ("gRPC, 4 MiB chunks, client window 16 MiB", 4 << 20, [("grpc.http2.lookahead_bytes", 16 << 20)], False),
                 ("gRPC, 1 MiB chunks, malloc-tuned coordinator", 0, [], True),
                 ("gRPC, 4 MiB chunks, client window 16 MiB, malloc-tuned coordinator", 4 << 20,
                  [("grpc.http2.lookahead_bytes", 16 << 20)], True)]
# glibc's allocator hands each message's fresh multi-MiB buffers back to the kernel and faults them in
# again (zeroed) for the next message; fixed thresholds keep them in the heap. A deployment knob (env).
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(16 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}


# ---------------------------------------------------------------------- children
def serve_coordinator(data_dir: Path) -> None:
    """Child: the coordinator; each stdin line {"op": "enqueue", "job": hex BenchmarkJob} enqueues a job
    for DEVICE and answers {"enqueued_at": CLOCK_MONOTONIC seconds taken just before}."""
    from edgeforge.v1 import agent_pb2
    from services.coordinator.server import create_server
    server, port, ctx = create_server("127.0.0.1:0", data_dir, lease_ttl_s=LEASE_TTL_S)
    print(f"coordinator listening on 127.0.0.1:{port} pid {os.getpid()} peak_rss {peak_rss_bytes()}", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "enqueue":
            job = agent_pb2.BenchmarkJob.FromString(bytes.fromhex(command["job"]))
            enqueued_at = time.monotonic()          # before the SQLite insert: it is part of dispatch
            ctx.scheduler.enqueue(BUILD.removeprefix("builds/"), job.candidate_id, DEVICE, job)
            print(json.dumps({"enqueued_at": enqueued_at}), flush=True)
    server.stop(0).wait()


def serve_raw(path: Path) -> None:
    """Child: the peer. Per connection the first byte picks sendfile ("f") or readinto + sendall ("s")."""
    buffer = bytearray(RAW_BUFFER_BYTES)
    view = memoryview(buffer)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(f"raw listening on 127.0.0.1:{listener.getsockname()[1]} pid {os.getpid()}", flush=True)
        while True:
            connection, _ = listener.accept()
            with connection, open(path, "rb") as f:
                mode = connection.recv(1)
                if mode == b"q":
                    return
                if mode == b"f":
                    connection.sendfile(f)
                else:
                    while count := f.readinto(buffer):
                        connection.sendall(view[:count])


# ---------------------------------------------------------------------- this process, the agent side
def cpu_and_faults(pid: int) -> tuple[float, int]:
    """(utime + stime in seconds, minor page faults) of a process, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), mapped file pages included."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Child:
    """A child process under /usr/bin/time -v; `pid` is the Python process itself (from its first line)."""

    def __init__(self, name: str, *args: str, env: dict[str, str] | None = None):
        self.name = name
        self.report = tempfile.NamedTemporaryFile("w+", suffix=".stderr")
        self.process = subprocess.Popen(["/usr/bin/time", "-v", sys.executable, __file__, *args],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.report, text=True,
                                        env={**os.environ, **(env or {})})
        line = self.process.stdout.readline()
        match = re.search(r"listening on (\S+) pid (\d+)(?: peak_rss (\d+))?", line)
        if not match:
            self.process.kill()
            self.report.seek(0)
            raise RuntimeError(f"{args[0]} did not start: {line!r} {self.report.read()[-2000:]}")
        self.address, self.pid = match.group(1), int(match.group(2))
        self.startup_rss = int(match.group(3)) if match.group(3) else None

    def ask(self, command: dict) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def finish(self) -> int:
        """Waits for the exit; returns the child's Maximum resident set size in bytes."""
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.report.seek(0)
        text = self.report.read()
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        if self.process.returncode != 0 or not peak:
            raise RuntimeError(f"child failed (exit {self.process.returncode}): {text[-2000:]}")
        return int(peak.group(1)) * 1024


def agent_stub(address: str, token: str, extra_options: list):
    """An AgentGateway stub built as clients/agent/main.py's Agent builds it."""
    import grpc

    from clients.agent.main import CHANNEL_OPTIONS, _Bearer
    from edgeforge.v1 import agent_pb2_grpc
    channel = grpc.intercept_channel(grpc.insecure_channel(address, options=CHANNEL_OPTIONS + extra_options),
                                     _Bearer(token))
    return agent_pb2_grpc.AgentGatewayStub(channel)


def job_for(sha256: str, size_bytes: int, candidate: str):
    from edgeforge.v1 import agent_pb2, common_pb2
    return agent_pb2.BenchmarkJob(build=BUILD, candidate_id=candidate, format=common_pb2.EXPORT_FORMAT_GGUF,
                                  artifact=f"artifacts/{sha256}", sha256=sha256, size_bytes=size_bytes,
                                  task=common_pb2.MODEL_TASK_CAUSAL_LM, runtime="llama.cpp")


def fetch_grpc(stub, lease: str, sha256: str, size_bytes: int, chunk_bytes: int, cache_dir: Path) -> dict:
    """One download through ArtifactCache.fetch: seconds to the last byte written, and to the verified file."""
    from clients.agent.cache import ArtifactCache
    from edgeforge.v1 import agent_pb2
    cache = ArtifactCache(cache_dir, max_bytes=size_bytes * 2)
    streamed = []

    def read(offset: int):
        request = agent_pb2.FetchArtifactRequest(lease=lease, offset=offset, chunk_size_bytes=chunk_bytes)
        yield from stub.FetchArtifact(request, timeout=3600)
        streamed.append(time.perf_counter())        # the cache asked past the last message: all written
    started = time.perf_counter()
    path = cache.fetch(sha256, size_bytes, read)
    total = time.perf_counter() - started
    path.unlink()
    if cache.resumes:
        raise RuntimeError(f"the download resumed {cache.resumes} times; the timing is not of one stream")
    return {"stream_s": streamed[-1] - started, "total_s": total}


def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)))


def fetch_raw(address: str, mode: bytes, size_bytes: int, destination: Path) -> dict:
    buffer = bytearray(RAW_BUFFER_BYTES)
    view = memoryview(buffer)
    received = 0
    started = time.perf_counter()
    with connect(address) as connection, open(destination, "wb") as f:
        connection.sendall(mode)
        while count := connection.recv_into(buffer):
            f.write(view[:count])
            received += count
    seconds = time.perf_counter() - started
    destination.unlink()
    if received != size_bytes:
        raise RuntimeError(f"raw copy received {received} of {size_bytes} bytes")
    return {"stream_s": seconds}


def measure_transfer(coordinators: dict[bool, Child], raw: Child, token: str, sha256: str, size_bytes: int,
                     repeats: int, work: Path) -> dict:
    """`coordinators`: tuned (True) or not -> its child. Returns the median repeat of every variant."""
    from edgeforge.v1 import agent_pb2, common_pb2
    plain = coordinators[False]
    stub = agent_stub(plain.address, token, [])
    plain.ask({"op": "enqueue", "job": job_for(sha256, size_bytes, "transfer").SerializeToString().hex()})
    lease = stub.LeaseJob(agent_pb2.LeaseJobRequest(device=f"devices/{DEVICE}", wait_ms=0), timeout=30).lease
    if lease.job.candidate_id != "transfer":
        raise RuntimeError("the transfer job was not leased")
    first = {}
    for tuned, child in coordinators.items():                      # each coordinator hashes the blob once first
        os.sync()
        first[child.name] = fetch_grpc(agent_stub(child.address, token, []), lease.name, sha256, size_bytes, 0,
                                       work / "cache")
    variants = []
    for label, chunk, options, tuned in GRPC_VARIANTS:
        variant_stub = agent_stub(coordinators[tuned].address, token, options)   # one channel, as an agent has
        variant_stub.Heartbeat(agent_pb2.HeartbeatRequest(device=f"devices/{DEVICE}"), timeout=30)  # connected
        variants.append((label, coordinators[tuned], lambda s=variant_stub, c=chunk:
                         fetch_grpc(s, lease.name, sha256, size_bytes, c, work / "cache")))
    variants += [("raw TCP, sendfile", raw, lambda: fetch_raw(raw.address, b"f", size_bytes, work / "raw")),
                 ("raw TCP, readinto + sendall", raw, lambda: fetch_raw(raw.address, b"s", size_bytes, work / "raw"))]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    for _ in range(repeats):
        for label, server, fetch in variants:
            os.sync()
            before = cpu_and_faults(server.pid), cpu_and_faults(os.getpid())
            run = fetch()
            after = cpu_and_faults(server.pid), cpu_and_faults(os.getpid())
            for side, was, now in zip(("server", "client"), before, after):
                run[f"{side}_cpu_s"], run[f"{side}_page_faults"] = now[0] - was[0], now[1] - was[1]
            runs[label].append(run)
    finished = common_pb2.Measurement(latency=common_pb2.LatencyStats(samples_ms=[1.0]))
    stub.ReportResult(agent_pb2.ReportResultRequest(lease=lease.name, measurement=finished), timeout=30)
    rows = []
    for label, samples in runs.items():
        median = sorted(samples, key=lambda r: r["stream_s"])[len(samples) // 2]
        row = {"variant": label, **{k: round(v, 3) if isinstance(v, float) else v for k, v in median.items()},
               "stream_mb_per_s": round(size_bytes / median["stream_s"] / 1e6, 1),
               "stream_s_all": [round(r["stream_s"], 3) for r in samples]}
        if "total_s" in median:
            row["total_mb_per_s"] = round(size_bytes / median["total_s"] / 1e6, 1)
        rows.append(row)
    raws = {row["variant"]: row for row in rows if row["variant"].startswith("raw")}
    best_raw = max(raws.values(), key=lambda r: r["stream_mb_per_s"])
    for row in rows:
        row["ratio_stream_vs_best_raw"] = round(row["stream_mb_per_s"] / best_raw["stream_mb_per_s"], 3)
        row["ratio_stream_vs_raw_sendall"] = round(
            row["stream_mb_per_s"] / raws["raw TCP, readinto + sendall"]["stream_mb_per_s"], 3)
        if "total_mb_per_s" in row:
            row["ratio_total_vs_best_raw"] = round(row["total_mb_per_s"] / best_raw["stream_mb_per_s"], 3)
    return {"size_bytes": size_bytes, "repeats": repeats, "best_raw": best_raw["variant"],
            "malloc_tuning": TUNED_MALLOC, "first_fetch": {name: {k: round(v, 3) for k, v in run.items()}
                                                            for name, run in first.items()}, "rows": rows}


def percentiles(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)

    def at(q: float) -> float:                              # linear interpolation, as numpy's default
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return {"count": len(ordered), "p50_ms": round(at(0.5), 2), "p90_ms": round(at(0.9), 2),
            "p99_ms": round(at(0.99), 2), "max_ms": round(ordered[-1], 2)}


def measure_dispatch(coordinator: Child, token: str, sha256: str, size_bytes: int, jobs: int) -> dict:
    from edgeforge.v1 import agent_pb2, common_pb2
    stub = agent_stub(coordinator.address, token, [])
    device = f"devices/{DEVICE}"
    done = common_pb2.Measurement(latency=common_pb2.LatencyStats(samples_ms=[1.0]))

    def lease_now(wait_ms: int):
        response = stub.LeaseJob(agent_pb2.LeaseJobRequest(device=device, wait_ms=wait_ms), timeout=wait_ms / 1000 + 10)
        return time.monotonic(), response

    def report(response, candidate: str) -> None:
        if response.lease.job.candidate_id != candidate:
            raise RuntimeError(f"LeaseJob returned {response.lease.job.candidate_id or 'no lease'}, not {candidate}")
        stub.ReportResult(agent_pb2.ReportResultRequest(lease=response.lease.name, measurement=done), timeout=30)
    wake_ms = []
    with concurrent.futures.ThreadPoolExecutor(1) as agent:
        for index in range(jobs):
            waiting = agent.submit(lease_now, 30_000)
            time.sleep(random.uniform(0.1, 0.2))             # the server is in its long-poll wait by now
            enqueued_at = coordinator.ask({"op": "enqueue", "job": job_for(sha256, size_bytes, f"wake-{index}")
                                           .SerializeToString().hex()})["enqueued_at"]
            arrived_at, response = waiting.result()
            report(response, f"wake-{index}")
            wake_ms.append(1000 * (arrived_at - enqueued_at))
    for index in range(jobs):
        coordinator.ask({"op": "enqueue", "job": job_for(sha256, size_bytes, f"queued-{index}").SerializeToString().hex()})
    queued_ms = []
    for index in range(jobs):
        started = time.monotonic()
        arrived_at, response = lease_now(10_000)              # the agent's default wait; a job is there
        report(response, f"queued-{index}")
        queued_ms.append(1000 * (arrived_at - started))
    return {"wake_up": {**percentiles(wake_ms), "samples_ms": [round(v, 2) for v in wake_ms]},
            "queued": {**percentiles(queued_ms), "queue_depth_first_to_last": [jobs, 1],
                       "samples_ms": [round(v, 2) for v in queued_ms]}}


def measure_repeatability(gguf: Path, repeats: int, config: dict) -> dict:
    """The same job `repeats` times through the agent's run_local (a `clients.agent.measure` child)."""
    from google.protobuf import json_format

    from clients.agent.main import run_local
    from edgeforge.v1 import common_pb2
    # the config as an agent receives it: a BenchmarkConfig proto, turned back into JSON as _measure does
    values = json_format.MessageToDict(json_format.ParseDict(config, common_pb2.BenchmarkConfig()),
                                       preserving_proto_field_name=True)
    values["task"] = "causal_lm"
    runs = []
    for index in range(repeats):
        if index:
            time.sleep(1.0)                                    # the agent's default cool-down
        result = run_local("gguf", gguf, values, threading.Event(), 1800.0)
        print(f"repeat {index + 1}: p50 {result['latency']['p50_ms']:.1f} ms, cv {result['cv_pct']:.1f} %",
              file=sys.stderr, flush=True)
        runs.append({"p50_ms": round(result["latency"]["p50_ms"], 2), "cv_pct": round(result["cv_pct"], 2),
                     "attempts": result.get("attempts", 1), "unstable": result.get("unstable", False),
                     "samples_ms": [round(v, 2) for v in result["latency"]["samples_ms"]],
                     "peak_rss_bytes": result.get("peak_rss_bytes")})
    p50s = [r["p50_ms"] for r in runs]
    cv = 100 * statistics.stdev(p50s) / statistics.mean(p50s) if len(p50s) > 1 else 0.0
    return {"config": values, "repeats": repeats, "p50s_ms": p50s, "cv_of_p50_pct": round(cv, 2), "runs": runs}


# ---------------------------------------------------------------------- set-up and report
def q4_0_gguf(work: Path) -> Path:
    """The smallest GGUF in demo-out's store (its q4_0), else one exported here from the fp32 model."""
    database = DEMO_DATA / "edgeforge.db"
    if database.is_file():
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
            row = connection.execute("SELECT sha256 FROM artifacts WHERE media_type = 'application/x-gguf' "
                                     "ORDER BY size_bytes LIMIT 1").fetchone()
        if row and (path := DEMO_DATA / "blobs" / "sha256" / row[0][:2] / row[0]).is_file():
            return path
    from services.compressor.compress import compress
    from services.exporter.base import ExportInput
    from services.exporter.formats.gguf import GgufExporter
    from shared.models.bundle import ModelDir
    from shared.quant.compressed import CompressedModel
    from shared.quant.grids import Method, QuantizationConfig
    model, sha = ModelDir(MODEL), "0" * 64
    compress(model, sha, QuantizationConfig(Method.RTN, gguf_type="q4_0"), work / "q4_0.compressed", device="cpu")
    return GgufExporter().export(ExportInput(model, sha, CompressedModel(work / "q4_0.compressed")),
                                 work / "q4_0.gguf").path


def prepare_store(data_dir: Path, artifact: Path) -> tuple[str, int, str]:
    """Stores the artifact and an agent token in the coordinator's data dir; returns (sha256, size, token)."""
    from shared.auth import TokenStore
    from shared.store.artifacts import ArtifactStore
    from shared.store.database import Database
    from shared.store.records import ArtifactKind
    db = Database(data_dir / "edgeforge.db")
    record = ArtifactStore(db, data_dir).put_file(artifact, ArtifactKind.EXPORTED_MODEL, media_type="application/x-gguf")
    _, token = TokenStore(db).create("agent", "bench/fleet.py")
    db.close()
    return record.sha256, record.size_bytes, token


def versions() -> dict:
    import google.protobuf
    import grpc
    out = {"python": platform.python_version(), "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__}
    try:
        import llama_cpp
        out["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    return out


def transfer_table(transfer: dict) -> list[str]:
    lines = [f"Transfer of {transfer['size_bytes'] / 1e6:.0f} MB over loopback, median of {transfer['repeats']} "
             f"(×raw: ÷ {transfer['best_raw']}, stream MB/s; target ≥ 0.8)\n",
             "| variant | stream MB/s | ×raw | total MB/s (+ sha256 pass) | ×raw | server CPU s | client CPU s "
             "| server page faults |", "|---|---|---|---|---|---|---|---|"]
    for row in transfer["rows"]:
        total = (f"{row['total_mb_per_s']:.0f} | {row['ratio_total_vs_best_raw']:.2f}" if "total_mb_per_s" in row
                 else "— | —")
        lines.append(f"| {row['variant']} | {row['stream_mb_per_s']:.0f} | {row['ratio_stream_vs_best_raw']:.2f} "
                     f"| {total} | {row['server_cpu_s']:.2f} | {row['client_cpu_s']:.2f} "
                     f"| {row['server_page_faults']} |")
    first = ", ".join(f"{name}: {run['stream_s']:.2f} s stream, {run['total_s']:.2f} s total"
                      for name, run in transfer["first_fetch"].items())
    lines.append(f"\nFirst fetch per coordinator process (it hashes the blob before serving it once): {first}.\n")
    return lines


def dispatch_table(dispatch: dict) -> list[str]:
    wake, queued = dispatch["wake_up"], dispatch["queued"]
    return ["| dispatch | jobs | p50 ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|---|",
            f"| wake-up: enqueue → lease in a long-polling agent | {wake['count']} | {wake['p50_ms']:.1f} "
            f"| {wake['p90_ms']:.1f} | {wake['p99_ms']:.1f} | {wake['max_ms']:.1f} |",
            f"| queued: LeaseJob round trip | {queued['count']} | {queued['p50_ms']:.1f} | {queued['p90_ms']:.1f} "
            f"| {queued['p99_ms']:.1f} | {queued['max_ms']:.1f} |", ""]


def repeatability_table(repeat: dict) -> list[str]:
    config = repeat["config"]
    lines = [f"Repeatability: {repeat['repeats']} × the same GGUF q4_0 job ({config['prompt_tokens']} + "
             f"{config['generation_tokens']} tokens, {config['timed_runs']} timed runs)\n",
             "| repeat | p50 ms | within-run cv % | timed phases |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['p50_ms']:.1f} | {r['cv_pct']:.1f} | {r['attempts']} |"
              for i, r in enumerate(repeat["runs"])]
    lines.append(f"| CV of the p50s | {repeat['cv_of_p50_pct']:.1f} % | | |\n")
    return lines


def table(result: dict) -> str:
    lines = []
    if "transfer" in result:
        lines += transfer_table(result["transfer"])
    if "dispatch" in result:
        lines += dispatch_table(result["dispatch"])
    if "repeatability" in result:
        lines += repeatability_table(result["repeatability"])
    lines += ["| peak RSS (max RSS, mapped pages included) | MB |", "|---|---|"]
    lines += [f"| {name} | {value / 1e6:.0f} |" for name, value in result["peak_rss_bytes"].items()]
    return "\n".join(lines)


def serve_and_measure(args, parts: set[str], gguf: Path, work: Path, result: dict) -> None:
    """The coordinator(s) and the raw peer as children; transfer and dispatch against them."""
    from edgeforge.v1 import agent_pb2
    artifact = gguf if args.quick else MODEL / "model.safetensors"
    sha256, size_bytes, token = prepare_store(work / "data", artifact)
    result["artifact"] = {"path": str(artifact.relative_to(ROOT) if artifact.is_relative_to(ROOT) else artifact),
                          "sha256": sha256, "size_bytes": size_bytes}
    blob = work / "data" / "blobs" / "sha256" / sha256[:2] / sha256
    coordinators = {False: Child("coordinator", "--serve-coordinator", str(work / "data"))}
    if "transfer" in parts:
        coordinators[True] = Child("malloc-tuned coordinator", "--serve-coordinator", str(work / "data"),
                                   env=TUNED_MALLOC)
        raw = Child("raw TCP peer", "--serve-raw", str(blob))
    agent_stub(coordinators[False].address, token, []).RegisterAgent(agent_pb2.RegisterAgentRequest(
        device_id=DEVICE, attributes={"runtime:llama.cpp": "bench"}), timeout=30)
    if "transfer" in parts:
        started = time.perf_counter()
        result["transfer"] = measure_transfer(coordinators, raw, token, sha256, size_bytes, args.repeats, work)
        result["seconds"]["transfer"] = round(time.perf_counter() - started, 1)
        print(f"transfer: {json.dumps(result['transfer']['rows'])}", file=sys.stderr, flush=True)
        with connect(raw.address) as connection:
            connection.sendall(b"q")                         # the peer's way out, so time -v reports it
        result["peak_rss_bytes"][f"{raw.name} (time -v)"] = raw.finish()
        result["peak_rss_bytes"][f"{coordinators[True].name} (time -v)"] = coordinators[True].finish()
    if "dispatch" in parts:
        started = time.perf_counter()
        result["dispatch"] = measure_dispatch(coordinators[False], token, sha256, size_bytes, args.jobs)
        result["seconds"]["dispatch"] = round(time.perf_counter() - started, 1)
        print(f"dispatch: {json.dumps({k: v for k, v in result['dispatch']['wake_up'].items() if k != 'samples_ms'})}",
              file=sys.stderr, flush=True)
    result["peak_rss_bytes"][f"{coordinators[False].name} (time -v)"] = coordinators[False].finish()
    result["peak_rss_bytes"]["coordinator once started, before any call (VmHWM)"] = coordinators[False].startup_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 92 MB GGUF, fewer repeats and jobs, shorter runs")
    parser.add_argument("--parts", default="transfer,dispatch,repeatability", help="which measurements to run")
    parser.add_argument("--repeats", type=int, help="transfers per variant (default 5; --quick 3)")
    parser.add_argument("--jobs", type=int, help="jobs per dispatch test (default 60; --quick 20)")
    parser.add_argument("--measure-repeats", type=int, help="repeats of the measured job (default 5; --quick 3)")
    parser.add_argument("--gguf", type=Path, help="the q4_0 GGUF (default: demo-out's, else exported here)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fleet.json")
    parser.add_argument("--serve-coordinator", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-raw", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_coordinator:
        serve_coordinator(args.serve_coordinator)
        return
    if args.serve_raw:
        serve_raw(args.serve_raw)
        return
    parts = set(args.parts.split(","))
    if parts - {"transfer", "dispatch", "repeatability"} or not parts:
        parser.error(f"--parts takes transfer, dispatch and/or repeatability, got {args.parts!r}")
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.jobs = args.jobs or (20 if args.quick else 60)
    args.measure_repeats = args.measure_repeats or (3 if args.quick else 5)
    from clients.agent.profile import cpu_model
    result = {"machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "arch": platform.machine()},
              "versions": versions(), "load_average_before": os.getloadavg(),
              "command": "bench/fleet.py " + " ".join(sys.argv[1:]), "seconds": {}, "peak_rss_bytes": {}}
    with tempfile.TemporaryDirectory(prefix="edgeforge-bench-fleet-") as scratch:
        work = Path(scratch)
        gguf = args.gguf or q4_0_gguf(work)
        if parts & {"transfer", "dispatch"}:
            serve_and_measure(args, parts, gguf, work, result)
            shutil.rmtree(work / "data", ignore_errors=True)
        if "repeatability" in parts:
            started = time.perf_counter()
            result["repeatability"] = measure_repeatability(gguf, args.measure_repeats,
                                                            QUICK_MEASURE_CONFIG if args.quick else MEASURE_CONFIG)
            result["seconds"]["repeatability"] = round(time.perf_counter() - started, 1)
    result["peak_rss_bytes"]["this bench process, the agent side (VmHWM)"] = peak_rss_bytes()
    result["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
