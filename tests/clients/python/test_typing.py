"""The SDK is typed: mypy --strict (pyproject.toml [tool.mypy], which explains its two relaxations for the
generated gRPC stubs) passes over clients/python and docs/examples/ci_gate.py, and py.typed ships."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SDK = ["clients/python/__init__.py", "clients/python/client.py", "clients/python/aio.py",
       "clients/python/errors.py", "clients/python/results.py", "clients/python/transfer.py",
       "docs/examples/ci_gate.py"]


@pytest.mark.slow                                           # about a minute without mypy's cache
def test_mypy_strict_passes_over_the_sdk_and_the_ci_example(request):
    cache = request.config.cache.mkdir("mypy")              # under .pytest_cache: reruns take seconds
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), *SDK], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"Success: no issues found in {len(SDK)} source files")


def test_the_package_says_it_is_typed():
    assert (ROOT / "clients" / "python" / "py.typed").is_file()
