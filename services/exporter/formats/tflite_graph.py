"""Torch module → TFLite flatbuffer through litert-torch (no TensorFlow).

The module is captured with `torch.export`, and its FX graph rewritten before litert-torch lowers it:

- `carry_weights`: each linear weight we quantized (the module holds its dequantized value
  ŵ = code·scale) is routed through PT2E's `quantize_per_channel → dequantize_per_channel` with *our*
  scales and zero point 0. litert-torch converts the pair (default QDQ mode) to QUANTIZE → DEQUANTIZE
  ops in front of the FULLY_CONNECTED, which `tflite_weights.rewrite` folds into a constant holding our
  codes. The pair is there to keep the weight out of the converter's optimizations: a float weight
  after a norm gets the norm's scale folded into it (MiniLM's query/key/value/intermediate weights no
  longer equal ours), and litert-torch's DYNAMIC QDQ mode, which would write int8 weights itself, also
  quantizes every weight we left float with its own parameters (MiniLM's word embeddings per tensor
  with zero point −45, which EMBEDDING_LOOKUP then refuses). Convolution weights stay float here and are
  found again by value (`tflite_weights`): they would come back transposed behind the DEQUANTIZE.
- `fold_constants`: computations that depend on neither the inputs nor the parameters (the rotary
  tables, which the llama reference computes in float64 inside `forward`) are evaluated once in torch
  and stored as constants; the converter cannot legalize float64 `pow` ("failed to legalize operation
  'tfl.pow'").
- `expand_unit_repeats`: `repeat_interleave` along a dimension of size 1 (grouped-query attention with
  one KV head) becomes a concatenation of copies. The converter lowers the repeat to a broadcast and then
  turns the key transpose that follows into a RESHAPE, which silently gives wrong attention (max
  |Δlogit| 0.3 on the tiny llama); the concatenation converts correctly.
"""
from __future__ import annotations

import importlib
import logging
from typing import Mapping, Sequence

import torch

from services.exporter.formats.tflite_weights import CarriedWeight

log = logging.getLogger(__name__)
aten = torch.ops.aten
SIGNATURE = "serving_default"


def capture(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
            carried: Mapping[str, CarriedWeight] | None = None) -> torch.fx.GraphModule:
    """`torch.export` of `module` at the example inputs' (static) shapes, with the rewrites applied.
    `carried`: parameter name -> our quantized weight; the parameter must hold its dequantized value."""
    importlib.import_module("torchao.quantization.pt2e")       # registers torch.ops.quantized_decomposed
    with torch.no_grad():
        graph = torch.export.export(module.eval(), tuple(example_inputs), strict=False).module()
    for submodule in graph.modules():      # captured in eval mode; exported graphs refuse .eval(), so say it
        submodule.training = False
    routed = carry_weights(graph, carried or {})
    folded = fold_constants(graph)
    expanded = expand_unit_repeats(graph)
    log.debug("captured %s: %d weights carried, %d constant subgraphs folded, %d unit repeats expanded",
              type(module).__name__, routed, folded, expanded)
    return graph


def convert(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
            carried: Mapping[str, CarriedWeight] | None = None) -> bytes:
    """The .tflite bytes of `module` with one signature, SIGNATURE, at the example shapes. Inputs are
    named args_0, args_1, … and outputs output_0, … (litert-torch's names); int64 inputs become int32
    (litert-torch's default, what on-device runtimes take)."""
    import litert_torch
    # litert-torch's progress display prints to stdout through `rich`; its config switch is the only
    # way to turn it off (it sets LITERT_TORCH_SHOW_PROGRESS for this process).
    litert_torch.config.show_progress = False
    graph = capture(module, example_inputs, carried)
    edge_model = litert_torch.signature(SIGNATURE, graph, tuple(example_inputs)).convert()
    return bytes(edge_model.model_content())


