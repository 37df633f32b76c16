"""The edgeforge Python SDK (docs/SDK.md).

    from clients.python import Client, AsyncClient, ApiError

    with Client("127.0.0.1:50051") as client:
        result = client.build("build.yaml")
        print(result.passed, [(t.target, t.candidate_id, t.p90_ms) for t in result.targets])

Modules: `client` (the synchronous Client), `aio` (AsyncClient for asyncio), `results` (BuildResult,
TargetResult, Report), `errors` (ApiError and one subclass per status code), `spec` (the YAML build
spec), `transfer` (resumable uploads and downloads). The names below are imported on first use, so
`import clients.python.transfer` alone stays light.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.python.aio import AsyncClient
    from clients.python.client import Client, resolve_token
    from clients.python.errors import (AlreadyExists, ApiError, Cancelled, DeadlineExceeded, FailedPrecondition,
                                       InvalidArgument, NotFound, PermissionDenied, ResourceExhausted,
                                       Unauthenticated, Unavailable)
    from clients.python.results import BuildResult, BuildState, Quality, Report, TargetResult
    from clients.python.spec import SpecError, SpecFile
    from clients.python.transfer import TransferError

_EXPORTS = {
    "AsyncClient": "aio", "Client": "client", "resolve_token": "client",
    "ApiError": "errors", "InvalidArgument": "errors", "NotFound": "errors", "AlreadyExists": "errors",
    "PermissionDenied": "errors", "Unauthenticated": "errors", "FailedPrecondition": "errors",
    "ResourceExhausted": "errors", "Cancelled": "errors", "DeadlineExceeded": "errors", "Unavailable": "errors",
    "BuildResult": "results", "BuildState": "results", "Quality": "results", "Report": "results",
    "TargetResult": "results", "SpecError": "spec", "SpecFile": "spec", "TransferError": "transfer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clients.python' has no attribute {name!r}")
    return getattr(importlib.import_module(f"clients.python.{_EXPORTS[name]}"), name)
