"""What every fuzz harness shares: the contract and the atheris entry point.

Contract: a harness's `check(data)` feeds bytes to a parser. Raising a shared.errors.EdgeforgeError
(or an exception type the harness names as its parser's documented rejection) is the parser saying
no, which is fine; any other exception is a crash, and a hang (libFuzzer's -timeout) is one too.
"""
from __future__ import annotations

import sys
from typing import Callable

from shared.errors import EdgeforgeError


def one_input(check: Callable[[bytes], None], expected: tuple[type[BaseException], ...] = ()) -> Callable[[bytes], None]:
    """The TestOneInput of a harness: expected rejections are swallowed, anything else propagates."""
    def test_one_input(data: bytes) -> None:
        try:
            check(data)
        except (EdgeforgeError, *expected):
            pass
    return test_one_input


def main(check: Callable[[bytes], None], expected: tuple[type[BaseException], ...] = ()) -> None:
    import atheris
    atheris.Setup(sys.argv, one_input(check, expected))
    atheris.Fuzz()
