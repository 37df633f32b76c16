"""Runs the `edgeforge` command as a real process: the helpers the CLI tests share."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def run_cli(*args: str, address: str = "127.0.0.1:1", token: str | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m clients.cli.main --address ADDRESS [--token T] ARGS` as a subprocess, with no token from the
    environment; returns the finished process (stdout, stderr as text)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFORGE_")}
    env.update(PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "clients.cli.main", "--address", address, *(["--token", token] if token else []),
               *args]
    return subprocess.run(command, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def json_error(process: subprocess.CompletedProcess) -> dict:
    """The one JSON object a --json command writes to stderr on failure; checks it is all stderr holds."""
    (line,) = process.stderr.strip().splitlines()
    error = json.loads(line)
    assert error["exit_code"] == process.returncode
    assert set(error["error"]) == {"code", "reason", "field", "message"}
    return error
