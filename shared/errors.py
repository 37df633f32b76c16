"""Typed errors raised by edgeforge's pure cores.

Cores never import grpc. Each error carries a canonical status name, an ErrorInfo reason from
`edgeforge.v1.ErrorReason`, and optionally the offending field; `shared.grpc_status` maps them
onto the wire in one table.
"""
from __future__ import annotations


class EdgeforgeError(Exception):
    """Base class. `code` is a canonical gRPC status name; `reason` an ErrorReason value name."""

    code = "INTERNAL"
    reason = "ERROR_REASON_UNSPECIFIED"

    def __init__(self, message: str, *, reason: str | None = None, field: str | None = None,
                 metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.field = field
        self.metadata = dict(metadata or {})
        if field:
            self.metadata.setdefault("field", field)


class InvalidArgument(EdgeforgeError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_FIELD"


class NotFound(EdgeforgeError):
    code = "NOT_FOUND"
    reason = "RESOURCE_NOT_FOUND"


class AlreadyExists(EdgeforgeError):
    code = "ALREADY_EXISTS"
    reason = "REQUEST_ID_REUSED"


class FailedPrecondition(EdgeforgeError):
    code = "FAILED_PRECONDITION"
    reason = "UNSUPPORTED_OP"


class OutOfRange(EdgeforgeError):
    code = "OUT_OF_RANGE"
    reason = "UPLOAD_OFFSET_MISMATCH"


class ResourceExhausted(EdgeforgeError):
    code = "RESOURCE_EXHAUSTED"
    reason = "TOO_LARGE"


class DataLoss(EdgeforgeError):
    code = "DATA_LOSS"
    reason = "STORED_DIGEST_MISMATCH"


class Unavailable(EdgeforgeError):
    code = "UNAVAILABLE"
    reason = "DEPENDENCY_FAILED"


class Cancelled(EdgeforgeError):
    code = "CANCELLED"
    reason = "ERROR_REASON_UNSPECIFIED"


class Internal(EdgeforgeError):
    code = "INTERNAL"


class Unauthenticated(EdgeforgeError):
    code = "UNAUTHENTICATED"
    reason = "INVALID_TOKEN"


class PermissionDenied(EdgeforgeError):
    code = "PERMISSION_DENIED"
    reason = "WRONG_ROLE"
