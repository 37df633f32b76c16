"""Errors on the wire: EdgeforgeError <-> gRPC status with google.rpc.Status + ErrorInfo details.

Servers wrap every handler with `@rpc`, the one place that maps typed core errors to canonical
codes (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...) with an ErrorInfo reason in
UPPER_SNAKE (domain "edgeforge.dev") and the offending field in its metadata. Handlers never call
context.abort themselves. Clients read the details back with `error_details`.
"""
from __future__ import annotations

import collections
import errno
import functools
import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from shared.errors import EdgeforgeError, ResourceExhausted

log = logging.getLogger(__name__)
DOMAIN = "edgeforge.dev"
DETAILS_KEY = "grpc-status-details-bin"


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


def to_status_proto(error: EdgeforgeError) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=getattr(code_pb2, error.code), message=error.message, details=[detail])


def _abort(context: grpc.ServicerContext, error: EdgeforgeError) -> None:
    status = to_status_proto(error)
    context.abort_with_status(_Status(getattr(grpc.StatusCode, error.code), error.message,
                                      ((DETAILS_KEY, status.SerializeToString()),)))


def _typed(name: str, error: Exception) -> EdgeforgeError:
    """The error a handler's exception becomes on the wire: typed errors as they are, a full disk
    (ENOSPC/EDQUOT, e.g. in a worker's scratch space) as RESOURCE_EXHAUSTED STORAGE_FULL, anything
    else (a bug) as INTERNAL; the server keeps serving either way."""
    if isinstance(error, EdgeforgeError):
        log.info("%s -> %s %s: %s", name, error.code, error.reason, error.message)
        return error
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        log.warning("%s: disk full: %s", name, error)
        where = f" writing {error.filename}" if error.filename else ""
        return ResourceExhausted(f"no space left on the device{where} ({error.strerror}); free space and retry",
                                 reason="STORAGE_FULL")
    log.exception("%s failed", name, exc_info=error)
    return EdgeforgeError(f"internal error in {name}: {type(error).__name__}: {error}")


def rpc(handler):
    """Decorates a servicer method: typed errors become rich statuses; surprises become INTERNAL."""
    @functools.wraps(handler)
    def wrapper(self, request, context):
        try:
            return handler(self, request, context)
        except Exception as error:
            _abort(context, _typed(handler.__name__, error))
    return wrapper


def rpc_stream(handler):
    """Like `rpc`, for handlers that return an iterator (server streaming)."""
    @functools.wraps(handler)
    def wrapper(self, request, context):
        try:
            yield from handler(self, request, context)
        except Exception as error:
            _abort(context, _typed(handler.__name__, error))
    return wrapper


def error_details(error: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """(ErrorInfo.reason, ErrorInfo.metadata) carried by a failed call, or ("", {})."""
    for key, value in (error.trailing_metadata() or ()):
        if key == DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason, dict(info.metadata)
    return "", {}


def from_rpc_error(error: grpc.RpcError) -> EdgeforgeError:
    """Rebuilds a typed error from a failed call (so one service can re-raise another's error)."""
    from shared import errors
    reason, metadata = error_details(error)
    classes = {cls.code: cls for cls in (errors.InvalidArgument, errors.NotFound, errors.AlreadyExists,
                                         errors.FailedPrecondition, errors.OutOfRange, errors.ResourceExhausted,
                                         errors.DataLoss, errors.Unavailable, errors.Cancelled)}
    code = error.code().name if error.code() else "UNKNOWN"
    cls = classes.get(code, errors.Internal)
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        cls = errors.Unavailable
    return cls(error.details() or code, reason=reason or None, metadata=metadata)


def status_of(error: EdgeforgeError) -> status_pb2.Status:
    return to_status_proto(error)
