"""Wanda (Sun et al. 2023, arXiv:2306.11695): pruning by weights and activations, no weight update.

The score of weight W_ij is |W_ij|·‖X_j‖₂, the weight's magnitude times the norm of its input
feature over the calibration tokens: a small weight on a loud input can matter more than a large
one on a quiet input. Scores are compared within each output row (the paper's comparison group:
every output keeps the same number of inputs), or within every m consecutive inputs for N:M.
"""
from __future__ import annotations

import torch

from services.compressor.prune.masks import n_m_mask
from services.compressor.prune.sparsegpt import check_pattern
from shared.errors import InvalidArgument


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖₂ (rows, columns); input_sq_sum (columns,) = Σ over tokens of x_j²."""
    if input_sq_sum.shape != (weight.shape[1],):
        raise InvalidArgument(f"input_sq_sum is {tuple(input_sq_sum.shape)}, expected ({weight.shape[1]},)",
                              field="calibration_stats")
    return weight.detach().float().abs() * input_sq_sum.to(weight.device).float().clamp(min=0).sqrt()


def wanda_mask(weight: torch.Tensor, input_sq_sum: torch.Tensor, *, sparsity: float = 0.5, n: int = 0,
               m: int = 0) -> torch.Tensor:
    """Keep-mask (rows, columns): each row loses round(sparsity·columns) of its lowest scores, or
    keeps n of every m consecutive inputs when n, m > 0."""
    columns = weight.shape[1]
    check_pattern(sparsity, n, m, columns)
    scores = wanda_scores(weight, input_sq_sum)
    if m:
        return n_m_mask(scores, n, m)
    order = torch.argsort(scores, dim=1, stable=True)[:, :round(sparsity * columns)]   # ties: lower index first
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, order, False)
