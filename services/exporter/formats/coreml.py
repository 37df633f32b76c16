"""Core ML export: an ML program (`.mlpackage` directory) through coremltools, for the causal LM of an
ExportInput and for any torch module (`export_module`: CNNs, encoders).

The torch module goes through `torch.export` (coremltools' TorchScript path fails on the decoder:
it casts shape arithmetic with numpy 2 in a way numpy 2 refuses) and `coremltools.convert` to an
mlprogram; what the options ask for is applied to the converted program:

- float_type f16 / f32: compute_precision FLOAT16 / FLOAT32 (weights left float are stored so);
  bf16 is refused (UNSUPPORTED_OP): ML programs compute in float16 or float32.
- quantized weights (the compressed model's, or `weights=` for a module): carried as they are — our
  codes, scales and zero points become iOS18 `constexpr_blockwise_shift_scale` ops (coreml_weights.py),
  int8 per tensor / per channel and int4 / int8 per block (block = the grid's group_size), GGUF Q8_0
  and Q4_0; other grids (3/5/6-bit, K-quants) are refused before any work.
- options.coreml on a float model: magnitude pruning stored sparse (`constexpr_sparse_to_dense`),
  palettization with k-means or uniform LUTs (`constexpr_lut_to_dense`), per tensor or per group of
  output channels, and both jointly (prune, then palettize the non-zeros: `constexpr_lut_to_sparse`),
  all by `coremltools.optimize.coreml`. Weights under its 2048-element threshold, and those a grouped
  palette does not divide, stay float (the validation record counts what is compressed).

The causal LM takes `input_ids` int32 (1, T) with T ranged 1…max_tokens (default 2048, at most the
model's context) and returns `logits` float32 (1, T, vocab): one package scores prompts of any length,
with no padding. It has no KV cache (a Core ML stateful-cache variant is future work); ranged shapes
run on CPU/GPU, the Neural Engine wants fixed or enumerated ones. The rotary tables are precomputed for
max_tokens positions (`torch.arange(T, dtype=float32)` would convert to int32 in coremltools 9).

Nothing here runs the package: Core ML prediction needs macOS. Every export is read back
(coreml_package.validate_package) and our carried weights compared with the stored ones value for
value; the record is in the provenance.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from services.exporter.base import (ExportedFile, Exporter, ExportFormat, ExportInput, ExportOptions,
                                    PaletteMode, unsupported_arch, unsupported_op)
from services.exporter.formats.coreml_weights import BlockwiseWeight, blockwise, unsupported_grid
from shared.errors import FailedPrecondition, InvalidArgument
from shared.quant.qtensor import GgufTensor, QuantizedTensor
from shared.versions import tool_versions

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/x-edgeforge-coreml-mlpackage+tar"   # a directory, stored as a deterministic tar
# gemma3 is not: its sliding-window layers branch on the sequence length (window < T), which
# torch.export cannot trace over a ranged length, and its local layers need a second rotary table.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
MACOS_ONLY = "Core ML prediction needs macOS (coremltools: 'Model prediction is only supported on macOS')"
# minimum_deployment_target names (ct.target attributes) -> the iOS release of their ML program opset
TARGETS = {"iOS15": 15, "iOS16": 16, "iOS17": 17, "iOS18": 18, "macOS12": 15, "macOS13": 16, "macOS14": 17,
           "macOS15": 18}
PALETTE_BITS = (1, 2, 3, 4, 6, 8)                    # iOS18 LUT index widths
EXAMPLE_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class FlexibleDim:
    """A dimension of an input that varies in [min, max]; inputs whose dims share a name share the length."""
    name: str
    min: int
    max: int


def check_options(options: ExportOptions, quantized: bool) -> None:
    """FailedPrecondition UNSUPPORTED_OP for what Core ML cannot do with `options` (and carried quantized
    weights when `quantized`); InvalidArgument for values that are no option at all."""
    coreml = options.coreml
    if options.float_type == "bf16":
        raise unsupported_op("Core ML", "bfloat16 weights (float_type bf16): ML programs compute in float16 or "
                                        "float32; use f16")
    if options.int8_activations:
        raise unsupported_op("Core ML", "int8 activations: the Core ML exporter quantizes weights only")
    if coreml.deployment_target not in TARGETS:
        raise InvalidArgument(f"coreml.deployment_target must be one of {', '.join(TARGETS)}, got "
                              f"{coreml.deployment_target!r}", field="export.coreml.deployment_target")
    if coreml.palette_bits and coreml.palette_bits not in PALETTE_BITS:
        raise unsupported_op("Core ML", f"{coreml.palette_bits}-bit palettes (LUT indices are "
                                        f"{', '.join(map(str, PALETTE_BITS))} bits)")
    if coreml.palette_group_size and not coreml.palette_bits:
        raise InvalidArgument("coreml.palette_group_size needs coreml.palette_bits", field="export.coreml")
    if quantized and (coreml.palette_bits or coreml.sparsity):
        raise unsupported_op("Core ML", "palettizing or pruning the compressed model's quantized weights: they "
                                        "are carried as they are; palettize or prune a float model")
    needs_ios18 = [what for what, wanted in (
        ("blockwise-quantized weights", quantized), ("per-group palettes", coreml.palette_group_size),
        ("joint sparse + palettized weights", coreml.palette_bits and coreml.sparsity)) if wanted]
    if needs_ios18 and TARGETS[coreml.deployment_target] < 18:
        raise unsupported_op("Core ML", f"{needs_ios18[0]} before iOS18/macOS15 (deployment_target "
                                        f"{coreml.deployment_target})")


def quantized_module_weights(module, grid, min_elements: int = 2048) -> dict[str, QuantizedTensor]:
    """Our RTN (services/compressor/quant/rtn.py) of every Linear, Conv and Embedding weight of `module`
    with at least `min_elements` weights (coremltools.optimize's default threshold) that `grid` fits
    (rows = output channels, columns = the rest flattened), by parameter name."""
    import torch
    from services.compressor.quant.rtn import quantize
    out = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Embedding)):
            continue
        weight = layer.weight.detach().reshape(layer.weight.shape[0], -1).numpy()
        rows, columns = weight.shape
        if weight.size < min_elements:
            continue
        inner = int(np.prod(layer.weight.shape[2:])) if layer.weight.ndim > 2 else 1
        if grid.group_size and (columns % grid.group_size or grid.group_size % inner):
            log.debug("%s: group_size %d does not fit %s; left float", name, grid.group_size, tuple(weight.shape))
            continue
        out[f"{name}.weight" if name else "weight"] = quantize(weight, grid)
    return out


def export_module(module, example_inputs: Mapping[str, Any], options: ExportOptions, out_path: Path, *,
                  weights: Mapping[str, QuantizedTensor | GgufTensor] | None = None,
                  output_names: Sequence[str] = ("output",),
                  flexible: Mapping[str, Mapping[int, FlexibleDim]] | None = None) -> ExportedFile:
    """Writes `module` as an ML program package (a directory) at `out_path`.

    example_inputs: input name -> example tensor, in forward's argument order (integer inputs become
    int32, float ones float32); flexible: input name -> {axis: FlexibleDim}, every other dimension is
    fixed to the example's.
    weights: parameter name -> our quantized tensor, carried into the package; the module's parameter
    is overwritten (in place) with its dequantized value, so the program computes with exactly it."""
    import torch
    started = time.perf_counter()
    weights = dict(weights or {})
    check_options(options, quantized=bool(weights))
    for name, value in weights.items():
        reason = unsupported_grid(value.grid)
        if reason:
            raise unsupported_op("Core ML", f"{name}: {reason}")
    _prepare_output(out_path)
    module = module.eval()
    carried = {name: _carry(module, name, value) for name, value in weights.items()}
    names = list(example_inputs)
    examples = tuple(torch.as_tensor(example_inputs[n]) for n in names)
    flexible = {n: dict(axes) for n, axes in (flexible or {}).items()}
    program = _torch_export(module, names, examples, flexible)
    traced = time.perf_counter()
    mlmodel, converter, passes = _convert(program, names, examples, flexible, output_names, options, carried)
    converted = time.perf_counter()
    mlmodel, steps = _optimize(mlmodel, options)
    compressed = time.perf_counter()
    mlmodel.save(str(out_path))
    record = verified_record(out_path, carried)
    seconds = {"torch_export": traced - started, "convert": converted - traced,
               "compress": compressed - converted, "save_and_validate": time.perf_counter() - compressed}
    provenance = {"tools": tool_versions("coremltools", "torch", "numpy", "scikit-learn"),
                  "options": options.to_dict(), "converter": converter, "graph_passes": passes,
                  "optimize": steps, "carried_weights": _carried_summary(carried),
                  "seconds": {k: round(v, 3) for k, v in seconds.items()}, "validation": record}
    labels = {"format": "coreml", "float_type": options.float_type,
              "deployment_target": options.coreml.deployment_target,
              "weights": ",".join(f"{k}:{v}" for k, v in sorted(record["storage"].items()))}
    log.info("wrote %s (%d weight bytes) in %.1f s", out_path.name, record["weight_file_bytes"], sum(seconds.values()))
    return ExportedFile(out_path, MEDIA_TYPE, labels, provenance)


def verified_record(path: Path, carried: Mapping[str, BlockwiseWeight]) -> dict[str, Any]:
    """validate_package's record of the package at `path`; FailedPrecondition VALIDATION_FAILED unless
    every carried weight is stored as our data/scale/offset and numpy and coremltools decode alike."""
    from services.exporter.formats.coreml_package import validate_package
    record = validate_package(path, carried or None)
    if carried and not record["carried"]["equal"]:
        raise FailedPrecondition(f"{path.name} does not hold our weights: "
                                 f"{', '.join(record['carried']['mismatched'][:5])}", reason="VALIDATION_FAILED")
    if record["decode_max_abs_diff"] != 0.0:
        raise FailedPrecondition(f"{path.name}: coremltools and edgeforge decode its weights differently (max "
                                 f"|Δ| {record['decode_max_abs_diff']:.3g})", reason="VALIDATION_FAILED")
    return record


def _prepare_output(path: Path) -> None:
    """The package directory is created at `path`; an empty placeholder file or directory there is replaced."""
    if path.is_file() and path.stat().st_size == 0:
        path.unlink()
    elif path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if path.exists():
        raise FailedPrecondition(f"{path} already exists", field="out_path")


def _torch_export(module, names: list[str], examples: tuple, flexible: dict[str, dict[int, FlexibleDim]]):
    """torch.export of `module` on `examples`, flexible dimensions as torch Dims (shared by name)."""
    import torch
    dims = {d.name: torch.export.Dim(d.name, min=d.min, max=d.max) for axes in flexible.values() for d in axes.values()}
    dynamic = tuple({axis: dims[d.name] for axis, d in flexible[n].items()} if flexible.get(n) else None for n in names)
    with torch.no_grad():
        program = torch.export.export(module, examples, dynamic_shapes=dynamic if flexible else None)
        return program.run_decompositions({})          # coremltools converts the ATEN dialect


def _carry(module, name: str, value: QuantizedTensor | GgufTensor) -> BlockwiseWeight:
    import torch
    try:
        parameter = module.get_parameter(name)
    except AttributeError as error:
        raise InvalidArgument(f"the module has no parameter {name}", field="weights") from error
    weight = blockwise(value, tuple(parameter.shape))
    with torch.no_grad():
        parameter.copy_(torch.from_numpy(weight.dense(np.float32)))
    return weight


def _convert(program, names, examples, flexible, output_names, options: ExportOptions,
             carried: dict[str, BlockwiseWeight]):
    """(MLModel, what the converter was told, what our passes did): coremltools.convert of the exported
    program to MIL (its default pass pipeline), our graph passes on that program, then MIL to an ML
    program with no further main-pipeline passes (the backend's own still run)."""
    import coremltools as ct
    import torch
    from services.exporter.formats.coreml_weights import carry_pass, finite_multiplier_pass
    inputs, described, dims = [], [], {}
    for name, example in zip(names, examples):
        axes = flexible.get(name, {})
        for axis, dim in axes.items():          # one RangeDim (one symbol) per named dimension
            dims.setdefault(dim.name, ct.RangeDim(dim.min, dim.max, default=int(example.shape[axis])))
        shape = [dims[axes[axis].name] if axis in axes else size for axis, size in enumerate(example.shape)]
        integer = not torch.is_floating_point(example)
        inputs.append(ct.TensorType(name=name, shape=shape, dtype=np.int32 if integer else np.float32))
        described.append({"name": name, "dtype": "int32" if integer else "float32",
                          "shape": [s if isinstance(s, int) else [s.lower_bound, s.upper_bound] for s in shape]})
    half = options.float_type == "f16"
    target = getattr(ct.target, options.coreml.deployment_target)
    mil = ct.convert(program, inputs=inputs, outputs=[ct.TensorType(name=n, dtype=np.float32) for n in output_names],
                     convert_to="milinternal", minimum_deployment_target=target,
                     compute_precision=ct.precision.FLOAT16 if half else ct.precision.FLOAT32)
    passes = ([carry_pass(carried, np.dtype(np.float16 if half else np.float32))] if carried else []) + \
             ([finite_multiplier_pass()] if half else [])
    for graph_pass in passes:
        graph_pass(mil)                                 # under a graph-pass scope, as the pipeline runs passes
    mlmodel = ct.convert(mil, convert_to="mlprogram", minimum_deployment_target=target,
                         pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    converter = {"api": "coremltools.convert", "source": "torch.export", "convert_to": "mlprogram",
                 "minimum_deployment_target": options.coreml.deployment_target,
                 "compute_precision": "float16" if half else "float32",
                 "inputs": described, "outputs": [{"name": n, "dtype": "float32"} for n in output_names]}
    return mlmodel, converter, {type(p).__name__: p.replaced for p in passes}


def _optimize(mlmodel, options: ExportOptions):
    """coremltools.optimize.coreml pruning and/or palettization, as options.coreml asks."""
    import coremltools.optimize.coreml as cto
    coreml, steps = options.coreml, []
    if coreml.sparsity:
        config = cto.OpMagnitudePrunerConfig(target_sparsity=coreml.sparsity)
        mlmodel = cto.prune_weights(mlmodel, cto.OptimizationConfig(global_config=config))
        steps.append({"step": "prune_weights", "config": {"target_sparsity": coreml.sparsity,
                                                          "weight_threshold": config.weight_threshold}})
    if coreml.palette_bits:
        grouped = {"granularity": "per_grouped_channel", "group_size": coreml.palette_group_size} \
            if coreml.palette_group_size else {"granularity": "per_tensor"}
        mode = "kmeans" if coreml.palette_mode is PaletteMode.KMEANS else "uniform"
        config = cto.OpPalettizerConfig(mode=mode, nbits=coreml.palette_bits, **grouped)
        mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=config),
                                        joint_compression=bool(coreml.sparsity))
        steps.append({"step": "palettize_weights", "joint_compression": bool(coreml.sparsity),
                      "config": {"mode": mode, "nbits": coreml.palette_bits, **grouped,
                                 "weight_threshold": config.weight_threshold}})
    return mlmodel, steps


