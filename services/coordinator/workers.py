"""Clients of the stateless worker services, with retries for transient failures."""
from __future__ import annotations

import logging
import time

import grpc

from edgeforge.v1 import calibrator_pb2_grpc, compressor_pb2_grpc, exporter_pb2_grpc
from shared.grpc_status import from_rpc_error
from shared.server import channel

log = logging.getLogger(__name__)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class Workers:
    def __init__(self, calibrator: str, compressor: str, exporter: str, *, timeout_s: float = 3 * 3600,
                 attempts: int = 4):
        self.addresses = {"calibrator": calibrator, "compressor": compressor, "exporter": exporter}
        self.calibrator = calibrator_pb2_grpc.CalibratorStub(channel(calibrator))
        self.compressor = compressor_pb2_grpc.CompressorStub(channel(compressor))
        self.exporter = exporter_pb2_grpc.ExporterStub(channel(exporter))
        self.timeout_s, self.attempts = timeout_s, attempts

    def call(self, method, request):
        """Calls a unary worker RPC; retries UNAVAILABLE with backoff; raises typed errors."""
        for attempt in range(self.attempts):
            try:
                return method(request, timeout=self.timeout_s, wait_for_ready=attempt > 0)
            except grpc.RpcError as error:
                if error.code() in RETRYABLE and attempt < self.attempts - 1:
                    delay = min(2 ** attempt, 15)
                    log.warning("worker unavailable (%s); retrying in %ss", error.details(), delay)
                    time.sleep(delay)
                    continue
                raise from_rpc_error(error) from error
