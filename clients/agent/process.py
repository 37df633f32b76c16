"""Child processes the agent waits on — a measurement, an adb command — stopped at once when their
lease is cancelled or they run past their time limit."""
from __future__ import annotations

import subprocess
import threading
import time


class Interrupted(Exception):
    """The child was killed: the message says why ("cancelled" or "timed out after N s")."""


def run(command: list[str], *, timeout_s: float, cancelled: threading.Event | None = None,
        text: bool = False) -> subprocess.CompletedProcess:
    """Runs `command` (stdin closed, stdout and stderr captured), checking `cancelled` every 0.2 s."""
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=text, errors="replace" if text else None)
    started = time.monotonic()
    while True:
        try:
            stdout, stderr = child.communicate(timeout=0.2)
            return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            stop = cancelled is not None and cancelled.is_set()
            if stop or time.monotonic() - started > timeout_s:
                child.kill()
                child.communicate()
                raise Interrupted("cancelled" if stop else f"timed out after {timeout_s:.0f} s") from None
