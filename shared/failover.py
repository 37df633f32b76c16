"""Several addresses for one service: parsing `--flag a:1,b:2`, telling a dead server from a real error,
and calling the next server of an ordered list when the current one is gone.

A transport failure is UNAVAILABLE (nothing listens, the connection was refused or reset) or a
connection torn down under a running call, which gRPC can also report as UNKNOWN or INTERNAL with a
transport message. Only those messages count: a server's own INTERNAL error (a bug) is not a reason
to ask another server, which would fail the same way.

`Failover` is for clients of interchangeable servers that keep no per-client state between calls
(coordinators sharing one database and one blob store): calls stick to one server until it fails,
then move to the next and stay there, so a healthy cluster sees one connection per client.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Callable, Generic, Iterator, Sequence, TypeVar

import grpc

log = logging.getLogger(__name__)
TRANSPORT_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
TRANSPORT_DETAILS = ("connection reset", "socket closed", "stream removed", "broken pipe", "failed to connect",
                     "connection refused", "goaway")
_HOST_PORT = re.compile(r"(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")
T = TypeVar("T")
R = TypeVar("R")


def transport_failure(error: grpc.RpcError) -> bool:
    """UNAVAILABLE (the server is down or restarting), or a connection reset under a running call."""
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return True
    details = (error.details() or "").lower()
    return error.code() in TRANSPORT_CODES and any(text in details for text in TRANSPORT_DETAILS)


def parse_addresses(text: str | Sequence[str], flag: str) -> list[str]:
    """`"a:1,b:2"` (or a list of such strings) -> ["a:1", "b:2"]: each HOST:PORT (IPv6 as [::1]:PORT, port
    1-65535) or unix:PATH, no duplicates. Raises ValueError naming `flag`, the bad entry and the fix."""
    entries = [text] if isinstance(text, str) else list(text)
    addresses = [part.strip() for entry in entries for part in entry.split(",")]
    if not addresses or any(not address for address in addresses):
        raise ValueError(f"{flag} needs one or more HOST:PORT addresses separated by commas, got {text!r}")
    for address in addresses:
        if address.startswith("unix:") and len(address) > len("unix:"):
            continue
        match = _HOST_PORT.fullmatch(address)
        if match is None:
            raise ValueError(f"{flag}: {address!r} is not HOST:PORT (e.g. 10.0.0.5:50051, [::1]:50051 or "
                             "unix:/path/to/socket)")
        if not 1 <= int(match.group(1)) <= 65535:
            raise ValueError(f"{flag}: the port of {address!r} must be 1-65535")
    duplicates = sorted({address for address in addresses if addresses.count(address) > 1})
    if duplicates:
        raise ValueError(f"{flag} names {', '.join(duplicates)} more than once; give each address once")
    return addresses


class Failover(Generic[T]):
    """An ordered list of interchangeable servers (their addresses and, per server, whatever the caller
    calls through: a stub, a channel). Thread-safe; the current server is shared by all threads."""

    def __init__(self, addresses: Sequence[str], targets: Sequence[T], what: str):
        if not addresses or len(addresses) != len(targets):
            raise ValueError("Failover needs one target per address, and at least one")
        self.addresses, self.targets, self.what = list(addresses), list(targets), what
        self._current = 0
        self._lock = threading.Lock()

    def rotation(self) -> Iterator[tuple[str, T]]:
        """Every server once, the current one first; `failed(address)` while iterating moves on for all."""
        with self._lock:
            start = self._current
        for step in range(len(self.targets)):
            index = (start + step) % len(self.targets)
            yield self.addresses[index], self.targets[index]

    def failed(self, address: str, error: grpc.RpcError) -> None:
        """`address` failed with a transport error: later calls start at the server after it."""
        index = self.addresses.index(address)
        with self._lock:
            if self._current == index and len(self.targets) > 1:
                self._current = (index + 1) % len(self.targets)
                log.warning("%s %s is unavailable (%s: %s); using %s", self.what, address, error.code().name,
                            error.details(), self.addresses[self._current])

    def call(self, function: Callable[[T], R]) -> R:
        """`function(target)` on the current server; on a transport failure, on the next, each at most once.
        Any other error, or the last server's transport failure, is raised as it is."""
        last: grpc.RpcError | None = None
        for address, target in self.rotation():
            try:
                return function(target)
            except grpc.RpcError as error:
                if not transport_failure(error):
                    raise
                self.failed(address, error)
                last = error
        assert last is not None
        raise last
