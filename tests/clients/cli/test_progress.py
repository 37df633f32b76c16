"""Progress on stderr: transfers show bytes, rate and time left; off a TTY one line per change; --quiet
draws nothing."""
from __future__ import annotations

import io

from clients.cli import progress
from edgeforge.v1 import coordinator_pb2


class Clock:
    """A clock the test advances."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_units():
    assert progress.human_bytes(512) == "512 B"
    assert progress.human_bytes(3 << 20) == "3.0 MiB"
    assert progress.human_bytes(3 << 30) == "3.00 GiB"
    assert [progress.human_duration(s) for s in (42, 185, 4320)] == ["42s", "3m05s", "1h12m"]


def test_transfer_shows_bytes_rate_and_eta_once_per_quarter_off_a_tty():
    stream, clock = io.StringIO(), Clock()
    transfer = progress.Transfer(progress.Bar(stream), "download", clock)
    total = 100 << 20
    for done_mib in range(0, 101, 5):                   # 10 MiB/s
        transfer(done_mib << 20, total)
        clock.now += 0.5
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5                               # 0, 25, 50, 75, 100%
    assert "25.0 MiB/100.0 MiB" in lines[1] and "10.0 MiB/s" in lines[1] and "ETA 8s" in lines[1]      # 75 MiB at 10 MiB/s
    assert lines[-1].startswith("download") and "100.0%" in lines[-1] and "ETA" not in lines[-1]


def test_resumed_or_deduplicated_transfer_counts_only_new_bytes():
    stream, clock = io.StringIO(), Clock()
    transfer = progress.Transfer(progress.Bar(stream), "upload model", clock)
    transfer(1 << 30, 1 << 30)                           # already on the server: no rate to speak of
    assert "/s" not in stream.getvalue() and "1.00 GiB/1.00 GiB" in stream.getvalue()


def test_build_progress_names_the_stage_and_message():
    stream = io.StringIO()
    report = progress.build_progress(progress.Bar(stream))
    status = coordinator_pb2.BuildProgress(stage=coordinator_pb2.BUILD_STAGE_BENCHMARK, percent=82.5,
                                           message="measured 2 of 4 (target, candidate) pairs")
    report(status)
    report(status)                                       # unchanged: no second line
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("benchmark") and "82.5%" in line and line.endswith("measured 2 of 4 (target, candidate) pairs")


def test_quiet_draws_nothing():
    stream = io.StringIO()
    bar = progress.Bar(stream, quiet=True)
    progress.upload_progress(bar)("model", 5, 10)
    bar.println("a live row")
    bar.done()
    assert stream.getvalue() == ""
