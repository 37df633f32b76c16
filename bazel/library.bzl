"""edgeforge_library(): a py_library of every Python file below a package directory, with its data files.

A package directory here is a top-level part of the product (shared/, services/compressor/, clients/cli/...):
its sub-packages (services/compressor/quant/...) belong to it, as they ship and change together.
"""

def edgeforge_library(deps = [], data_exclude = []):
    """Defines a py_library named after the package directory (//shared, //services/compressor).

    Args:
      deps: the other edgeforge libraries it imports at module level.
      data_exclude: non-Python files that are not part of the library (build leftovers).
    """
    name = native.package_name().split("/")[-1]
    native.py_library(
        name = name,
        srcs = native.glob(["**/*.py"]),
        data = native.glob(["**"], exclude = ["**/*.py", "**/*.pyc", "BUILD.bazel"] + data_exclude),
        deps = deps,
        visibility = ["//visibility:public"],
    )
