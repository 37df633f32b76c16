"""edgeforge_tests(): one py_test per tests/**/test_*.py file, run by pytest (bazel/pytest_main.py).

Each directory of tests/ holding test_*.py files is a Bazel package whose BUILD.bazel calls this macro,
so targets mirror the test tree (tests/shared/store/test_blobs.py is //tests/shared/store:test_blobs)
and a new test file is a new target without editing anything. A new test directory needs a BUILD.bazel
and an entry in TEST_PACKAGES; //bazel:layout_test fails until both exist.

Tags (select with --test_tag_filters):
    slow         whole files, or the `-m slow` half of a file (see partly_slow), taking minutes
    integration  tests/integration and tests/e2e: real servers and processes on loopback
    gpu, manual  tests/gpu: needs a CUDA device; `manual` keeps it out of //...

Tests run outside the sandbox ("no-sandbox"): they read the prepared model and text under
.edgeforge-assets in place (gigabytes; as declared inputs Bazel would hash or copy them for every test),
start real servers (PostgreSQL as the postgres user, `weed mini`, gRPC services on loopback) and keep
their scratch files in Bazel's per-test TEST_TMPDIR. Their declared inputs (sources, helpers, the
generated protos, pytest's configuration, the pinned requirements) still decide when a cached result is
reused; the assets are made by shared/assets.py, which every test depends on.
"""

# Every test directory (a Bazel package); //tests:support gathers their helper files.
TEST_PACKAGES = [
    "//tests/bad_inputs",
    "//tests/clients/agent",
    "//tests/clients/cli",
    "//tests/clients/python",
    "//tests/e2e",
    "//tests/fuzz",
    "//tests/gpu",
    "//tests/integration",
    "//tests/proto",
    "//tests/services/calibrator",
    "//tests/services/compressor",
    "//tests/services/compressor/prune",
    "//tests/services/compressor/quant",
    "//tests/services/compressor/train",
    "//tests/services/coordinator",
    "//tests/services/exporter",
    "//tests/shared",
    "//tests/shared/models",
    "//tests/shared/quant",
    "//tests/shared/store",
]

# What any test may import or read: the whole product, the generated protos, every test helper.
_DEPS = [
    "//clients/agent",
    "//clients/cli",
    "//clients/python",
    "//proto:edgeforge_v1",
    "//services/calibrator",
    "//services/compressor",
    "//services/coordinator",
    "//services/exporter",
    "//shared",
    "//tests:support",
]

_DATA = ["//:pytest_config"]

_MAIN = "//bazel:pytest_main.py"

_GENERATED = "//proto:edgeforge/v1/__init__.py"

def edgeforge_tests(slow = [], partly_slow = [], tags = [], data = []):
    """Defines the package's tests and its `support` target (its files other than test_*.py).

    Args:
      slow: test files whose every test is slow (module-level `pytestmark = pytest.mark.slow`, or known
        to take minutes): one target tagged "slow".
      partly_slow: test files with some `@pytest.mark.slow` tests: two targets, test_x running
        `-m "not slow"` and test_x_slow running `-m slow` (tagged "slow").
      tags: added to every target of the package.
      data: extra files the package's tests read (beyond the package's own).
    """
    tests = native.glob(["test_*.py"])
    for listed in slow + partly_slow:
        if listed not in tests:
            fail("%s is listed as slow but is not a test file of %s" % (listed, native.package_name()))
    support = native.glob(["**"], exclude = ["test_*.py", "BUILD.bazel", "**/__pycache__/**"])
    native.py_library(
        name = "support",
        srcs = [f for f in support if f.endswith(".py")],
        data = [f for f in support if not f.endswith(".py")] + data,
        visibility = ["//tests:__pkg__"],
    )
    for test in tests:
        name = test[:-len(".py")]
        if test in partly_slow:
            _pytest(name, test, ["-m", "'not slow'"], tags, "long")  # args are shell-tokenized
            _pytest(name + "_slow", test, ["-m", "slow"], tags + ["slow"], "eternal")
        elif test in slow:
            _pytest(name, test, [], tags + ["slow"], "eternal")
        else:
            _pytest(name, test, [], tags, "long")

def _pytest(name, test, pytest_args, tags, timeout):
    native.py_test(
        name = name,
        srcs = [_MAIN, test],
        main = _MAIN,
        args = ["$(rootpath %s)" % test, "$(rootpath %s)" % _GENERATED] + pytest_args,
        deps = _DEPS + [":support"],
        data = _DATA + [_GENERATED],
        python_version = "PY3",
        # large: 900 s, pytest's own per-test limit in pyproject.toml; timeout may extend it.
        size = "large",
        timeout = timeout,
        tags = tags + ["no-sandbox"],
    )
