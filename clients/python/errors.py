"""Typed errors of the edgeforge SDK: one class per canonical gRPC status code.

Every failed call made through `Client` or `AsyncClient` raises an `ApiError` subclass carrying the
status code, the server's message, and the `google.rpc.ErrorInfo` the server attached (its `reason`
in UPPER_SNAKE, e.g. "INVALID_FIELD", and its metadata, where "field" names the offending request
field):

    try:
        client.get_build("builds/nope")
    except NotFound as error:
        print(error.reason, error.field, error.message)

`ApiError` subclasses `grpc.RpcError` and keeps its call interface (`code()`, `details()`,
`trailing_metadata()`), so code written against plain gRPC errors keeps working unchanged.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Awaitable, Callable, ClassVar, Iterable, Iterator, ParamSpec, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from shared.grpc_status import error_details

Metadata = tuple[tuple[str, str | bytes], ...]
P = ParamSpec("P")
T = TypeVar("T")


class ApiError(grpc.RpcError):
    """A call the coordinator (or the network) refused. `code()` and `details()` behave like grpc's."""

    status: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, reason: str = "",
                 metadata: dict[str, str] | None = None, trailing_metadata: Metadata = (),
                 debug_error_string: str = ""):
        super().__init__(message)
        self.message = message
        self.reason = reason                          # ErrorInfo.reason, e.g. "INVALID_FIELD"; "" when none
        self.metadata = dict(metadata or {})          # ErrorInfo.metadata
        self._code = code or self.status
        self._trailing_metadata = trailing_metadata
        self._debug_error_string = debug_error_string

    @property
    def field(self) -> str | None:
        """The request field the server blamed (ErrorInfo.metadata["field"]), e.g. "constraints.max_size_bytes"."""
        return self.metadata.get("field")

    def code(self) -> grpc.StatusCode:
        """The canonical status code, as `grpc.RpcError.code()` returns it."""
        return self._code

    def details(self) -> str:
        """The server's message, as `grpc.RpcError.details()` returns it."""
        return self.message

    # grpc-stubs says _Metadatum objects; grpc's calls return (key, value) pairs, as this does.
    def trailing_metadata(self) -> Metadata:  # type: ignore[override]
        """The call's trailing metadata, rich status details included (`shared.grpc_status.error_details`
        reads them)."""
        return self._trailing_metadata

    def initial_metadata(self) -> Metadata:
        return ()

    def debug_error_string(self) -> str:
        return self._debug_error_string

    def __str__(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        field = f" [{self.field}]" if self.field else ""
        return f"{self._code.name}{reason}{field}: {self.message}"


class InvalidArgument(ApiError):
    """A request field is missing, unknown or out of range; `field` names it."""
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ApiError):
    """No such build, operation, artifact, device or token."""
    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ApiError):
    """A request_id was reused with a different request body (reason REQUEST_ID_REUSED)."""
    status = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(ApiError):
    """The token is valid but its role may not make this call (a builder creating tokens, say)."""
    status = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ApiError):
    """No token, or an unknown or revoked one."""
    status = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(ApiError):
    """The system is not in a state to do this (no matching device, an operation still running)."""
    status = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ApiError):
    """Too large, too many, or the coordinator's disk is full (reason STORAGE_FULL)."""
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class OutOfRange(ApiError):
    """An upload offset or page past the end."""
    status = grpc.StatusCode.OUT_OF_RANGE


class Cancelled(ApiError):
    """The call or the build was cancelled."""
    status = grpc.StatusCode.CANCELLED


class Aborted(ApiError):
    """A concurrent change got in the way; retrying is safe."""
    status = grpc.StatusCode.ABORTED


class DeadlineExceeded(ApiError):
    """The call (or `build(timeout=)`) ran out of time; a build keeps running on the coordinator."""
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ApiError):
    """The coordinator could not be reached (down, wrong address, TLS mismatch); retrying may help."""
    status = grpc.StatusCode.UNAVAILABLE


class Unimplemented(ApiError):
    """The server does not offer this call (an older coordinator)."""
    status = grpc.StatusCode.UNIMPLEMENTED


class DataLoss(ApiError):
    """Stored bytes no longer match their digest."""
    status = grpc.StatusCode.DATA_LOSS


class Internal(ApiError):
    """A bug on the server; its log has the traceback."""
    status = grpc.StatusCode.INTERNAL


_CLASSES: dict[grpc.StatusCode, type[ApiError]] = {
    cls.status: cls for cls in (InvalidArgument, NotFound, AlreadyExists, PermissionDenied, Unauthenticated,
                                FailedPrecondition, ResourceExhausted, OutOfRange, Cancelled, Aborted,
                                DeadlineExceeded, Unavailable, Unimplemented, DataLoss, Internal)}


def from_rpc_error(error: grpc.RpcError) -> ApiError:
    """The typed error for a failed call (sync or grpc.aio), with its ErrorInfo reason and metadata."""
    if isinstance(error, ApiError):
        return error
    code = _call(error, "code")            # a bare grpc.RpcError (a custom channel's) has no call methods
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    trailing: Metadata = tuple((key, value) for key, value in (_call(error, "trailing_metadata") or ()))
    reason, metadata = error_details(error) if trailing else ("", {})
    return _CLASSES.get(code, ApiError)(_call(error, "details") or code.name, code=code, reason=reason,
                                         metadata=metadata, trailing_metadata=trailing,
                                         debug_error_string=_call(error, "debug_error_string") or "")


def from_status(code: int, message: str, details: Iterable[any_pb2.Any] = ()) -> ApiError:
    """The typed error for a `google.rpc.Status` (an operation's or a build's `error`)."""
    status_code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    reason, metadata = "", {}
    for detail in details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
    return _CLASSES.get(status_code, ApiError)(message or status_code.name, code=status_code, reason=reason,
                                                metadata=metadata)


def _call(error: grpc.RpcError, method: str) -> Any:
    """`error.method()` when the error has it (a bare RpcError from a custom channel may not)."""
    bound = getattr(error, method, None)
    return bound() if callable(bound) else None


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Re-raises a `grpc.RpcError` from the block as its typed `ApiError` (the original as its cause)."""
    try:
        yield
    except ApiError:
        raise
    except grpc.RpcError as error:
        raise from_rpc_error(error) from error


def typed_errors(method: Callable[P, T]) -> Callable[P, T]:
    """Decorates a synchronous call: gRPC failures become `ApiError` subclasses."""
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with translated():
            return method(*args, **kwargs)
    return wrapper


def typed_errors_async(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Decorates a coroutine: gRPC failures (grpc.aio.AioRpcError) become `ApiError` subclasses."""
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with translated():
            return await method(*args, **kwargs)
    return wrapper
