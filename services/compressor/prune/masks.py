"""Keep-masks for pruning: magnitude (per layer or global), N:M, and applying them to a module.

A mask is a bool tensor shaped like its weight, True where the weight is kept. Counts are exact:
at sparsity s a tensor of n elements loses round(s·n) of them, whatever the ties — among equal
magnitudes the one that comes first in flattened (row-major) order goes first, so the same weights
always give the same mask. N:M (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks")
keeps the n largest scores of every m consecutive weights along the input (last) dimension, the
layout sparse tensor cores and 2:4 kernels read.
"""
from __future__ import annotations

import torch
from torch import nn

from shared.errors import InvalidArgument

SCOPES = ("per_layer", "global")


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise InvalidArgument(f"prune.sparsity must be in [0, 1), got {sparsity}", field="prune.sparsity")


def check_n_m(n: int, m: int, columns: int) -> None:
    """n of every m: 0 < n < m, and the input dimension must split into whole groups of m."""
    if m <= 0 or not 0 < n < m:
        raise InvalidArgument(f"N:M pruning needs 0 < n < m, got n={n}, m={m}", field="prune.n")
    if columns % m:
        raise InvalidArgument(f"the input dimension {columns} does not divide into groups of m={m}",
                              field="prune.m")


def drop_smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Flat keep-mask that drops the `count` smallest scores; ties go in index order."""
    flat = scores.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if count:
        keep[torch.argsort(flat, stable=True)[:count]] = False
    return keep


def smallest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask shaped like `scores` that drops exactly round(sparsity·numel) of the smallest."""
    check_sparsity(sparsity)
    return drop_smallest(scores, round(sparsity * scores.numel())).reshape(scores.shape)


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, *,
                    scope: str = "per_layer") -> dict[str, torch.Tensor]:
    """Keep-masks by |w|. per_layer: each tensor loses round(sparsity·numel) of its smallest weights;
    global: one threshold over all tensors together, so round(sparsity·total) go in all, more from
    the layers whose weights are small."""
    check_sparsity(sparsity)
    if scope == "per_layer":
        return {name: smallest_mask(w.detach().abs(), sparsity) for name, w in weights.items()}
    if scope != "global":
        raise InvalidArgument(f"prune.scope must be one of {SCOPES}, got {scope!r}", field="prune.scope")
    if not weights:
        return {}
    flat = torch.cat([w.detach().abs().reshape(-1).float().cpu() for w in weights.values()])
    keep = drop_smallest(flat, round(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start:start + w.numel()].reshape(w.shape).to(w.device)
        start += w.numel()
    return masks


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keeps the n highest scores of every m consecutive entries along the last dimension."""
    check_n_m(n, m, scores.shape[-1])
    groups = scores.reshape(-1, m)                                   # (groups, m)
    order = torch.argsort(groups, dim=1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    return keep.reshape(scores.shape)


def prunable_weights(module: nn.Module, skip: tuple[str, ...] | list[str] = ()) -> dict[str, nn.Parameter]:
    """Weights of every nn.Linear and nn.Conv2d, keyed like named_parameters(). Embeddings, norms
    and biases are never included, nor a linear whose weight is tied to an embedding (it is the
    embedding). `skip` names modules left dense (e.g. "lm_head", "classifier") and their children."""
    embedded = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    weights = {}
    for name, child in module.named_modules():
        if not isinstance(child, (nn.Linear, nn.Conv2d)) or id(child.weight) in embedded:
            continue
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        weights[f"{name}.weight" if name else "weight"] = child.weight
    return weights


def apply_masks(module: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zeroes the pruned weights in place. Keys are parameter names as named_parameters() gives them."""
    params = dict(module.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise InvalidArgument(f"no parameter named {name!r} to mask", field="prune")
        p = params[name]
        if tuple(mask.shape) != tuple(p.shape):
            raise InvalidArgument(f"mask for {name} is {tuple(mask.shape)}, the weight {tuple(p.shape)}",
                                  field="prune")
        with torch.no_grad():
            p.mul_(mask.to(device=p.device, dtype=p.dtype))


def sparsity_of(mask: torch.Tensor) -> float:
    """Share of pruned entries (False) in a keep-mask."""
    return 1.0 - float(mask.sum()) / mask.numel() if mask.numel() else 0.0
