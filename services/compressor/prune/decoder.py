"""Pruning a causal LM (a float ModelDir) into another float ModelDir.

- `prune_decoder`: unstructured or N:M sparsity in every block linear (q, k, v, o, gate, up, down);
  embeddings, norms and the head stay dense. Magnitude needs only the weights; Wanda and SparseGPT
  run the model one block at a time over calibration sequences (shared/models/blockwise.py), each
  linear group's statistics accumulated from inputs that already pass through the pruned earlier
  groups and blocks — "sequential", as both papers do. With sequences, magnitude pruning runs the
  same way only to measure each tensor's output error.
- `prune_decoder_neurons`: structured — the same number of MLP neurons leaves every layer (HF
  configs hold one intermediate_size), chosen per layer by importance E|a_i|·‖down[:, i]‖ of the
  neuron's activation a_i = act(gate_i·x)·(up_i·x), or ‖gate_i‖·‖up_i‖·‖down[:, i]‖ without
  calibration. A neuron's gate and up rows and its down column go together, so the written
  directory's config has a smaller intermediate_size and every exporter writes a smaller file.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from services.compressor.histogram import (LARGEST_PRUNED, MAGNITUDE, WeightHistogram, global_threshold,
                                           pruning_histogram, removal_histogram)
from services.compressor.layerwise import HessianAccumulator, sequential_groups
from services.compressor.prune.masks import (SCOPES, check_n_m, check_sparsity, magnitude_masks, n_m_mask,
                                             smallest_mask, sparsity_of)
from services.compressor.prune.sparsegpt import PruneResult, sparsegpt
from services.compressor.prune.wanda import wanda_mask
from services.compressor.quant.gptq import relative_output_error
from shared.errors import FailedPrecondition, InvalidArgument
from shared.models import blockwise
from shared.models.bundle import ModelDir, write_model_dir
from shared.models.decoder_config import LINEAR_NAMES, DecoderConfig, is_linear_weight
from shared.models.tokenizer import TOKENIZER_GGUF

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclasses.dataclass
class DecoderPruneReport:
    method: str
    sparsity: dict[str, float]           # tensor -> share of its weights pruned (set to zero)
    output_error: dict[str, float]       # tensor -> tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) on calibration inputs (if any)
    seconds: float
    overall_sparsity: float = 0.0        # zero share of all block linears together
    histograms: list[WeightHistogram] = dataclasses.field(default_factory=list)   # weights before, with the cut


@dataclasses.dataclass
class NeuronPruneReport:
    intermediate_size_before: int
    intermediate_size_after: int
    parameters_before: int
    parameters_after: int
    removed_importance: dict[str, float]   # block prefix -> share of its neurons' total importance removed
    seconds: float
    histograms: list[WeightHistogram] = dataclasses.field(default_factory=list)   # gate, up, down before


# ------------------------------------------------------------------------------------- shared steps
def _check_calibrated(config: DecoderConfig, what: str) -> None:
    if config.architecture not in blockwise.BLOCKWISE_ARCHITECTURES:
        raise FailedPrecondition(f"{what} runs the model block by block, which supports "
                                 f"{', '.join(blockwise.BLOCKWISE_ARCHITECTURES)}, not {config.architecture!r}",
                                 reason="UNSUPPORTED_ARCH", field="prune")


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def _write(model: ModelDir, config: DecoderConfig, tensors: Iterator[tuple[str, np.ndarray]], out_dir: Path) -> None:
    """A float32 ModelDir with the source's tokenizer files."""
    tokenizer = model.path / "tokenizer.json"
    write_model_dir(out_dir, config, tensors, tokenizer.read_text() if tokenizer.is_file() else None,
                    model.tokenizer_config())
    if not tokenizer.is_file() and (model.path / TOKENIZER_GGUF).is_file():
        shutil.copy(model.path / TOKENIZER_GGUF, out_dir / TOKENIZER_GGUF)


