"""Reading a Core ML `.mlpackage` back on any OS: what it computes with, checked without running it.

Core ML runs models only on Apple platforms ("Model prediction is only supported on macOS"), so on
Linux an exported package is validated by reading it: the MIL program (coremltools' protobuf → MIL
loader, the weights read from `Data/com.apple.CoreML/weights/weight.bin`), its op types, how each
weight is stored (float16/32 constants or iOS18 `constexpr_*` ops with int4/int8/uint1/… data), the
weight file's size, the inputs and outputs, and every compressed weight decoded twice — by the numpy
twins below, written from the MIL op definitions (iOS18 `compression.py`), and by coremltools' own
decompression — which must agree exactly. Weights an exporter carried are compared with ours value
for value (`carried`).
"""
from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Mapping

import numpy as np

from services.exporter.formats.coreml_weights import BlockwiseWeight, op_name
from shared.errors import FailedPrecondition

# (op, input) pairs that take a weight: what counts as one in the record (biases, norms, tables do not)
WEIGHT_INPUTS = {("linear", "weight"), ("conv", "weight"), ("conv_transpose", "weight"), ("matmul", "x"),
                 ("matmul", "y"), ("gather", "x")}
SPEC_TARGETS = {6: "iOS15", 7: "iOS16", 8: "iOS17", 9: "iOS18"}
WEIGHTS_FILE = Path("Data/com.apple.CoreML/weights/weight.bin")


