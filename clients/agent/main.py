"""edgeforge-agent: register this device (and any attached phones), then lease, fetch, measure and
report, until stopped.

    edgeforge-agent --coordinator HOST:PORT --token-file agent.token [--label device=bench-host]
                    [--drivers local,adb] [--runtimes onnxruntime,llama.cpp] [--slots 1]
                    [--cache-dir DIR] [--cache-max-bytes 20G] [--config agent.toml]

The agent connects out to the coordinator (devices sit behind NAT) with a bearer token of the agent
role. Every device it drives — this host ("local" driver) and each Android phone attached over adb
("adb" driver, one device per serial) — registers its own profile, heartbeats its leases, and runs
one job at a time unless given more slots. Each artifact is checked against the lease's sha256
before it runs; each local measurement runs in a child process whose own peak RSS is the memory
reported (clients/agent/measure.py has the protocol).

A config file (TOML, or JSON) may hold any long option by name (`coordinator = "..."`,
`labels = {device = "pixel-8-host"}`, `drivers = ["local", "adb"]`, `cache_max_bytes = "20G"`, ...);
command-line flags override it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf import json_format
from google.rpc import status_pb2

from . import __version__, logs, process, profile
from .cache import ArtifactCache, CacheError, Unpacked
from .config import AgentConfig, config_from, parser
from .drivers import FORMAT_RUNTIME
from edgeforge.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger("edgeforge.agent")
FORMATS = {common_pb2.EXPORT_FORMAT_GGUF: "gguf", common_pb2.EXPORT_FORMAT_ONNX: "onnx",
           common_pb2.EXPORT_FORMAT_TFLITE: "tflite", common_pb2.EXPORT_FORMAT_COREML: "coreml"}
TASKS = {common_pb2.MODEL_TASK_CAUSAL_LM: "causal_lm", common_pb2.MODEL_TASK_IMAGE_CLASSIFICATION: "image_classification",
         common_pb2.MODEL_TASK_TEXT_EMBEDDING: "text_embedding"}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20),
                   ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000)]


class Failed(Exception):
    """A job that could not be measured; the message goes back to the coordinator."""


# ---------------------------------------------------------------------- the connection
class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds "authorization: Bearer <token>" to every call."""

    def __init__(self, token: str):
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata) \
            if hasattr(details, "_replace") else _Details(details, self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready, self.compression = details.wait_for_ready, details.compression
        self.metadata = tuple(details.metadata or ()) + metadata


def stable_id(cache_dir: Path) -> str:
    """This host's device id, persisted in the cache dir: the host name plus a random suffix."""
    path = cache_dir / "device-id"
    if path.is_file():
        return path.read_text().strip()
    host = re.sub(r"[^a-z0-9]+", "-", os.uname().nodename.lower())[:40].strip("-") or "device"
    value = f"{host}-{uuid.uuid4().hex[:8]}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(value)
    return value


# ---------------------------------------------------------------------- measuring
def run_local(export_format: str, path: Path, config: dict, cancelled: threading.Event, timeout_s: float) -> dict:
    """Runs the measurement protocol in a child process (its peak RSS is the runtime's alone)."""
    try:
        child = process.run([sys.executable, "-m", f"{__package__}.measure", export_format, str(path),
                             json.dumps(config)], timeout_s=timeout_s, cancelled=cancelled)
    except process.Interrupted as why:
        raise Failed(f"measurement {why}") from None
    stdout, stderr = child.stdout, child.stderr
    if child.returncode != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise Failed(f"{FORMAT_RUNTIME[export_format]} failed (exit {child.returncode}): {' | '.join(tail)}")
    return json.loads(stdout.decode().strip().splitlines()[-1])


class DeviceWorker:
    """One device: registration, heartbeats, and `slots` lease loops."""

    def __init__(self, agent: "Agent", device_id: str, attributes: dict[str, str], unavailable: dict[str, str],
                 measure: Callable[[str, Path, dict, threading.Event], dict], slots: int = 1):
        self.agent, self.device_id, self.attributes, self.unavailable = agent, device_id, attributes, unavailable
        self.measure, self.slots = measure, slots
        self.stopping = threading.Event()
        self.leases: dict[str, threading.Event] = {}           # lease name -> its cancel flag
        self._lock = threading.Lock()
        self.heartbeat_interval_s = 1.0
        self.threads: list[threading.Thread] = []

    @property
    def name(self) -> str:
        return f"devices/{self.device_id}"

    @property
    def runtimes(self) -> set[str]:
        return {key.removeprefix("runtime:") for key in self.attributes if key.startswith("runtime:")}

    def register(self) -> None:
        self.agent.stub.RegisterAgent(agent_pb2.RegisterAgentRequest(
            device_id=self.device_id, attributes=self.attributes, display_name=self.attributes.get("cpu", ""),
            slots=self.slots, unavailable_runtimes=self.unavailable), timeout=30)
        log.info("registered %s (%s/%s, %s cores, runtimes: %s)", self.name, self.attributes.get("os"),
                 self.attributes.get("arch"), self.attributes.get("cores"), ", ".join(sorted(self.runtimes)) or "none")

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._heartbeats, name=f"{self.device_id}-heartbeats", daemon=True)]
        self.threads += [threading.Thread(target=self._lease_loop, name=f"{self.device_id}-slot{i}", daemon=True)
                         for i in range(self.slots)]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            for cancelled in self.leases.values():
                cancelled.set()

    def _stopped(self) -> bool:
        return self.stopping.is_set() or self.agent.stopping.is_set()

    def _wait(self, seconds: float) -> bool:
        """Sleeps up to `seconds`; True when the worker is being stopped."""
        deadline = time.monotonic() + seconds
        while not self._stopped() and time.monotonic() < deadline:
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
        return self._stopped()

    def _heartbeats(self) -> None:
        while not self._wait(self.heartbeat_interval_s):
            with self._lock:
                held = list(self.leases)
            try:
                response = self.agent.stub.Heartbeat(agent_pb2.HeartbeatRequest(device=self.name, leases=held),
                                                     timeout=10)
                self.heartbeat_interval_s = max(response.heartbeat_interval_ms / 1000, 0.2)
                with self._lock:
                    for name in response.cancelled_leases:
                        if name in self.leases:
                            log.warning("%s was cancelled or lapsed; abandoning it", name)
                            self.leases[name].set()
            except ValueError:                                      # the channel was closed by stop()
                return
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:      # the coordinator forgot us: register again
                    self.agent.safely(self.register)
                else:
                    log.warning("%s heartbeat failed: %s", self.name, error.details())

    def _lease_loop(self) -> None:
        while not self._stopped():
            try:
                response = self.agent.stub.LeaseJob(agent_pb2.LeaseJobRequest(
                    device=self.name, wait_ms=self.agent.config.lease_wait_ms),
                    timeout=self.agent.config.lease_wait_ms / 1000 + 10)
            except (grpc.RpcError, ValueError) as error:       # ValueError: the channel was closed by stop()
                if self._stopped():
                    return
                if isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.NOT_FOUND:
                    self.agent.safely(self.register)
                elif isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    log.error("the coordinator refused this agent's token: %s", error.details())
                else:
                    log.warning("LeaseJob failed: %s", error.details() if isinstance(error, grpc.RpcError) else error)
                self._wait(2.0)
                continue
            if response.HasField("lease"):
                self.handle(response.lease)

    def handle(self, lease: agent_pb2.Lease) -> None:
        job, cancelled = lease.job, threading.Event()
        with self._lock:
            self.leases[lease.name] = cancelled
        log.info("%s: measuring %s (%s) of %s on %s, attempt %d", lease.name, job.candidate_id, job.artifact,
                 job.build, self.name, lease.attempt)
        request = agent_pb2.ReportResultRequest(lease=lease.name)
        try:
            request.measurement.CopyFrom(self._measure(lease, cancelled))
        except (Failed, CacheError, OSError, ValueError, KeyError, grpc.RpcError) as error:
            if cancelled.is_set():
                log.info("%s abandoned", lease.name)
                return
            message = error.details() if isinstance(error, grpc.RpcError) else str(error)
            log.warning("%s failed: %s", lease.name, message)
            request.error.CopyFrom(status_pb2.Status(code=9, message=message))
        except Exception as error:          # a bug: report it (INTERNAL) and keep this slot serving
            log.exception("%s: internal agent error", lease.name)
            request.error.CopyFrom(status_pb2.Status(code=13, message=f"internal agent error: "
                                                                      f"{type(error).__name__}: {error}"))
        finally:
            with self._lock:
                self.leases.pop(lease.name, None)
        self.agent.report(request)

    def _measure(self, lease: agent_pb2.Lease, cancelled: threading.Event) -> common_pb2.Measurement:
        job = lease.job
        export_format = FORMATS.get(job.format)
        if export_format is None:
            raise Failed(f"this agent ({__version__}) does not know export format {job.format}")
        runtime = FORMAT_RUNTIME[export_format]
        if runtime not in self.runtimes:
            raise Failed(f"{self.name} has no {runtime} runtime: "
                         f"{self.unavailable.get(runtime, 'not offered by this agent')}")
        config = json_format.MessageToDict(job.config, preserving_proto_field_name=True)
        config["task"] = TASKS.get(job.task, "causal_lm")
        cooldown_s = config.get("cooldown_ms", 1000) / 1000
        stub = self.agent.stub
        path = self.agent.cache.fetch(job.sha256, job.size_bytes, lambda offset: stub.FetchArtifact(
            agent_pb2.FetchArtifactRequest(lease=lease.name, offset=offset), timeout=3600))
        with self.agent.exclusive(cancelled):
            started = time.monotonic()
            while time.monotonic() - started < cooldown_s:     # cool-down: the last job's heat and caches fade
                if cancelled.wait(0.05):
                    raise Failed("cancelled")
            with Unpacked(path, self.agent.cache.root.parent / "scratch") as target:
                result = self.measure(export_format, target, config, cancelled)
        result["cooldown_ms"] = cooldown_s * 1000
        return json_format.ParseDict(result, common_pb2.Measurement(), ignore_unknown_fields=False)