def _in_order(model: ModelDir, names: list[str], block: Callable[[int], dict[str, np.ndarray]]) \
        -> Iterator[tuple[str, np.ndarray]]:
    """Yields `names` in order: a block's tensors from block(i), called once per block in order,
    everything else (embeddings, final norm, head) as stored."""
    produced: dict[str, np.ndarray] = {}
    done = 0
    for name in names:
        layer = _layer_of(name)
        if layer is None:
            yield name, model.array(name)
            continue
        while done <= layer:
            produced.update(block(done))
            done += 1
        yield name, produced.pop(name)


# ------------------------------------------------------------------------------------- sparsity
Pruner = Callable[[str, torch.Tensor, HessianAccumulator | None], PruneResult]


def _pruner(method: str, sparsity: float, n: int, m: int, masks: dict[str, torch.Tensor] | None,
            block_size: int, damp: float) -> Pruner:
    """One function (tensor name, W, input statistics) -> PruneResult per method."""
    def magnitude(name, W, acc):
        if masks is not None:
            keep = masks[name].to(W.device)
        elif m:
            keep = n_m_mask(W.abs(), n, m)
        else:
            keep = smallest_mask(W.abs(), sparsity)
        pruned = W * keep
        error = relative_output_error(W, pruned, acc.hessian()) if acc is not None else float("nan")
        return PruneResult(pruned, keep, error)

    def wanda(name, W, acc):
        keep = wanda_mask(W, acc.energy.float(), sparsity=sparsity, n=n, m=m)
        pruned = W * keep
        return PruneResult(pruned, keep, relative_output_error(W, pruned, acc.hessian()))

    def sparse_gpt(name, W, acc):
        return sparsegpt(W, acc.hessian(), sparsity=sparsity, n=n, m=m, block_size=block_size, damp=damp, name=name)
    return {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparse_gpt}[method]


def _check_request(config: DecoderConfig, method: str, sparsity: float, n: int, m: int, scope: str,
                   sequences: torch.Tensor | None) -> None:
    if method not in METHODS:
        raise InvalidArgument(f"prune.method must be one of {METHODS}, got {method!r}", field="prune.method")
    if n or m:                                        # every linear's input width must split into groups of m
        for columns in (config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size):
            check_n_m(n, m, columns)
    else:
        check_sparsity(sparsity)
    if scope not in SCOPES:
        raise InvalidArgument(f"prune.scope must be one of {SCOPES}, got {scope!r}", field="prune.scope")
    if scope != "per_layer" and (method != "magnitude" or m):
        raise InvalidArgument(f"prune.scope {scope!r} applies to unstructured magnitude pruning only",
                              field="prune.scope")
    if method != "magnitude" and sequences is None:
        raise InvalidArgument(f"{method} needs calibration sequences", field="calibration")
    if sequences is not None:
        _check_calibrated(config, method)