def read_program(path: Path):
    """(spec, MIL program) of a saved package, weights loaded; no Core ML runtime needed."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_to_pymil
    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as error:          # coremltools raises bare Exceptions for unreadable packages
        raise FailedPrecondition(f"coremltools could not read {path.name}: {error}",
                                 reason="VALIDATION_FAILED") from error
    if spec.WhichOneof("Type") != "mlProgram":
        raise FailedPrecondition(f"{path.name} is a {spec.WhichOneof('Type')} model, not an ML program",
                                 reason="VALIDATION_FAILED")
    program = milproto_to_pymil(spec, spec.specificationVersion, str(path / WEIGHTS_FILE.parent))
    return spec, program


# ------------------------------------------------------------------ numpy twins of the iOS18 ops

def _repeat_blocks(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    for axis, (full, small) in enumerate(zip(shape, values.shape)):
        if full != small:
            values = np.repeat(values, full // small, axis=axis)
    return values


def shift_scale(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """constexpr_blockwise_shift_scale: scale · (data − offset), one (scale, offset) per block."""
    values = data.astype(np.float32)
    if offset is not None:
        values = values - _repeat_blocks(offset.astype(np.float32), data.shape)
    return (values * _repeat_blocks(scale.astype(np.float32), data.shape)).astype(scale.dtype)


def lut_to_dense(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """constexpr_lut_to_dense, scalar palettes: lut has shape (*groups, 2^bits, 1) and element i of
    the output is lut[i // block][indices[i]] with block = indices.shape / groups."""
    if lut.shape[-1] != 1:
        raise FailedPrecondition("vector palettization (VECTOR_SIZE > 1) is not decoded", reason="VALIDATION_FAILED")
    groups = []
    for axis, (full, count) in enumerate(zip(indices.shape, lut.shape[:-2])):
        position = np.arange(full) // (full // count)
        groups.append(position.reshape([-1 if a == axis else 1 for a in range(indices.ndim)]))
    return lut[(*groups, indices.astype(np.int64), 0)]


def sparse_to_dense(nonzero: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """constexpr_sparse_to_dense: the mask's 1s, in row-major order, take the stored values."""
    dense = np.zeros(mask.shape, dtype=nonzero.dtype)
    dense[mask.astype(bool)] = nonzero
    return dense


def lut_to_sparse(mask: np.ndarray, nonzero_indices: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """constexpr_lut_to_sparse: palettized non-zeros → (mask, non-zero values); each index uses the
    palette of its dense position."""
    dense_indices = sparse_to_dense(nonzero_indices.astype(np.uint8), mask)
    return mask, lut_to_dense(dense_indices, lut)[mask.astype(bool)]


def sparse_shift_scale(mask: np.ndarray, nonzero: np.ndarray, scale: np.ndarray,
                       offset: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """constexpr_sparse_blockwise_shift_scale: quantized non-zeros → (mask, non-zero values)."""
    dense = sparse_to_dense(nonzero, mask)
    return mask, shift_scale(dense, scale, offset)[mask.astype(bool)]


def _twin(op, value) -> tuple[np.ndarray, ...]:
    """The outputs of a constexpr op, decoded by the twins; `value(var)` gives an input's value."""
    kind = op.op_type
    offset = value(op.offset) if getattr(op, "offset", None) is not None else None
    if kind == "constexpr_blockwise_shift_scale":
        return (shift_scale(value(op.data), value(op.scale), offset),)
    if kind == "constexpr_lut_to_dense":
        return (lut_to_dense(value(op.indices), value(op.lut)),)
    if kind == "constexpr_sparse_to_dense":
        return (sparse_to_dense(value(op.nonzero_data), value(op.mask)),)
    if kind == "constexpr_lut_to_sparse":
        return lut_to_sparse(value(op.indices_mask), value(op.indices_nonzero_data), value(op.lut))
    if kind == "constexpr_sparse_blockwise_shift_scale":
        return sparse_shift_scale(value(op.data_mask), value(op.nonzero_data), value(op.scale), offset)
    raise FailedPrecondition(f"no decoder for {kind}", reason="VALIDATION_FAILED")


# ------------------------------------------------------------------ the record

def _storage(var) -> str:
    from coremltools.converters.mil.mil import types
    return types.builtin_to_string(var.dtype)


def _is_weight(var) -> bool:
    """A tensor used as the weight of a linear or convolution, a matmul operand or a gather's table."""
    return any((child.op_type, name) in WEIGHT_INPUTS
               for child in var.child_ops for name, value in child.inputs.items() if value is var)


def _features(features) -> list[dict]:
    from coremltools.proto import FeatureTypes_pb2
    out = []
    for feature in features:
        array = feature.type.multiArrayType
        out.append({"name": feature.name,
                    "dtype": FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType).lower(),
                    "shape": list(array.shape),
                    "shape_range": [[r.lowerBound, r.upperBound] for r in array.shapeRange.sizeRanges]})
    return out


@dataclasses.dataclass
class _Weight:
    """One weight tensor the program computes with: a float constant, or the end of a constexpr chain."""
    name: str                       # the MIL variable
    dense: np.ndarray               # its value, decoded by the numpy twins
    ops: list[str]                  # the constexpr chain, [] for a plain constant
    storage: list[str]              # dtypes stored: ["fp16"], ["int4", "fp16"], ["uint1", "uint4", "fp16"], …
    stored_bytes: float


def _read_weights(function) -> tuple[list[_Weight], dict[str, np.ndarray], float]:
    """(weights, every constexpr output decoded by the twins, max |twin − coremltools| over them)."""
    decoded: dict[str, np.ndarray] = {}
    chains: dict[str, list] = {}                                      # var name -> constexpr ops producing it
    weights: list[_Weight] = []
    decode_diff = 0.0

    def value(var) -> np.ndarray:
        return decoded[var.name] if var.name in decoded else var.val

    for op in function.operations:
        if op.op_type == "const":
            var = op.outputs[0]
            if isinstance(var.val, np.ndarray) and var.val.dtype.kind == "f" and _is_weight(var):
                weights.append(_Weight(var.name, var.val, [], [_storage(var)], var.val.nbytes))
            continue
        if not op.op_type.startswith("constexpr_"):
            continue
        theirs = op.materialized_val_inference()
        theirs = theirs if isinstance(theirs, tuple) else (theirs,)
        for var, mine, reference in zip(op.outputs, _twin(op, value), theirs):
            if mine.shape != np.shape(reference):
                raise FailedPrecondition(f"{op.name}: decoded shape {mine.shape}, coremltools {np.shape(reference)}",
                                         reason="VALIDATION_FAILED")
            if mine.dtype.kind == "f":
                decode_diff = max(decode_diff, float(np.abs(mine.astype(np.float64) - reference).max(initial=0)))
            elif not np.array_equal(mine, reference):
                decode_diff = float("inf")
            decoded[var.name] = mine
        chain = list(dict.fromkeys([o for var in op.inputs.values() for o in chains.get(var.name, [])] + [op]))
        for var in op.outputs:
            chains[var.name] = chain
        out = op.outputs[-1]
        if _is_weight(out):                                                       # the dense weight
            stored = [v for o in chain for v in o.inputs.values()
                      if v.op is not None and v.op.op_type == "const" and len(v.shape) > 0]
            weights.append(_Weight(out.name, decoded[out.name], [o.op_type for o in chain],
                                   [_storage(v) for v in stored],
                                   sum(int(np.prod(v.shape)) * v.dtype.get_bitwidth() / 8 for v in stored)))
    return weights, decoded, decode_diff


def dense_weights(path: Path) -> dict[str, np.ndarray]:
    """Every weight of a package as the float tensor Core ML computes with, by MIL variable name (a
    parameter `a.b.weight` appears as `…a_b_weight…`)."""
    _, program = read_program(path)
    weights, _, _ = _read_weights(program.functions["main"])
    return {w.name: w.dense for w in weights}


def _infinite_multipliers(function) -> int:
    """`mul` ops multiplying by a constant holding ±inf: 0·inf is NaN at run time."""
    count = 0
    for op in function.operations:
        if op.op_type == "mul":
            values = [v.val for v in (op.x, op.y) if v.op is not None and v.op.op_type == "const"]
            count += any(np.isinf(np.asarray(v, dtype=np.float64)).any() for v in values if v is not None)
    return count


def validate_package(path: Path, carried: Mapping[str, BlockwiseWeight] | None = None) -> dict:
    """What the package holds and whether its compressed weights decode as they should.

    Returns plain values (the exporter's fidelity record): op counts, inputs/outputs, the weight file's
    bytes against a float16 copy of the same weights, how weights are stored, the largest difference
    between our numpy decoding and coremltools' (0.0 when the format is read as written), and with
    `carried` (our weights by name) whether the stored data, scales, offsets and dense values equal ours."""
    spec, program = read_program(path)
    function = program.functions["main"]
    weights, decoded, decode_diff = _read_weights(function)
    elements = sum(w.dense.size for w in weights)
    stored = sum(w.stored_bytes for w in weights)
    weight_file = path / WEIGHTS_FILE
    size = weight_file.stat().st_size if weight_file.is_file() else 0
    sparse = [w.dense.reshape(-1) == 0 for w in weights if any("sparse" in kind for kind in w.ops)]
    record = {
        "format": "mlprogram",
        "specification_version": spec.specificationVersion,
        "deployment_target": SPEC_TARGETS.get(spec.specificationVersion, f"spec{spec.specificationVersion}"),
        "inputs": _features(spec.description.input),
        "outputs": _features(spec.description.output),
        "ops": dict(sorted(collections.Counter(op.op_type for op in function.operations).items())),
        "weight_file_bytes": size,                   # every constant: weights, biases, norms, tables
        "weights": len(weights),
        "weight_elements": elements,
        "float16_bytes": 2 * elements,               # the weights alone, stored as float16 / float32
        "float32_bytes": 4 * elements,
        "size_vs_float16": size / (2 * elements) if elements else 0.0,
        "bits_per_weight": 8 * stored / elements if elements else 0.0,
        "compressed_weights": dict(collections.Counter("+".join(w.ops) for w in weights if w.ops)),
        "storage": dict(collections.Counter("+".join(w.storage) for w in weights)),
        "decode_max_abs_diff": decode_diff,
        "sparsity": float(np.mean(np.concatenate(sparse))) if sparse else 0.0,
        "infinite_multipliers": _infinite_multipliers(function),
    }
    if carried is not None:
        record["carried"] = _compare_carried(function, decoded, carried)
    return record


def _compare_carried(function, decoded: dict[str, np.ndarray], carried: Mapping[str, BlockwiseWeight]) -> dict:
    """Our data/scale/offset against what the package stores, value for value, and the dense weights."""
    by_name = {op.name: op for op in function.operations if op.op_type == "constexpr_blockwise_shift_scale"}
    mismatched, storage = [], collections.Counter()
    for name, ours in carried.items():
        op = by_name.get(op_name(name))
        if op is None:
            mismatched.append(f"{name}: not in the package")
            continue
        stored_offset = op.offset.val if op.offset is not None else None
        float_type = op.scale.val.dtype
        checks = {
            "data": _storage(op.data) == ours.storage and np.array_equal(op.data.val, ours.data),
            "scale": np.array_equal(op.scale.val, ours.scale.astype(float_type)),
            "offset": (stored_offset is None) == (ours.offset is None) and
                      (ours.offset is None or np.array_equal(stored_offset, ours.offset)),
            "dense": np.array_equal(decoded[op.outputs[0].name], ours.dense(float_type)),
        }
        storage[ours.storage] += 1
        mismatched += [f"{name}: {what} differs" for what, ok in checks.items() if not ok]
    return {"weights": len(carried), "storage": dict(storage), "equal": not mismatched, "mismatched": mismatched}
