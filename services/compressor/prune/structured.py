"""Structured pruning of module families: whole units leave, and the model gets genuinely smaller.

A unit is an output channel or neuron together with the input column(s) of the next layer that
read it, or an attention head across its q, k, v rows and its columns of the output projection.
Removing a unit gives exactly the outputs of the full model with that unit's outgoing weights
(the next layer's columns) set to zero, which is how the tests check it.

- MobileNetV2: the expanded channels of each inverted-residual block (expand conv rows, its
  BatchNorm, the depthwise channels, the projection's input columns). The block's input and
  output widths stay, so residual connections keep matching.
- SentenceEncoder (BERT): intermediate neurons (intermediate rows, output columns) and whole heads.
- SmallCNN: shared/models/cnn.py prunes its own channels; `prune_structured` dispatches to it.
The pruned model is rebuilt from its `structure()` and its state sliced from the full model's.
Default unit scores are weight magnitudes (the unit's gain: product of the norms of its incoming
and outgoing weights); callers with calibration data pass activation-aware scores.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from shared.errors import FailedPrecondition, InvalidArgument
from shared.models.encoder import SentenceEncoder
from shared.models.vision import MobileNetV2, fold_batchnorm

UNITS = ("neurons", "heads")


def kept_indices(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Ascending indices of the units that stay: the round(fraction·n) lowest scores go (at least
    one unit stays); among equal scores the later unit goes first."""
    if not 0.0 <= fraction < 1.0:
        raise InvalidArgument(f"prune.sparsity (the share of units) must be in [0, 1), got {fraction}",
                              field="prune.sparsity")
    count = len(scores)
    keep = max(1, count - round(fraction * count))
    return torch.argsort(scores.detach().float().cpu(), descending=True, stable=True)[:keep].sort().values


def _sliced_state(full: nn.Module, pruned: nn.Module, keep_for: Callable[[str], torch.Tensor | None]) -> dict:
    """The full model's state cut to the pruned model's shapes: along every dimension whose size
    changed, the indices keep_for(state key) are kept."""
    source, state = full.state_dict(), {}
    for key, target in pruned.state_dict().items():
        value = source[key]
        for dim, (old, new) in enumerate(zip(value.shape, target.shape)):
            if old != new:
                value = value.index_select(dim, keep_for(key).to(value.device))
        state[key] = value.clone()
    return state


# ------------------------------------------------------------------------------------- MobileNetV2
def _norm_scale(module: nn.Module) -> torch.Tensor | float:
    """|γ/σ| of a BatchNorm (what it multiplies each channel by); 1 once folded (Identity)."""
    if isinstance(module, nn.BatchNorm2d):
        return (module.weight / torch.sqrt(module.running_var + module.eps)).abs()
    return 1.0


def mobilenet_hidden_scores(model: MobileNetV2) -> list[torch.Tensor]:
    """Per block, each expanded channel's gain: ‖expand row‖·|BN|·‖depthwise filter‖·|BN|·‖project
    column‖ with the projection's BatchNorm applied (so the same with BatchNorm folded or not)."""
    scores = []
    with torch.no_grad():
        for block in model.blocks():
            layers = block.conv
            expand = layers[0][0].weight.flatten(1).norm(dim=1) * _norm_scale(layers[0][1]) if len(layers) == 4 \
                else torch.ones(block.hidden)
            depthwise, project, project_norm = layers[-3], layers[-2], layers[-1]
            project_scaled = project.weight.flatten(1) * torch.as_tensor(_norm_scale(project_norm)).reshape(-1, 1)
            scores.append(expand * depthwise[0].weight.flatten(1).norm(dim=1) * _norm_scale(depthwise[1])
                          * project_scaled.norm(dim=0))
    return scores