def _connect(config: AgentConfig) -> grpc.Channel:
    """Plain text, or TLS when the config names the coordinator's CA (plus a client certificate for mTLS).
    The agent wheel ships without shared/, so this mirrors shared.server.ClientTls."""
    read = lambda path: Path(path).read_bytes() if path else None
    tls_ca, tls_cert, tls_key = (getattr(config, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    if not tls_ca:
        return grpc.insecure_channel(config.coordinator, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(root_certificates=read(tls_ca), private_key=read(tls_key),
                                               certificate_chain=read(tls_cert))
    return grpc.secure_channel(config.coordinator, credentials, options=CHANNEL_OPTIONS)


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        channel = _connect(config)
        self._channel = channel
        if config.token:
            channel = grpc.intercept_channel(channel, _Bearer(config.token))
        self.stub = agent_pb2_grpc.AgentGatewayStub(channel)
        self.cache = ArtifactCache(config.cache_dir / "artifacts", config.cache_max_bytes)
        self.stopping = threading.Event()
        self._stop_lock, self._stopped = threading.Lock(), False
        self.workers: dict[str, DeviceWorker] = {}
        self.host_id = config.device_id or stable_id(config.cache_dir)

    @contextlib.contextmanager
    def exclusive(self, cancelled: threading.Event):
        """Holds the host lock (--host-lock) while measuring: several agents emulating devices on one
        machine then measure one at a time instead of stealing each other's cores and memory bandwidth."""
        if self.config.host_lock is None:
            yield
            return
        import fcntl
        self.config.host_lock.parent.mkdir(parents=True, exist_ok=True)
        with open(self.config.host_lock, "a") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if cancelled.wait(0.1) or self.stopping.is_set():
                        raise Failed("cancelled while waiting for the host lock")
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def stop(self) -> None:
        """Stops every loop now: closing the channel ends pending LeaseJob long-polls at once. Idempotent.
        Not for signal handlers (a second signal would run it nested inside the first): they set `stopping`
        and run_forever calls this from the main thread."""
        self.stopping.set()
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        for worker in list(self.workers.values()):
            worker.stop()
        self._channel.close()

    def safely(self, action) -> bool:
        try:
            action()
            return True
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                log.error("the coordinator refused this agent's token: %s", error.details())
            else:
                log.warning("%s failed: %s", getattr(action, "__name__", "call"), error.details())
            return False
        except ValueError:                                        # the channel was closed by stop()
            return False

    def report(self, request: agent_pb2.ReportResultRequest) -> None:
        for attempt in range(6):                                   # ReportResult is idempotent per lease
            try:
                accepted = self.stub.ReportResult(request, timeout=30).accepted
                log.info("%s reported%s", request.lease, "" if accepted else " (already recorded)")
                return
            except ValueError:                                      # stopped while measuring
                return
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    log.warning("ReportResult refused: %s", error.details())
                    return
                time.sleep(min(2 ** attempt, 15))

    def add(self, worker: DeviceWorker) -> None:
        while not self.stopping.is_set() and not self.safely(worker.register):
            self.stopping.wait(2.0)
        if not self.stopping.is_set():
            self.workers[worker.device_id] = worker
            worker.start()

    def local_worker(self) -> DeviceWorker:
        with self.exclusive(threading.Event()):      # the bandwidth/sgemm probe, like a measurement, runs alone
            attributes, unavailable = profile.detect(self.config.labels, self.config.runtimes)
        attributes["agent"] = __version__
        timeout = self.config.measure_timeout_s
        return DeviceWorker(self, self.host_id, attributes, unavailable,
                            lambda fmt, path, config, cancelled: run_local(fmt, path, config, cancelled, timeout),
                            self.config.slots)

    def run_forever(self) -> None:
        if "local" in self.config.drivers:
            self.add(self.local_worker())
        if "adb" in self.config.drivers:
            threading.Thread(target=self._watch_phones, name="adb", daemon=True).start()
        while not self.stopping.is_set():
            # Timed: Event.wait() in the main thread can miss a set() made by a signal handler that ran inside
            # it when two signals arrive together (SIGTERM + SIGINT from a supervisor), and never return.
            self.stopping.wait(0.5)
        self.stop()

    def _watch_phones(self) -> None:
        """Registers each phone adb reports, one device per serial; stops driving phones that vanish."""
        from .adb import Adb
        adb = Adb(self.config.adb, tools_dir=self.config.adb_tools)
        seen: set[str] | None = None
        while not self.stopping.is_set():
            try:
                phones = {phone.serial: phone for phone in adb.devices()}
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                log.warning("adb failed: %s", error)
                phones = {}
            if set(phones) != seen:
                log.info("adb: %d phone(s) ready%s", len(phones), f": {', '.join(sorted(phones))}" if phones else "")
                seen = set(phones)
            prefix = f"{self.host_id[:30]}-"
            for serial in phones:
                device_id = prefix + re.sub(r"[^a-z0-9]+", "-", serial.lower()).strip("-")[:32]
                if device_id in self.workers and not self.workers[device_id].stopping.is_set():
                    continue
                attributes = {**adb.profile(serial), **self.config.labels, "agent": __version__}
                available = {k for k in attributes if k.startswith("runtime:")}
                if self.config.runtimes is not None:
                    for key in available - {f"runtime:{r}" for r in self.config.runtimes}:
                        del attributes[key]
                def measure(fmt, path, config, cancelled, serial=serial):
                    return adb.measure(serial, fmt, path, config, cancelled=cancelled)
                worker = DeviceWorker(self, device_id, attributes, {}, measure, slots=1)
                threading.Thread(target=self.add, args=(worker,), daemon=True).start()
            for device_id, worker in list(self.workers.items()):
                serial = worker.attributes.get("serial")
                if serial and serial not in phones and not worker.stopping.is_set():
                    log.warning("%s (%s) is gone; its leases will lapse and go back to the queue", device_id, serial)
                    worker.stop()
                    del self.workers[device_id]
            self.stopping.wait(5.0)


def main(argv: list[str] | None = None) -> None:
    arguments = parser(__doc__)
    logs.add_arguments(arguments)              # --log-format json: one JSON object per line (docs/OPERATIONS.md)
    args = arguments.parse_args(argv)
    if args.verbose:
        args.log_level = "debug"
    logs.configure_from_args(arguments, args, service="agent")
    try:
        config = config_from(args)
    except (ValueError, OSError) as error:
        raise SystemExit(f"edgeforge-agent: {error}")
    if not config.token:
        log.warning("no token given (--token-file, --token or $EDGEFORGE_AGENT_TOKEN): a coordinator that checks "
                    "tokens will refuse this agent")
    agent = Agent(config)
    signal.signal(signal.SIGTERM, lambda *_: agent.stopping.set())      # run_forever then stops everything
    signal.signal(signal.SIGINT, lambda *_: agent.stopping.set())
    agent.run_forever()


if __name__ == "__main__":
    main()
