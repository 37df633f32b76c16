"""Terminal progress: redrawn bars on a TTY, one line per change otherwise (CI logs stay readable).

Everything here writes to stderr (or the stream given), never stdout, so `--json` output stays clean.
Transfers show bytes done/total, the rate and the time left; builds show the stage, percent and the
coordinator's one-line message.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

from edgeforge.v1 import coordinator_pb2


def human_bytes(size_bytes: float) -> str:
    """Binary units, as `ls -h` and nvidia-smi show them: 512 B, 3.4 KiB, 120.0 MiB, 1.50 GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.2f} {unit}" if unit == "GiB" else f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes:.0f} B"


def human_duration(seconds: float) -> str:
    """Time left, coarse: 42s, 3m05s, 1h12m."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Bar:
    def __init__(self, stream=None, width: int = 30, *, quiet: bool = False):
        self.stream, self.width, self.quiet = stream if stream is not None else sys.stderr, width, quiet
        self.tty = self.stream.isatty()
        self._last_line = ""
        self._last_key: tuple = ()

    def show(self, label: str, fraction: float, detail: str = "", key: object = None) -> None:
        """Draws the bar. Off a TTY a line is printed only when (label, key) changes; key defaults to detail."""
        if self.quiet:
            return
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
        self._last_line = line[:160]

    def println(self, text: str) -> None:
        """A permanent line above the bar (a live table row): the bar is cleared, the line printed, the bar
        redrawn below it on a TTY."""
        if self.quiet:
            return
        if self.tty and self._last_line:
            self.stream.write("\r" + " " * len(self._last_line) + "\r" + text + "\n" + self._last_line)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self._last_line and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()
        self._last_line = ""


class Transfer:
    """Bytes, rate and time left of one upload or download; the rate is averaged over the transfer so far.
    Off a TTY it reports at 0, 25, 50, 75 and 100% only."""

    def __init__(self, bar: Bar, label: str, clock: Callable[[], float] = time.monotonic):
        self.bar, self.label, self.clock = bar, label, clock
        self.started = clock()
        self.first_bytes: int | None = None      # the first report is the baseline (a resumed or deduplicated
                                                 # transfer starts part-way or done): the rate counts bytes after it

    def __call__(self, done: int, total: int) -> None:
        if self.first_bytes is None:
            self.first_bytes = done
        fraction = done / total if total else 1.0
        elapsed = self.clock() - self.started
        rate = (done - self.first_bytes) / elapsed if elapsed > 0 else 0.0
        detail = f"{human_bytes(done)}/{human_bytes(total)}"
        if rate > 0:
            detail += f"  {human_bytes(rate)}/s"
            if done < total:
                detail += f"  ETA {human_duration((total - done) / rate)}"
        self.bar.show(self.label, fraction, detail, key=int(fraction * 4))
        if done >= total:
            self.bar.done()


def upload_progress(bar: Bar):
    """For Client.create_build(on_upload=...): one Transfer per file ("model", "calibration", ...)."""
    transfers: dict[str, Transfer] = {}

    def report(what: str, done: int, total: int) -> None:
        transfers.setdefault(what, Transfer(bar, f"upload {what}"))(done, total)
    return report


def download_progress(bar: Bar) -> Transfer:
    """For Client.download(progress=...)."""
    return Transfer(bar, "download")


def stage_name(stage: int) -> str:
    return coordinator_pb2.BuildStage.Name(stage).removeprefix("BUILD_STAGE_").lower()


def build_progress(bar: Bar):
    def report(progress: coordinator_pb2.BuildProgress) -> None:
        bar.show(stage_name(progress.stage), progress.percent / 100, progress.message)
    return report
