"""edgeforge-agent: register this device, then lease, fetch, measure and report, forever.

    edgeforge-agent --coordinator HOST:PORT [--label device=pixel-8-host] [--cache-dir DIR]

The agent connects out to the coordinator (devices sit behind NAT). Each artifact is checked against
the lease's sha256 before it runs; each measurement runs in a child process whose own peak RSS
(VmHWM: resident pages, file-backed mappings included) is the memory reported.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.rpc import status_pb2

from clients.agent import profile
from clients.agent.cache import ArtifactCache
from edgeforge.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger("edgeforge.agent")
FORMATS = {common_pb2.EXPORT_FORMAT_GGUF: "gguf", common_pb2.EXPORT_FORMAT_ONNX: "onnx"}
RUNTIME_OF = {"gguf": "llama.cpp", "onnx": "onnxruntime"}


def device_id(cache_dir: Path) -> str:
    """A stable id for this device, persisted in the cache dir."""
    path = cache_dir / "device-id"
    if path.is_file():
        return path.read_text().strip()
    host = "".join(c if c.isalnum() else "-" for c in os.uname().nodename.lower())[:40].strip("-") or "device"
    value = f"{host}-{uuid.uuid4().hex[:8]}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(value)
    return value


def run_measurement(export_format: str, path: Path, config: dict, cancelled: threading.Event,
                    timeout_s: float) -> dict:
    """Runs clients.agent.measure in a child process (its peak RSS is the runtime's alone)."""
    child = subprocess.Popen([sys.executable, "-m", "clients.agent.measure", export_format, str(path),
                              json.dumps(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = time.monotonic()
    while True:
        try:
            stdout, stderr = child.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if cancelled.is_set() or time.monotonic() - started > timeout_s:
                child.kill()
                child.communicate()
                raise RuntimeError("cancelled" if cancelled.is_set() else f"measurement exceeded {timeout_s:.0f} s")
    if child.returncode != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{RUNTIME_OF[export_format]} failed (exit {child.returncode}): {' | '.join(tail)}")
    return json.loads(stdout.decode().strip().splitlines()[-1])


class Agent:
    def __init__(self, coordinator: str, cache_dir: Path, cache_max_bytes: int, labels: dict[str, str],
                 device: str | None = None, cooldown_s: float = 1.0, measure_timeout_s: float = 1800.0):
        from shared.server import channel
        self._channel = channel(coordinator)
        self.stub = agent_pb2_grpc.AgentGatewayStub(self._channel)
        self.cache = ArtifactCache(cache_dir / "artifacts", cache_max_bytes)
        self.device_id = device or device_id(cache_dir)
        self.labels, self.cooldown_s, self.measure_timeout_s = labels, cooldown_s, measure_timeout_s
        self.stopping = threading.Event()
        self.current_lease: str | None = None
        self.lease_cancelled = threading.Event()
        self.heartbeat_interval_s = 1.0          # until the coordinator says otherwise

    def stop(self) -> None:
        """Stops the loops now: closing the channel ends a pending LeaseJob long-poll at once."""
        self.stopping.set()
        self._channel.close()

    @property
    def device(self) -> str:
        return f"devices/{self.device_id}"

    def register(self) -> None:
        attributes = profile.detect(self.labels)
        self.stub.RegisterAgent(agent_pb2.RegisterAgentRequest(device_id=self.device_id, attributes=attributes,
                                                               display_name=attributes["cpu"]), timeout=30)
        log.info("registered %s (%s/%s, %s cores)", self.device, attributes["os"], attributes["arch"],
                 attributes["cores"])

    def _heartbeats(self) -> None:
        while not self.stopping.wait(self.heartbeat_interval_s):
            lease = self.current_lease
            try:
                response = self.stub.Heartbeat(agent_pb2.HeartbeatRequest(device=self.device,
                                                                          leases=[lease] if lease else []), timeout=10)
                self.heartbeat_interval_s = max(response.heartbeat_interval_ms / 1000, 0.5)
                if lease and lease in response.cancelled_leases:
                    log.warning("%s was cancelled or lapsed; abandoning it", lease)
                    self.lease_cancelled.set()
            except ValueError:                                      # the channel was closed by stop()
                return
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:      # the coordinator forgot us: register again
                    self._safely(self.register)
                else:
                    log.warning("heartbeat failed: %s", error.details())

    def _safely(self, action) -> bool:
        try:
            action()
            return True
        except grpc.RpcError as error:
            log.warning("%s failed: %s", getattr(action, "__name__", "call"), error.details())
            return False

    def run_forever(self) -> None:
        while not self.stopping.is_set() and not self._safely(self.register):
            self.stopping.wait(2.0)
        threading.Thread(target=self._heartbeats, name="heartbeats", daemon=True).start()
        while not self.stopping.is_set():
            try:
                response = self.stub.LeaseJob(agent_pb2.LeaseJobRequest(device=self.device, wait_ms=10_000),
                                              timeout=20)
            except (grpc.RpcError, ValueError) as error:      # ValueError: the channel was closed by stop()
                if self.stopping.is_set():
                    return
                if isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.NOT_FOUND:
                    self._safely(self.register)
                else:
                    log.warning("LeaseJob failed: %s", error.details() if isinstance(error, grpc.RpcError) else error)
                self.stopping.wait(2.0)
                continue
            if response.HasField("lease"):
                self.handle(response.lease)
                self.stopping.wait(self.cooldown_s)              # cool-down between candidates

    def handle(self, lease: agent_pb2.Lease) -> None:
        job = lease.job
        self.current_lease = lease.name
        self.lease_cancelled.clear()
        log.info("%s: measuring %s (%s) for %s", lease.name, job.candidate_id, job.artifact, job.build)
        request = agent_pb2.ReportResultRequest(lease=lease.name)
        try:
            export_format = FORMATS.get(job.format)
            if export_format is None or RUNTIME_OF[export_format] not in profile.runtimes():
                raise RuntimeError(f"this device has no runtime for format {job.format}")
            read = lambda offset: self.stub.FetchArtifact(agent_pb2.FetchArtifactRequest(lease=lease.name,
                                                                                           offset=offset), timeout=3600)
            path = self.cache.fetch(job.sha256, job.size_bytes, read)
            config = json_format.MessageToDict(job.config, preserving_proto_field_name=True)
            result = run_measurement(export_format, path, config, self.lease_cancelled, self.measure_timeout_s)
            measurement = json_format.ParseDict(result, common_pb2.Measurement())
            request.measurement.CopyFrom(measurement)
        except (RuntimeError, OSError, ValueError, grpc.RpcError) as error:
            if self.lease_cancelled.is_set():
                self.current_lease = None
                return
            message = error.details() if isinstance(error, grpc.RpcError) else str(error)
            log.warning("%s failed: %s", lease.name, message)
            request.error.CopyFrom(status_pb2.Status(code=9, message=message))
        finally:
            self.current_lease = None
        for attempt in range(5):                                   # ReportResult is idempotent per lease
            try:
                self.stub.ReportResult(request, timeout=30)
                return
            except ValueError:                                      # stopped while measuring
                return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    log.warning("ReportResult refused: %s", error.details())
                    return
                time.sleep(2 ** attempt)


def _labels(values: list[str]) -> dict[str, str]:
    labels = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise SystemExit(f"--label must be key=value, got {value!r}")
        labels[key] = item
    return labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="edgeforge-agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", required=True, help="coordinator address host:port")
    parser.add_argument("--label", action="append", default=[], help="extra attribute key=value (repeatable)")
    parser.add_argument("--device-id", help="stable device id (default: hostname + random suffix, persisted)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "edgeforge-agent")
    parser.add_argument("--cache-max-bytes", type=int, default=10 << 30)
    parser.add_argument("--cooldown-s", type=float, default=1.0, help="pause between measurements")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s")
    agent = Agent(args.coordinator, args.cache_dir, args.cache_max_bytes, _labels(args.label), args.device_id,
                  args.cooldown_s)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    agent.run_forever()


if __name__ == "__main__":
    main()