def prune_decoder(model: ModelDir, *, method: str, sparsity: float = 0.5, n: int = 0, m: int = 0,
                  scope: str = "per_layer", sequences: torch.Tensor | None = None, out_dir: Path,
                  device: str | torch.device = "cpu", block_size: int = 128, damp: float = 0.01,
                  progress: Callable[[str], None] | None = None) -> DecoderPruneReport:
    """Prunes every block linear of `model` and writes a float ModelDir (same config) to `out_dir`.
    sequences: (samples, tokens) int64 calibration token ids; needed by wanda and sparsegpt."""
    started = time.perf_counter()
    config = model.config
    _check_request(config, method, sparsity, n, m, scope, sequences)
    progress = progress or (lambda message: None)
    device = torch.device(device)
    names = model.tensor_names()
    masks = None
    if method == "magnitude" and scope == "global":
        masks = magnitude_masks({name: model.tensor(name) for name in names if is_linear_weight(name)}, sparsity,
                                scope="global")
    prune = _pruner(method, sparsity, n, m, masks, block_size, damp)
    report = DecoderPruneReport(method, {}, {}, 0.0)
    cut = MAGNITUDE if method == "magnitude" and not m else LARGEST_PRUNED   # WeightHistogram.threshold_kind

    def record(name: str, W: torch.Tensor, result: PruneResult) -> np.ndarray:
        report.histograms.append(pruning_histogram(name, W, result.mask, cut))
        report.sparsity[name] = sparsity_of(result.mask)
        if not np.isnan(result.output_error):
            report.output_error[name] = result.output_error
        return result.weight.cpu().numpy()

    if sequences is None:                              # magnitude, weights only: tensor by tensor
        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            for name in names:
                weight = model.array(name)
                if is_linear_weight(name):
                    W = torch.from_numpy(weight)
                    yield name, record(name, W, prune(name, W, None))
                else:
                    yield name, weight
        _write(model, config, tensors(), out_dir)
    else:
        state = {"hidden": blockwise.embed(model, sequences, device)}
        cos, sin = blockwise.rotary(config, sequences.shape[1], device)

        @torch.inference_mode()
        def block(index: int) -> dict[str, np.ndarray]:
            progress(f"block {index + 1}/{config.num_hidden_layers}")
            prefix = blockwise.block_prefix(index)
            layer = blockwise.load_block(config, index, model.tensor, device)
            modules = dict(layer.named_modules())
            out: dict[str, np.ndarray] = {}

            def prune_group(suffixes: list[str], acc: HessianAccumulator) -> None:
                for suffix in suffixes:
                    name = f"{prefix}{suffix}.weight"
                    linear = modules[suffix]
                    W = linear.weight.data.float()
                    result = prune(name, W, acc)
                    linear.weight.data = result.weight.to(linear.weight.dtype)
                    out[name] = record(name, W, result)
            state["hidden"] = sequential_groups(config, layer, state["hidden"], cos, sin, prune_group)
            for name, parameter in layer.named_parameters():
                out.setdefault(prefix + name, parameter.data.cpu().numpy().copy())
            return out
        _write(model, config, _in_order(model, names, block), out_dir)
    if scope == "global":
        report.histograms = global_threshold(report.histograms)
    sizes = {name: int(np.prod(model.shape(name))) for name in report.sparsity}
    report.overall_sparsity = sum(report.sparsity[name] * size for name, size in sizes.items()) / \
        max(sum(sizes.values()), 1)
    report.seconds = time.perf_counter() - started
    return report


# ------------------------------------------------------------------------------------- MLP neurons
def _neuron_magnitude(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """‖gate_i‖·‖up_i‖·‖down[:, i]‖ (ffn,): a neuron's gain on inputs of unit norm."""
    return gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)


@torch.inference_mode()
def _mean_abs_activation(config: DecoderConfig, block, hidden: torch.Tensor, cos, sin) -> torch.Tensor:
    """E|a_i| over every calibration token of the block's MLP activations (ffn,)."""
    total = torch.zeros(config.intermediate_size, dtype=torch.float64, device=hidden.device)
    count = 0
    for part in blockwise.batches(hidden.shape[0]):
        h = hidden[part]
        h2 = h + block.self_attn(block.input_layernorm(h), cos, sin)
        x2 = block.post_attention_layernorm(h2)
        a = torch.nn.functional.silu(block.mlp.gate_proj(x2)) * block.mlp.up_proj(x2)
        total += a.abs().reshape(-1, a.shape[-1]).sum(0).double()
        count += a.shape[0] * a.shape[1]
    return (total / max(count, 1)).float()


def _shrink_mlp(mlp, keep: torch.Tensor) -> None:
    """Keeps neurons `keep` (sorted indices): gate/up rows and down columns together."""
    for linear in (mlp.gate_proj, mlp.up_proj):
        linear.weight.data = linear.weight.data[keep].contiguous()
        linear.out_features = len(keep)
    mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, keep].contiguous()
    mlp.down_proj.in_features = len(keep)


