"""Clients of the stateless worker services: several replicas per role, health-checked and least-loaded,
with a failed call repeated at once on another replica, and jittered backoff when none is up.

Dispatch. Each role (calibrator, compressor, exporter) has one or more replicas. A replica has its own
channel and stub, a count of calls in flight, and a state: up, down, or unknown (not yet probed). A
background thread asks each replica's standard health service (grpc.health.v1) about the role's own
service name every `health_interval_s`, so an address that serves some other service is down too.
A call goes to the replica that is not down with the fewest calls in flight; ties go round-robin,
so idle replicas take turns. A replica whose call fails with a transport error (see `retryable`) is
marked down at once, until a probe or a call finds it up again, and the call is repeated at once on
another replica that is not down. Only when every replica has failed or is down does the call wait,
with `RetryPolicy`'s backoff, and then try them all again, down or not (a probe may lag a restart).
When the policy's total wait is spent it raises Unavailable naming the replicas it tried.

Why a retry is safe: worker RPCs (ImportModel, Calibrate, Transform, Compress, Export, Evaluate) are
deterministic functions of their request and write their outputs as content-addressed artifacts. A
call repeated after its worker died, or after its response was lost, stores the same bytes under the
same digest (a second insert of the row is ignored), so nothing is stored twice; at worst the work is
done twice. A format that is not bit-reproducible leaves the first attempt's artifact as a valid row
no build refers to. Repeating on another replica changes none of this: replicas run the same code,
and an output is named by its content, not by the replica that made it, so two replicas that both
finish one call (the first was cut off from us, not dead) store one artifact. Only transport failures
are repeated, never a slow call, so a replica that is merely busy is not given a twin of its work.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
import weakref
from typing import Iterator, NamedTuple, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeforge.v1 import (calibrator_pb2, calibrator_pb2_grpc, compressor_pb2, compressor_pb2_grpc, exporter_pb2,
                          exporter_pb2_grpc)
from shared.errors import Unavailable
from shared.failover import parse_addresses, transport_failure
from shared.grpc_status import from_rpc_error
from shared.server import ClientTls, channel

log = logging.getLogger(__name__)
# role -> (stub class, the fully qualified service name its health status is registered under)
ROLES = {"calibrator": (calibrator_pb2_grpc.CalibratorStub, calibrator_pb2.DESCRIPTOR.services_by_name["Calibrator"]),
         "compressor": (compressor_pb2_grpc.CompressorStub, compressor_pb2.DESCRIPTOR.services_by_name["Compressor"]),
         "exporter": (exporter_pb2_grpc.ExporterStub, exporter_pb2.DESCRIPTOR.services_by_name["Exporter"])}
UP, DOWN, UNKNOWN = "up", "down", "unknown"
STATES = (UP, DOWN, UNKNOWN)
PROBE_TIMEOUT_S = 2.0


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff for when no replica of a role is up.

    The n-th wait is uniform in [b/2, b] with b = min(initial_backoff_s * multiplier**n, max_backoff_s)
    ("equal jitter": retries of many builds spread out, yet each wait stays near its nominal value).
    Retrying stops once the waits would exceed `max_total_wait_s`, which is sized to outlast a worker
    restart (a new process imports torch and binds its port in seconds; a rescheduled container in
    about a minute).
    """
    initial_backoff_s: float = 0.5
    multiplier: float = 2.0
    max_backoff_s: float = 5.0
    max_total_wait_s: float = 120.0

    def waits(self, rng: random.Random) -> Iterator[float]:
        total, nominal = 0.0, self.initial_backoff_s
        while True:
            bound = min(nominal, self.max_backoff_s)
            wait = rng.uniform(bound / 2, bound)
            if total + wait > self.max_total_wait_s:
                return
            total += wait
            yield wait
            nominal *= self.multiplier


def retryable(error: grpc.RpcError) -> bool:
    """UNAVAILABLE (the worker is down or restarting), or a connection reset under a running call; never a
    worker's own error, which another replica would repeat."""
    return transport_failure(error)


@dataclasses.dataclass(frozen=True)
class ReplicaState:
    """One replica as `Workers.snapshot()` reports it (for metrics and debugging)."""
    role: str
    address: str
    state: str              # up, down, or unknown (not yet probed or called)
    in_flight: int          # calls running on it now
    calls: int              # calls sent to it since the coordinator started
    failures: int           # of those, calls that failed with a transport error

    @property
    def healthy(self) -> bool:
        return self.state == UP


