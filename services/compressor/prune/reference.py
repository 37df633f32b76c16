"""Slow, obvious twins of the pruning kernels, for tests: float64, explicit inverses, no batching."""
from __future__ import annotations

import torch

from services.compressor.prune.masks import drop_smallest, n_m_mask


def sparsegpt_reference(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float = 0.5, n: int = 0,
                        m: int = 0, block_size: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT as the paper states it: at column j, with F = the columns j.. not yet visited and
    Hinv = (H_FF)⁻¹ inverted outright, prune by w²/Hinv_00 and update W[:, F] −= (w − p)/Hinv_00 ⊗ Hinv[0].
    Returns (weight, keep-mask)."""
    W = weight.double().clone()
    H = hessian.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diagonal(H).mean() * torch.eye(len(H), dtype=H.dtype)
    rows, columns = W.shape
    keep = torch.ones((rows, columns), dtype=torch.bool)

    def diagonal_of_inverse(j: int) -> float:
        return float(torch.linalg.inv(H[j:, j:])[0, 0])
    for j in range(columns):
        if not m and j % block_size == 0:
            stop = min(j + block_size, columns)
            d = torch.tensor([diagonal_of_inverse(k) for k in range(j, stop)], dtype=H.dtype)
            saliency = W[:, j:stop].pow(2) / d
            keep[:, j:stop] = drop_smallest(saliency, round(sparsity * saliency.numel())).reshape(saliency.shape)
        if m and j % m == 0:
            d = torch.tensor([diagonal_of_inverse(k) for k in range(j, j + m)], dtype=H.dtype)
            keep[:, j:j + m] = n_m_mask(W[:, j:j + m].pow(2) / d, n, m)
        Hinv = torch.linalg.inv(H[j:, j:])
        pruned = W[:, j] * keep[:, j]
        W[:, j:] -= torch.outer((W[:, j] - pruned) / Hinv[0, 0], Hinv[0])
        W[:, j] = pruned
    return W.float(), keep
