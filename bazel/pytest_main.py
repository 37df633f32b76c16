"""Runs one test file with pytest for a py_test made by bazel/pytest.bzl, as `make test` would run it.

    pytest_main.py TEST_FILE GENERATED_INIT [PYTEST ARGS...]

TEST_FILE and GENERATED_INIT are runfiles paths (tests/shared/store/test_blobs.py,
proto/edgeforge/v1/__init__.py). The test runs in the checkout itself: its runfiles entry is a symlink
into the source tree, which locates the checkout wherever it was cloned, and the prepared assets, the
repository's conftest.py files and pyproject.toml are used in place. Two things differ from `make test`:

- edgeforge.v1 is the code Bazel generated from proto/ (py_proto_library), never the committed gen/:
  EDGEFORGE_PROTO_PATH tells tests/conftest.py where it is, PYTHONPATH hands it to the processes tests
  start, and the run fails if edgeforge.v1 was imported from anywhere else.
- pytest's scratch files (--basetemp) and cache stay in Bazel's per-test TEST_TMPDIR, and results go to
  the JUnit XML file Bazel reads (XML_OUTPUT_FILE).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def locate(runfiles: Path, test_file: str, generated_init: str) -> tuple[Path, Path, Path]:
    """(the test file in the checkout, the checkout, the import root of the generated protos)."""
    source = (runfiles / test_file).resolve()
    checkout = source.parents[len(Path(test_file).parts) - 1]
    if not (checkout / "WORKSPACE").is_file():
        raise SystemExit(f"{runfiles / test_file} resolves to {source}, which is not in a checkout of edgeforge "
                         f"(no WORKSPACE at {checkout}); run the tests with `bazel test` from the checkout")
    init = (runfiles / generated_init).resolve()
    if not init.is_file():
        raise SystemExit(f"the generated protos are missing ({runfiles / generated_init}): "
                         f"build //proto:edgeforge_v1 first")
    return source, checkout, init.parents[2]           # proto/edgeforge/v1/__init__.py -> proto


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    test_file, generated_init, *pytest_args = argv
    runfiles = Path(os.environ["TEST_SRCDIR"]) / os.environ["TEST_WORKSPACE"]
    source, checkout, proto_path = locate(runfiles, test_file, generated_init)

    os.environ["EDGEFORGE_PROTO_PATH"] = str(proto_path)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(proto_path), str(checkout)])
    sys.path[:0] = [str(proto_path), str(checkout)]
    os.chdir(checkout)

    import pytest
    scratch = Path(os.environ["TEST_TMPDIR"])
    args = [str(source), "-q", f"--basetemp={scratch / 'pytest'}",
            "-o", f"cache_dir={scratch / 'pytest-cache'}",
            "-o", "pythonpath=.",                      # pyproject.toml adds gen/ too; Bazel's protos replace it
            *pytest_args]
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
    code = pytest.main(args)

    generated = sys.modules.get("edgeforge.v1")
    if generated is not None:
        if not Path(generated.__file__).resolve().is_relative_to(proto_path):
            print(f"edgeforge.v1 was imported from {generated.__file__}, not from the code Bazel generated in "
                  f"{proto_path}: something put gen/ first on sys.path", file=sys.stderr)
            return 1
        print(f"edgeforge.v1 imported from {Path(generated.__file__).parent}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