def prune_decoder_neurons(model: ModelDir, *, fraction: float, sequences: torch.Tensor | None = None,
                          out_dir: Path, device: str | torch.device = "cpu",
                          progress: Callable[[str], None] | None = None) -> NeuronPruneReport:
    """Removes round(fraction·intermediate_size) MLP neurons from every layer; writes a ModelDir
    whose config has the smaller intermediate_size. With sequences, importance is activation-aware
    and measured on inputs that pass through the already-pruned earlier blocks."""
    started = time.perf_counter()
    config = model.config
    if not 0.0 <= fraction < 1.0:
        raise InvalidArgument(f"prune.sparsity (the share of neurons) must be in [0, 1), got {fraction}",
                              field="prune.sparsity")
    ffn = config.intermediate_size
    kept = ffn - round(fraction * ffn)
    if kept < 1:
        raise InvalidArgument(f"removing {fraction:.0%} of {ffn} neurons leaves none", field="prune.sparsity")
    if sequences is not None:
        _check_calibrated(config, "activation-aware neuron pruning")
    progress = progress or (lambda message: None)
    device = torch.device(device)
    pruned_config = dataclasses.replace(config, intermediate_size=kept)
    report = NeuronPruneReport(ffn, kept, config.parameter_count(), pruned_config.parameter_count(), {}, 0.0)
    state = {"hidden": blockwise.embed(model, sequences, device) if sequences is not None else None}
    cos, sin = blockwise.rotary(config, sequences.shape[1], device) if sequences is not None else (None, None)

    @torch.inference_mode()
    def block(index: int) -> dict[str, np.ndarray]:
        progress(f"block {index + 1}/{config.num_hidden_layers}")
        prefix = blockwise.block_prefix(index)
        if state["hidden"] is None:                    # weights only: no need to build the block
            weights = {suffix: model.tensor(f"{prefix}{suffix}.weight") for suffix in LINEAR_NAMES[-3:]}
            importance = _neuron_magnitude(*weights.values())
        else:
            layer = blockwise.load_block(config, index, model.tensor, device)
            mlp = layer.mlp
            importance = _mean_abs_activation(config, layer, state["hidden"], cos, sin) * \
                mlp.down_proj.weight.norm(dim=0)
        keep = torch.sort(torch.argsort(importance, descending=True, stable=True)[:kept]).values
        report.removed_importance[prefix] = 1.0 - float(importance[keep].sum() / importance.sum().clamp(min=1e-30))
        mlp_weights = weights if state["hidden"] is None else \
            {suffix: dict(layer.named_parameters())[f"{suffix}.weight"].data for suffix in LINEAR_NAMES[-3:]}
        for suffix, weight in mlp_weights.items():        # kept/ffn of each tensor stays: rows or columns
            report.histograms.append(removal_histogram(f"{prefix}{suffix}.weight", weight,
                                                       weight.numel() // ffn * kept))
        if state["hidden"] is None:
            gate, up, down = weights.values()
            shrunk = {"mlp.gate_proj": gate[keep], "mlp.up_proj": up[keep], "mlp.down_proj": down[:, keep]}
            out = {f"{prefix}{suffix}.weight": tensor.numpy() for suffix, tensor in shrunk.items()}
            return {name: out.get(name, model.array(name)) for name in model.tensor_names()
                    if name.startswith(prefix)}
        _shrink_mlp(layer.mlp, keep.to(device))
        state["hidden"] = blockwise.run_block(layer, state["hidden"], cos, sin)
        return {prefix + name: parameter.data.cpu().numpy().copy() for name, parameter in layer.named_parameters()}

    _write(model, pruned_config, _in_order(model, model.tensor_names(), block), out_dir)
    report.seconds = time.perf_counter() - started
    return report
