"""A two-node ONNX model (MatMul, Relu) that proves onnxruntime really runs in the ARM chroot.

    python smoke.py write DIR    # on the host, with the repository's venv (needs onnx)
    python smoke.py check DIR    # in the chroot (needs onnxruntime, ai_edge_litert)

`write` stores the model, an input and numpy's answer; `check` runs onnxruntime on the input,
compares with numpy's answer and prints the machine (aarch64 in the chroot).
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np


def write(out_dir: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3)).astype(np.float32)                    # (in, out)
    x = rng.standard_normal((2, 4)).astype(np.float32)                         # (batch, in)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "smoke",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weight, "weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9                       # readable by any onnxruntime from 1.16 on
    onnx.checker.check_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_dir / "smoke.onnx"))
    np.save(out_dir / "x.npy", x)
    np.save(out_dir / "expected.npy", np.maximum(x @ weight, 0))


def check(in_dir: Path) -> None:
    import ai_edge_litert.interpreter      # noqa: F401  (imported to prove it loads here)
    import onnxruntime as ort

    session = ort.InferenceSession(str(in_dir / "smoke.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(["y"], {"x": np.load(in_dir / "x.npy")})
    expected = np.load(in_dir / "expected.npy")
    error = float(np.abs(y - expected).max())
    print(f"{platform.machine()}: onnxruntime {ort.__version__} ran smoke.onnx, max |error| {error:.2e}")
    if error > 1e-5:
        sys.exit(f"onnxruntime disagrees with numpy by {error}")


if __name__ == "__main__":
    command, directory = sys.argv[1], Path(sys.argv[2])
    {"write": write, "check": check}[command](directory)