def _carried_summary(carried: dict[str, BlockwiseWeight]) -> dict:
    summary: dict[str, Any] = {"count": len(carried), "grids": {}, "storage": {}}
    for weight in carried.values():
        summary["grids"][weight.grid] = summary["grids"].get(weight.grid, 0) + 1
        summary["storage"][weight.storage] = summary["storage"].get(weight.storage, 0) + 1
    return summary


class CoremlExporter(Exporter):
    """The causal LM of an ExportInput as an ML program (see the module docstring)."""
    format = ExportFormat.COREML
    suffix = ".mlpackage"

    def __init__(self, max_tokens: int = 2048):
        self.max_tokens = max_tokens

    def check(self, source: ExportInput) -> None:
        config = source.model.config
        architecture = getattr(config, "architecture", "llama")
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise unsupported_arch("Core ML", architecture, SUPPORTED_ARCHITECTURES)
        quantized = False
        if source.compressed is not None:
            for plan in source.compressed.plans:
                if plan.grid is None:
                    continue
                reason = unsupported_grid(plan.grid)
                if reason:
                    raise unsupported_op("Core ML", f"{plan.name}: {reason}")
                quantized = True
        check_options(source.options, quantized)

    def export(self, source: ExportInput, out_path: Path) -> ExportedFile:
        import torch
        from shared.models.llama import build_reference
        self.check(source)
        config = source.model.config
        tokens = min(self.max_tokens, config.max_position_embeddings)
        reference = build_reference(config, lambda name: torch.from_numpy(source.dequantized(name)))
        module = tabled_rotary(reference, tokens)
        weights = {f"reference.{name}": source.tensor(name) for name in config.tensor_shapes()
                   if source.grid(name) is not None}
        example = torch.ones(1, min(EXAMPLE_TOKENS, tokens), dtype=torch.int64)
        exported = export_module(module, {"input_ids": example}, source.options, out_path, weights=weights,
                                 output_names=("logits",),
                                 flexible={"input_ids": {1: FlexibleDim("tokens", 1, tokens)}})
        exported.provenance["model"] = {"architecture": getattr(config, "architecture", "llama"),
                                        "max_tokens": tokens, "recipe": source.recipe}
        exported.labels["max_tokens"] = str(tokens)
        return exported

    def runs_here(self) -> bool:
        return sys.platform == "darwin"

    def why_not_here(self) -> str:
        return "" if self.runs_here() else MACOS_ONLY

    def read_back(self, exported: ExportedFile, source: ExportInput) -> dict[str, Any]:
        """validate_package's record; VALIDATION_FAILED unless every quantized weight of `source` is
        stored as our data/scale/offset and the weights decode identically in coremltools and numpy."""
        shapes = source.model.config.tensor_shapes()
        return verified_record(exported.path, {f"reference.{name}": blockwise(source.tensor(name), shapes[name])
                                               for name in shapes if source.grid(name) is not None})


def tabled_rotary(reference, max_tokens: int):
    """The reference LM, its rotary cos/sin read from tables of `max_tokens` positions (buffers, so
    torch.export keeps them as constants) instead of computed from torch.arange(T)."""
    import torch

    class _TabledRotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.reference = reference
            cos, sin = reference.rotary(max_tokens)
            self.register_buffer("cos", cos, persistent=False)                     # (max_tokens, head_dim)
            self.register_buffer("sin", sin, persistent=False)
            reference.rotary = self.rotary               # the instance's rotary now reads the tables

        def rotary(self, T, base=None):
            if base is not None and base != reference.config.rope_theta:
                raise FailedPrecondition("rotary tables exist for rope_theta only", reason="UNSUPPORTED_OP")
            return self.cos[:T], self.sin[:T]

        def forward(self, input_ids):
            return self.reference(input_ids)

    return _TabledRotary()