@dataclasses.dataclass(eq=False)
class _Replica:
    role: str
    address: str
    stub: object
    health: health_pb2_grpc.HealthStub
    channel: grpc.Channel
    state: str = UNKNOWN
    in_flight: int = 0
    calls: int = 0
    failures: int = 0


class Method(NamedTuple):
    """A worker RPC by role and name, e.g. `workers.compressor.Compress`, for `Workers.call`."""
    role: str
    name: str


class Replicas:
    """The replicas of one role, in a fixed order; `replicas.Compress` names that RPC for `Workers.call`."""

    def __init__(self, role: str, replicas: list[_Replica]):
        self.role, self.replicas = role, replicas
        self.turn = 0                       # where the next round-robin scan starts

    def __getattr__(self, name: str) -> Method:
        if name.startswith("_") or not hasattr(self.replicas[0].stub, name):
            raise AttributeError(f"the {self.role} service has no RPC {name!r}")
        return Method(self.role, name)


class Workers:
    def __init__(self, calibrator: str | Sequence[str], compressor: str | Sequence[str],
                 exporter: str | Sequence[str], *, timeout_s: float = 3 * 3600, retry: RetryPolicy = RetryPolicy(),
                 token: str | None = None, tls: ClientTls | None = None, health_interval_s: float | None = 2.0):
        """Each role takes one address or several ("a:1,b:2" or a list). `token`: the coordinator's own admin
        secret (worker services are admin-only); `tls`: for workers that serve TLS. `health_interval_s`: how
        often each replica's health is probed; None probes nothing (embedded workers live and die with the
        coordinator's own process). The channels reconnect quickly (0.5-5 s) so a restarted worker is
        noticed within the retry."""
        reconnect = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 5000)]
        self.roles: dict[str, Replicas] = {}
        for role, given in (("calibrator", calibrator), ("compressor", compressor), ("exporter", exporter)):
            stub_class = ROLES[role][0]
            replicas = []
            for address in parse_addresses(given, f"--{role}"):
                connection = channel(address, token=token, tls=tls, options=reconnect)
                replicas.append(_Replica(role, address, stub_class(connection), health_pb2_grpc.HealthStub(connection),
                                         connection))
            self.roles[role] = Replicas(role, replicas)
        self.timeout_s, self.retry = timeout_s, retry
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if health_interval_s is not None:
            # The thread holds only a weak reference, so a Workers nobody uses any more stops its own poller.
            self._poller = threading.Thread(target=_poll, args=(weakref.ref(self), self._stop, health_interval_s),
                                            name="worker-health", daemon=True)
            self._poller.start()

    @property
    def calibrator(self) -> Replicas:
        return self.roles["calibrator"]

    @property
    def compressor(self) -> Replicas:
        return self.roles["compressor"]

    @property
    def exporter(self) -> Replicas:
        return self.roles["exporter"]

    def call(self, method: Method, request):
        """Calls a unary worker RPC on the least-loaded replica that is up; a transport failure (see `retryable`)
        is repeated at once on another, and with `retry`'s backoff once none is left, until its total wait is
        spent; raises typed errors. Safe to repeat: see the module docstring."""
        replicas = self.roles[method.role]
        waits = self.retry.waits(random.Random())
        tried: set[str] = set()              # replicas that failed since the last wait
        attempt, waited, last = 0, False, None
        while True:
            replica = self._take(replicas, tried, down_too=waited)
            if replica is None:
                wait = next(waits, None)
                if wait is None:
                    raise self._unavailable(replicas, attempt) from last
                log.warning("no %s replica is up (%s); attempt %d, retrying in %.1f s", method.role,
                            ", ".join(r.address for r in replicas.replicas), attempt, wait)
                time.sleep(wait)
                tried.clear()
                waited = True
                continue
            attempt += 1
            if len(replicas.replicas) > 1:       # where each stage's work ran, when there is a choice
                log.info("%s on %s %s", method.name, method.role, replica.address)
            try:
                # No wait_for_ready: a worker that is down fails fast, and the wait is ours, bounded.
                response = getattr(replica.stub, method.name)(request, timeout=self.timeout_s)
            except grpc.RpcError as error:
                self._settle(replica, error)
                if not retryable(error):
                    raise from_rpc_error(error) from error
                tried.add(replica.address)
                last = error
                following = self._peek(replicas, tried)
                log.warning("worker call failed (%s: %s): %s on %s %s, attempt %d; %s", error.code().name,
                            error.details(), method.name, method.role, replica.address, attempt,
                            f"retrying at once on {following.address}" if following else f"no other {method.role} "
                            "replica is up")
                continue
            self._settle(replica, None)
            return response

    def snapshot(self) -> list[ReplicaState]:
        """Every replica's state, in role order then configuration order."""
        with self._lock:
            return [ReplicaState(r.role, r.address, r.state, r.in_flight, r.calls, r.failures)
                    for replicas in self.roles.values() for r in replicas.replicas]

    def probe(self) -> None:
        """Asks every replica's health service now (the poller calls this every `health_interval_s`)."""
        for replicas in self.roles.values():
            service = ROLES[replicas.role][1].full_name
            for replica in replicas.replicas:
                try:
                    reply = replica.health.Check(health_pb2.HealthCheckRequest(service=service),
                                                 timeout=PROBE_TIMEOUT_S)
                    state, why = ((UP, "") if reply.status == health_pb2.HealthCheckResponse.SERVING else
                                  (DOWN, f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"))
                except grpc.RpcError as error:
                    state, why = DOWN, f"health check {error.code().name}: {error.details()}"
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        why = f"it does not serve {service}: is it a {replicas.role}?"
                self._mark(replica, state, why)

    def close(self) -> None:
        """Stops the health poller and closes every channel."""
        self._stop.set()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join(timeout=PROBE_TIMEOUT_S * 2)
        for replicas in self.roles.values():
            for replica in replicas.replicas:
                replica.channel.close()

    def _candidates(self, replicas: Replicas, tried: set[str], down_too: bool) -> list[_Replica]:
        """Untried replicas that are not down (or, with `down_too` and none of those, any untried one), in
        round-robin order from `replicas.turn`. Call with the lock held."""
        count = len(replicas.replicas)
        ordered = [replicas.replicas[(replicas.turn + i) % count] for i in range(count)]
        untried = [r for r in ordered if r.address not in tried]
        alive = [r for r in untried if r.state != DOWN]
        return alive or (untried if down_too else [])

    def _take(self, replicas: Replicas, tried: set[str], down_too: bool) -> _Replica | None:
        """The least-loaded candidate (the first in round-robin order among equals), counted as in flight."""
        with self._lock:
            candidates = self._candidates(replicas, tried, down_too)
            if not candidates:
                return None
            chosen = min(candidates, key=lambda r: r.in_flight)        # min keeps the first of equals
            replicas.turn = (replicas.replicas.index(chosen) + 1) % len(replicas.replicas)
            chosen.in_flight += 1
            chosen.calls += 1
            return chosen

    def _peek(self, replicas: Replicas, tried: set[str]) -> _Replica | None:
        """The replica the next attempt will go to at once, if any (for the log line)."""
        with self._lock:
            candidates = self._candidates(replicas, tried, down_too=False)
            return min(candidates, key=lambda r: r.in_flight) if candidates else None

    def _settle(self, replica: _Replica, error: grpc.RpcError | None) -> None:
        """A call on `replica` ended: a transport failure marks it down; an answer, even an error, marks it up."""
        with self._lock:
            replica.in_flight -= 1
            if error is not None and retryable(error):
                replica.failures += 1
        if error is None or not retryable(error):
            self._mark(replica, UP, "")
        else:
            self._mark(replica, DOWN, f"{error.code().name}: {error.details()}")

    def _mark(self, replica: _Replica, state: str, why: str) -> None:
        with self._lock:
            before, replica.state = replica.state, state
        if state == DOWN and before != DOWN:
            log.warning("%s replica %s is down (%s)", replica.role, replica.address, why)
        elif state == UP and before == DOWN:
            log.info("%s replica %s is up again", replica.role, replica.address)

    def _unavailable(self, replicas: Replicas, attempts: int) -> Unavailable:
        addresses = ", ".join(r.address for r in replicas.replicas)
        log.error("no %s replica answered after %d attempts over %.0f s (%s)", replicas.role, attempts,
                  self.retry.max_total_wait_s, addresses)
        return Unavailable(f"no {replicas.role} replica is reachable ({addresses}) after {attempts} attempts over "
                           f"{self.retry.max_total_wait_s:g} s; start one, or check --{replicas.role}",
                           reason="DEPENDENCY_FAILED")


def _poll(workers: weakref.ref, stop: threading.Event, interval_s: float) -> None:
    """The health poller: probes at once, then every `interval_s`, until stopped or its Workers is gone."""
    while True:
        current = workers()
        if current is None:
            return
        try:
            current.probe()
        except Exception:                   # noqa: BLE001 — a poller that dies would leave stale states forever
            log.exception("worker health probe failed")
        del current
        if stop.wait(interval_s):
            return
