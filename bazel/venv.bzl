"""The project's virtual environment (<workspace>/.venv, made by `make setup`) as an external repository.

Bazel never installs Python packages here: the venv already holds the pinned dependencies, so this rule
only points Bazel at it, wherever the repository is cloned (the path comes from the WORKSPACE file's own
location, never a hard-coded directory). It defines

    @venv//:toolchain        a py_runtime toolchain: py_binary/py_test run the venv's python3, not the system's
    @venv//:python           a wrapper script running the venv's python3 (for genrules: grpc_tools.protoc)
    @venv//:proto_includes   the google/* .proto files edgeforge's protos import, from the venv's
                             grpc_tools and googleapis-common-protos, laid out under include/ for protoc -I
"""

# googleapis-common-protos ships google/longrunning/operations.proto under the file name
# operations_proto.proto (its descriptor keeps the standard name); include/ exposes the standard path,
# as proto/generate.py does for `make gen`.
_LOCATE = """
import pathlib, grpc_tools
from google.longrunning import operations_proto_pb2
print(pathlib.Path(operations_proto_pb2.__file__).resolve().parent.parent.parent)
print(pathlib.Path(grpc_tools.__file__).resolve().parent / "_proto")
"""

_BUILD = """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

package(default_visibility = ["//visibility:public"])

py_runtime(
    name = "runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)

exports_files(["python"])

filegroup(
    name = "proto_includes",
    srcs = glob(["include/**/*.proto"]),
)
"""

def _venv_impl(repository_ctx):
    workspace = repository_ctx.path(Label("//:WORKSPACE")).dirname
    python = workspace.get_child(".venv").get_child("bin").get_child("python3")
    if not python.exists:
        fail("%s does not exist: run `make setup` first (it creates the project's virtual environment)" % python)
    located = repository_ctx.execute([python, "-c", _LOCATE])
    if located.return_code != 0:
        fail("the venv at %s lacks grpcio-tools or googleapis-common-protos (run `make setup`):\n%s" %
             (python, located.stderr))
    site_packages, well_known = located.stdout.strip().split("\n")
    google = repository_ctx.path(site_packages).get_child("google")
    repository_ctx.symlink(google.get_child("api"), "include/google/api")
    repository_ctx.symlink(google.get_child("rpc"), "include/google/rpc")
    repository_ctx.symlink(repository_ctx.path(well_known).get_child("google").get_child("protobuf"),
                           "include/google/protobuf")
    repository_ctx.symlink(google.get_child("longrunning").get_child("operations_proto.proto"),
                           "include/google/longrunning/operations.proto")
    repository_ctx.file("python", "#!/bin/sh\nexec '%s' \"$@\"\n" % python, executable = True)
    repository_ctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % repository_ctx.name)
    repository_ctx.file("BUILD.bazel", _BUILD.format(python = python))

venv = repository_rule(
    implementation = _venv_impl,
    local = True,  # re-evaluated when the Bazel server starts: a rebuilt venv is picked up
)
