"""Checks that the Bazel test targets still mirror tests/ (run by `bazel test //bazel:layout_test`).

- every directory of tests/ holding test_*.py files (tests/arm aside: make test-arm) has a BUILD.bazel
  and is listed in TEST_PACKAGES (bazel/pytest.bzl), and every listed package exists;
- every test file using `pytest.mark.slow` is listed as `slow` or `partly_slow` in its BUILD.bazel, and
  every listed file uses it: a slow test left out would run in the default `make bazel-test`.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

NOT_BAZEL = {"tests/arm"}          # needs root and a qemu chroot (make test-arm)


def test_packages(checkout: Path) -> set[str]:
    """The TEST_PACKAGES list of bazel/pytest.bzl (a Starlark list literal, which Python parses too)."""
    module = ast.parse((checkout / "bazel" / "pytest.bzl").read_text())
    for node in module.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "TEST_PACKAGES":
            return {label.removeprefix("//") for label in ast.literal_eval(node.value)}
    raise SystemExit("bazel/pytest.bzl has no TEST_PACKAGES list")


def slow_lists(build: Path) -> set[str]:
    """The files named by slow = [...] and partly_slow = [...] in a tests BUILD.bazel."""
    listed: set[str] = set()
    for node in ast.walk(ast.parse(build.read_text())):
        if isinstance(node, ast.keyword) and node.arg in ("slow", "partly_slow"):
            listed |= set(ast.literal_eval(node.value))
    return listed


def problems(checkout: Path) -> list[str]:
    found = []
    directories = {path.parent.relative_to(checkout).as_posix()
                   for path in (checkout / "tests").rglob("test_*.py") if "__pycache__" not in path.parts}
    directories -= NOT_BAZEL
    listed = test_packages(checkout)
    for directory in sorted(directories - listed):
        found.append(f"{directory} holds test files but is not in TEST_PACKAGES (bazel/pytest.bzl)")
    for package in sorted(listed - directories):
        found.append(f"TEST_PACKAGES lists //{package}, which holds no test_*.py files")
    for directory in sorted(directories):
        build = checkout / directory / "BUILD.bazel"
        if not build.is_file():
            found.append(f"{directory} holds test files but has no BUILD.bazel "
                         f"(load edgeforge_tests from //bazel:pytest.bzl)")
            continue
        slow = {path.name for path in (checkout / directory).glob("test_*.py")
                if "pytest.mark.slow" in path.read_text()}
        declared = slow_lists(build)
        for name in sorted(slow - declared):
            found.append(f"{directory}/{name} has slow tests: list it in slow or partly_slow in {directory}/BUILD.bazel")
        for name in sorted(declared - slow):
            found.append(f"{directory}/BUILD.bazel lists {name} as slow, but it has no pytest.mark.slow")
    return found


def main() -> int:
    checkout = Path(__file__).resolve().parents[1]    # the runfiles entry links into the checkout
    found = problems(checkout)
    for problem in found:
        print(problem, file=sys.stderr)
    print(f"checked the Bazel test layout of {checkout}: {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
