"""The bounded fuzz run inside `make test`, and the replay of every crash the fuzzers ever found.

Each harness (tests/fuzz/fuzz_<target>.py) runs as its own process for FUZZ_SECONDS (default 20)
from its seed corpus (tests/fuzz/corpus/<target>/, read-only: new inputs go to a temporary
directory); exit 0 means no crash, no hang (-timeout) and no memory blow-up (-rss_limit_mb).
`make fuzz` runs the same harnesses for longer. Inputs that once crashed a parser live in
tests/fuzz/regressions/<target>/ and must now be rejected cleanly (or accepted).
"""
from __future__ import annotations

import importlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TARGETS = ("safetensors", "gguf", "spec")
SECONDS = int(os.environ.get("FUZZ_SECONDS", "20"))


RSS_LIMIT_MB = 2048


def rss_limit_mb() -> int:
    """libFuzzer's -rss_limit_mb for a child of this process. libFuzzer reads its peak RSS from getrusage,
    and Linux carries a process's peak across fork and exec: a child of a pytest that has grown to 2.2 GB
    (late in `make test`) starts out "using" 2.2 GB. The limit is 2 GiB on top of what it inherits."""
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024          # Linux: KiB
    return RSS_LIMIT_MB + inherited_mb


@pytest.mark.parametrize("target", TARGETS)
def test_a_bounded_fuzz_run_finds_no_crash(target, tmp_path):
    (tmp_path / "corpus").mkdir()
    command = [sys.executable, "-m", f"tests.fuzz.fuzz_{target}", f"-max_total_time={SECONDS}",
               f"-rss_limit_mb={rss_limit_mb()}", "-timeout=10", f"-artifact_prefix={tmp_path}/",
               "-print_final_stats=1",
               str(tmp_path / "corpus"), str(HERE / "corpus" / target)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    tail = "\n".join(line for line in run.stderr.splitlines() if not line.startswith("INFO: Instrumenting"))[-4000:]
    assert run.returncode == 0, f"fuzz_{target} exited {run.returncode}; crash inputs in {tmp_path}:\n{tail}"
    assert "Done" in run.stderr, tail


def _cases(directory: str) -> list[Path]:
    return sorted(p for target in TARGETS for p in (HERE / directory / target).glob("*") if p.is_file())


@pytest.mark.parametrize("path", _cases("regressions") + _cases("corpus"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_saved_inputs_replay_without_a_crash(path):
    """Every regression and seed goes through the harness's check: only expected rejections."""
    module = importlib.import_module(f"tests.fuzz.fuzz_{path.parent.name}")
    from tests.fuzz.harness import one_input
    one_input(module.check, getattr(module, "EXPECTED", ()))(path.read_bytes())