def carry_weights(graph: torch.fx.GraphModule, carried: Mapping[str, CarriedWeight]) -> int:
    """Routes each carried linear weight through quantize → dequantize with our scales (module doc)."""
    ops = torch.ops.quantized_decomposed
    routed = set()
    for node in list(graph.graph.nodes):
        if node.op != "get_attr" or node.target not in carried:
            continue
        if not all(user.target is aten.linear.default and user.args[1] is node for user in node.users):
            continue                        # a convolution's weight: carried after conversion (module doc)
        weight = carried[node.target]
        low = -128 if not weight.restricted else -127
        prefix = f"_edgeforge_{len(routed)}"
        graph.register_buffer(f"{prefix}_scales", torch.from_numpy(weight.scales.copy()), persistent=False)
        graph.register_buffer(f"{prefix}_zeros", torch.zeros(weight.scales.size, dtype=torch.int64),
                              persistent=False)
        with graph.graph.inserting_after(node):
            scales = graph.graph.get_attr(f"{prefix}_scales")
        with graph.graph.inserting_after(scales):
            zeros = graph.graph.get_attr(f"{prefix}_zeros")
        if weight.scales.size == 1:
            quantize, dequantize = ops.quantize_per_tensor.tensor, ops.dequantize_per_tensor.tensor
            args = (scales, zeros, low, 127, torch.int8)
        else:
            quantize, dequantize = ops.quantize_per_channel.default, ops.dequantize_per_channel.default
            args = (scales, zeros, 0, low, 127, torch.int8)
        with graph.graph.inserting_after(zeros):
            codes = graph.graph.call_function(quantize, (node, *args))
        with graph.graph.inserting_after(codes):
            value = graph.graph.call_function(dequantize, (codes, *args))
        node.replace_all_uses_with(value, delete_user_cb=lambda user: user is not codes)
        routed.add(node.target)
    graph.recompile()
    return len(routed)


def _attribute(graph: torch.fx.GraphModule, target: str):
    value = graph
    for part in target.split("."):
        value = getattr(value, part)
    return value


def fold_constants(graph: torch.fx.GraphModule) -> int:
    """Replaces every tensor computed from neither inputs nor parameters by a stored constant; returns
    how many constants were stored. Parameter reads are never folded, so no weight is copied."""
    parameters = {name for name, _ in graph.named_parameters()}
    values: dict[torch.fx.Node, object] = {}
    for node in graph.graph.nodes:
        if node.op == "get_attr" and node.target not in parameters:
            values[node] = _attribute(graph, node.target)
        elif node.op == "call_function" and all(n in values for n in node.all_input_nodes):
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            with torch.no_grad():
                values[node] = node.target(*args, **kwargs)
    stored = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node not in values:
            continue
        if not isinstance(values[node], torch.Tensor):
            if not node.users:                      # shape/dtype assertions on folded values
                graph.graph.erase_node(node)
            continue
        if all(user in values for user in node.users):
            continue                                # an intermediate of a larger folded expression
        name = f"_edgeforge_folded_{stored}"
        graph.register_buffer(name, values[node].detach().clone(), persistent=False)
        with graph.graph.inserting_before(node):
            constant = graph.graph.get_attr(name)
        constant.meta = dict(node.meta)
        node.replace_all_uses_with(constant)
        stored += 1
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return stored


def expand_unit_repeats(graph: torch.fx.GraphModule) -> int:
    """`x.repeat_interleave(n, dim)` with x.shape[dim] == 1 → `torch.cat([x] * n, dim)` (equal values)."""
    expanded = 0
    for node in list(graph.graph.nodes):
        if node.target is not aten.repeat_interleave.self_int:
            continue
        source, repeats = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if dim is None or not isinstance(repeats, int) or source.meta["val"].shape[dim] != 1:
            continue
        with graph.graph.inserting_before(node):
            concatenated = graph.graph.call_function(aten.cat.default, ([source] * repeats, dim))
        concatenated.meta = dict(node.meta)
        node.replace_all_uses_with(concatenated)
        graph.graph.erase_node(node)
        expanded += 1
    graph.recompile()
    return expanded
