"""Clients of the stateless worker services, with retries for transient failures.

Why a retry is safe: worker RPCs (ImportModel, Calibrate, Transform, Compress, Export, Evaluate) are
deterministic functions of their request and write their outputs as content-addressed artifacts. A
call repeated after its worker died, or after its response was lost, stores the same bytes under the
same digest (the row insert is INSERT OR IGNORE), so nothing is stored twice; at worst the work is
done twice. A format that is not bit-reproducible leaves the first attempt's artifact as a valid row
no build refers to.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Iterator

import grpc

from edgeforge.v1 import calibrator_pb2_grpc, compressor_pb2_grpc, exporter_pb2_grpc
from shared.grpc_status import from_rpc_error
from shared.server import ClientTls, channel

log = logging.getLogger(__name__)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
# A connection torn down under a running call (the worker was killed) can also surface with these
# codes; only these transport messages make them retryable, never a worker's own INTERNAL error.
TRANSPORT_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
TRANSPORT_DETAILS = ("connection reset", "socket closed", "stream removed", "broken pipe", "failed to connect",
                     "connection refused", "goaway")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff for transient worker failures.

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
    """UNAVAILABLE (the worker is down or restarting), or a connection reset under a running call."""
    if error.code() in RETRYABLE:
        return True
    details = (error.details() or "").lower()
    return error.code() in TRANSPORT_CODES and any(text in details for text in TRANSPORT_DETAILS)


class Workers:
    def __init__(self, calibrator: str, compressor: str, exporter: str, *, timeout_s: float = 3 * 3600,
                 retry: RetryPolicy = RetryPolicy(), token: str | None = None, tls: ClientTls | None = None):
        """`token`: the coordinator's own admin secret (worker services are admin-only); `tls`: for workers that
        serve TLS. The channels reconnect quickly (0.5-5 s) so a restarted worker is noticed within the retry."""
        self.addresses = {"calibrator": calibrator, "compressor": compressor, "exporter": exporter}
        reconnect = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 5000)]
        stub = lambda cls, address: cls(channel(address, token=token, tls=tls, options=reconnect))
        self.calibrator = stub(calibrator_pb2_grpc.CalibratorStub, calibrator)
        self.compressor = stub(compressor_pb2_grpc.CompressorStub, compressor)
        self.exporter = stub(exporter_pb2_grpc.ExporterStub, exporter)
        self.timeout_s, self.retry = timeout_s, retry

    def call(self, method, request):
        """Calls a unary worker RPC; retries transient failures (see `retryable`) with `retry`'s backoff until
        its total wait is spent; raises typed errors. Safe to repeat: see the module docstring."""
        waits = self.retry.waits(random.Random())
        attempt = 0
        while True:
            attempt += 1
            try:
                # No wait_for_ready: a worker that is down fails fast, and the wait is ours, bounded.
                return method(request, timeout=self.timeout_s)
            except grpc.RpcError as error:
                wait = next(waits, None) if retryable(error) else None
                if wait is None:
                    if retryable(error):
                        log.error("worker still unavailable after %d attempts over %.0f s: %s", attempt,
                                  self.retry.max_total_wait_s, error.details())
                    raise from_rpc_error(error) from error
                log.warning("worker call failed (%s: %s); attempt %d, retrying in %.1f s", error.code().name,
                            error.details(), attempt, wait)
                time.sleep(wait)
