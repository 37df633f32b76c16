"""The shape of one bad-input case: which RPC, the bad request (or the bad file behind it), and what the
server must answer. Adding a case is one `Case(...)` entry in a cases_*.py table."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

# grpc metadata for the call; ADMIN (the default) is the corpus's admin token on its authenticated channel.
ADMIN = "admin"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    rpc: str                         # "Service.Method", e.g. "ArtifactStore.CreateUpload"
    request: Any                     # a request message (a list for client streaming), or f(env, prepared) -> one
    code: str                        # the exact canonical status, e.g. "INVALID_ARGUMENT"
    message: str                     # regex searched in the status message: names the field/tensor/limit
    prepare: Callable | None = None  # f(env) -> prepared: uploads the bad file etc., before the store snapshot
    check: Callable | None = None    # f(env, prepared): more assertions after the call (e.g. upload not committed)
    metadata: Any = ADMIN            # ADMIN, or f(env) -> metadata tuple sent on a channel without a token
    finding: str = ""                # a known gap in a file this corpus does not own: strict xfail with the reason
    hazard: str = ""                 # a known gap that would hang or exhaust the shared server: not run (skip, reason)


def request_of(case: Case, env, prepared) -> Any:
    return case.request(env, prepared) if callable(case.request) else case.request
