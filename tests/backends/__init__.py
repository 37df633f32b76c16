"""Real servers the storage tests run against (PostgreSQL, S3 via weed mini), one per test session."""
from __future__ import annotations

import os
import time
from typing import Callable, Protocol, TypeVar

import pytest


class Server(Protocol):
    startup_s: float

    def start(self) -> None: ...
    def close(self) -> None: ...


S = TypeVar("S", bound=Server)


def start_for_session(make: Callable[[], S]) -> S:
    """`make()`'s server, started; its start-up time in `startup_s`. A missing binary skips the tests that need
    it on a developer's machine, but fails under CI=true, where `make setup` installs every one."""
    try:
        server = make()
    except FileNotFoundError as missing:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(missing))
    started = time.monotonic()
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    server.startup_s = time.monotonic() - started
    return server
