"""Terminal progress: redrawn bars on a TTY, one line per change otherwise (CI logs stay readable)."""
from __future__ import annotations

import sys

from edgeforge.v1 import coordinator_pb2


class Bar:
    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width = stream, width
        self.tty = stream.isatty()
        self._last_line = ""
        self._last_key: tuple = ()

    def show(self, label: str, fraction: float, detail: str = "", key: object = None) -> None:
        """Draws the bar. Off a TTY a line is printed only when (label, key) changes; key defaults to detail."""
        fraction = min(max(fraction, 0.0), 1.0)
        filled = int(self.width * fraction)
        line = f"{label:<12} [{'#' * filled}{'.' * (self.width - filled)}] {100 * fraction:5.1f}% {detail}"
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(len(self._last_line)))
            self.stream.flush()
        elif (label, detail if key is None else key) != self._last_key:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_key = (label, detail if key is None else key)
        self._last_line = line

    def done(self) -> None:
        if self.tty and self._last_line:
            self.stream.write("\n")
        self._last_line = ""


def upload_progress(bar: Bar):
    def report(what: str, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        bar.show(f"upload {what}"[:12], fraction, f"{done / 1e6:.1f}/{total / 1e6:.1f} MB", key=int(fraction * 4))
        if done >= total:
            bar.done()
    return report


def build_progress(bar: Bar):
    def report(progress: coordinator_pb2.BuildProgress) -> None:
        stage = coordinator_pb2.BuildStage.Name(progress.stage).removeprefix("BUILD_STAGE_").lower()
        bar.show(stage, progress.percent / 100, progress.message)
    return report