def prune_mobilenet_hidden(model: MobileNetV2, fraction: float,
                           scores: list[torch.Tensor] | None = None) -> MobileNetV2:
    """A new MobileNetV2 without `fraction` of every expanding block's hidden channels (the first
    block, which does not expand, keeps its width). scores: per block (model.blocks() order), one
    per hidden channel, higher = more important; default `mobilenet_hidden_scores`. Works on a
    model with or without BatchNorm folded; the result is folded the same way."""
    blocks = model.blocks()
    scores = mobilenet_hidden_scores(model) if scores is None else scores
    if len(scores) != len(blocks) or any(len(s) != b.hidden for s, b in zip(scores, blocks)):
        raise InvalidArgument("prune.scores must hold one score per hidden channel of each of the "
                              f"{len(blocks)} blocks", field="prune.scores")
    keep = {}
    for index, (block, score) in enumerate(zip(blocks, scores)):
        expands = len(block.conv) == 4
        keep[index] = kept_indices(score, fraction) if expands else torch.arange(block.hidden)
    positions = {id(layer): i for i, layer in enumerate(model.features)}
    prefixes = {f"features.{positions[id(block)]}.": keep[index] for index, block in enumerate(blocks)}
    pruned = MobileNetV2(model.classes, [len(k) for k in keep.values()])
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        with torch.no_grad():
            fold_batchnorm(pruned)                     # same layout (conv biases, Identity) as the source

    def keep_for(key: str) -> torch.Tensor:
        return next(k for prefix, k in prefixes.items() if key.startswith(prefix))
    pruned.load_state_dict(_sliced_state(model, pruned, keep_for), strict=True)
    return pruned.train(model.training)


# ------------------------------------------------------------------------------------- BERT
def bert_neuron_scores(model: SentenceEncoder) -> list[torch.Tensor]:
    """Per layer, each intermediate neuron's ‖intermediate row‖·‖output column‖."""
    with torch.no_grad():
        return [layer.intermediate.dense.weight.norm(dim=1) * layer.output.dense.weight.norm(dim=0)
                for layer in model.encoder.layer]


def bert_head_scores(model: SentenceEncoder) -> list[torch.Tensor]:
    """Per layer, each head's ‖value rows‖_F·‖output-projection columns‖_F (what it can add)."""
    scores = []
    with torch.no_grad():
        for layer in model.encoder.layer:
            hd, heads = layer.head_dim, layer.heads
            value = layer.attention.self.value.weight.reshape(heads, hd, -1).flatten(1).norm(dim=1)
            out = layer.attention.output.dense.weight.reshape(-1, heads, hd).transpose(0, 1).flatten(1).norm(dim=1)
            scores.append(value * out)
    return scores


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows (or columns) of the kept heads in a q/k/v/o weight."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def prune_bert(model: SentenceEncoder, *, neurons: float = 0.0, heads: float = 0.0) -> SentenceEncoder:
    """A new SentenceEncoder without `neurons` of every layer's intermediate neurons and `heads` of its
    attention heads (at least one of each stays), chosen by weight magnitude."""
    layers = model.encoder.layer
    neuron_keep = [kept_indices(s, neurons) for s in bert_neuron_scores(model)]
    head_keep = [kept_indices(s, heads) for s in bert_head_scores(model)]
    pruned = SentenceEncoder(model.config, [len(k) for k in neuron_keep], [len(k) for k in head_keep])

    def keep_for(key: str) -> torch.Tensor:
        index = int(key.split(".")[2])                 # encoder.layer.{i}.…
        if key.startswith(f"encoder.layer.{index}.attention."):
            return _head_rows(head_keep[index], layers[index].head_dim)
        return neuron_keep[index]
    pruned.load_state_dict(_sliced_state(model, pruned, keep_for), strict=True)
    return pruned.train(model.training)


# ------------------------------------------------------------------------------------- dispatch
def prune_structured(module: nn.Module, unit: str, fraction: float) -> nn.Module:
    """The structurally pruned copy of a module-family model: `unit` "neurons" (channels, neurons)
    or "heads" (attention heads), `fraction` of them removed from every layer."""
    if unit not in UNITS:
        raise InvalidArgument(f"prune.unit must be one of {UNITS}, got {unit!r}", field="prune.unit")
    if isinstance(module, SentenceEncoder):
        return prune_bert(module, **{unit: fraction})
    if isinstance(module, MobileNetV2) and unit == "neurons":
        return prune_mobilenet_hidden(module, fraction)
    from shared.models import cnn                      # lazily: it pulls in the dataset readers
    if isinstance(module, cnn.SmallCNN) and unit == "neurons":
        return cnn.prune_channels(module, fraction)
    raise FailedPrecondition(f"structured pruning of {unit} is not implemented for {type(module).__name__}",
                             reason="UNSUPPORTED_OP", field="prune.unit")
