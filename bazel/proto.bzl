"""py_proto_library(): Python protobuf and gRPC code generated from .proto files at build time.

A genrule runs grpc_tools.protoc from the project venv (@venv, bazel/venv.bzl) over `srcs`, writing
x_pb2.py, x_pb2.pyi and x_pb2_grpc.py beside each x.proto in the output tree, plus the packages'
__init__.py files, and a py_library exposes them with the package directory as import root: for
proto/edgeforge/v1/coordinator.proto, `from edgeforge.v1 import coordinator_pb2`. Tests under Bazel
import this code, never the committed gen/ directory (`make gen` writes that one with proto/generate.py).
"""

_INCLUDES = "@venv//:proto_includes"

_PROTOC = "@venv//:python"

def py_proto_library(name, srcs, visibility = None):
    """Args: srcs, .proto files below this package (their paths relative to it are their import paths)."""
    modules = []
    stubs = []
    packages = {}
    for src in srcs:
        if not src.endswith(".proto"):
            fail("py_proto_library %s: %s is not a .proto file" % (name, src))
        stem = src[:-len(".proto")]
        modules += [stem + "_pb2.py", stem + "_pb2_grpc.py"]
        stubs.append(stem + "_pb2.pyi")
        parts = src.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            packages["/".join(parts[:depth]) + "/__init__.py"] = True
    inits = sorted(packages.keys())
    includes = Label(_INCLUDES).workspace_root + "/include"
    native.genrule(
        name = name + "_generate",
        # The pins of grpcio-tools and protobuf decide what is generated: a change regenerates.
        srcs = srcs + [_INCLUDES, "//:requirements.txt"],
        outs = modules + stubs + inits,
        tools = [_PROTOC],
        cmd = " ".join([
            "$(execpath %s) -m grpc_tools.protoc" % _PROTOC,
            "-I%s" % (native.package_name() or "."),
            "-I" + includes,
            "--python_out=$(RULEDIR) --pyi_out=$(RULEDIR) --grpc_python_out=$(RULEDIR)",
        ] + ["$(execpath %s)" % src for src in srcs]) +
              "".join([" && touch $(RULEDIR)/" + init for init in inits]),
        visibility = visibility,
        message = "Generating Python protobuf/gRPC code for %d .proto files" % len(srcs),
    )
    native.py_library(
        name = name,
        srcs = modules + inits,
        data = stubs,  # type stubs, for mypy (tests/clients/python/test_typing.py)
        imports = ["."],
        visibility = visibility,
    )
