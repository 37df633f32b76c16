"""SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774, Alg. 1): one-shot pruning with OBS updates.

For W (rows, columns) with input Hessian H = XᵀX/N, columns are visited left to right as in GPTQ
(services/compressor/quant/gptq.py, whose Hessian helpers this reuses). With U the upper Cholesky
factor of (H + λI)⁻¹, U_jj² is [H_F⁻¹]_jj of the columns F not yet visited, so at column j

    mask:    prune the weights with the smallest  w² / U_jj²      (the OBS saliency)
    update:  e = (w_j − p_j) / U_jj ;   W[:, j+1:] −= e ⊗ U[j, j+1:]

where p_j is column j with its pruned weights set to zero: the kept weights to the right absorb
the error. The mask is chosen adaptively, per block of `block_size` columns on the weights as the
earlier blocks' updates left them (unstructured: the block's round(sparsity·rows·block) smallest
saliencies), or per group of m columns for N:M (each row keeps its n most salient of the m).
Updates to later blocks are applied lazily, one matmul per block, as in GPTQ.
`reference.sparsegpt_reference` is the slow twin (float64, explicit inverses, no batching).
"""
from __future__ import annotations

import dataclasses

import torch

from services.compressor.prune.masks import check_n_m, check_sparsity, drop_smallest, n_m_mask
from services.compressor.quant.gptq import inverse_cholesky, prepare_hessian, relative_output_error
from shared.errors import InvalidArgument


@dataclasses.dataclass
class PruneResult:
    weight: torch.Tensor             # (rows, columns) float32, pruned weights set to zero
    mask: torch.Tensor               # (rows, columns) bool, True where kept
    output_error: float              # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), undamped H


def check_pattern(sparsity: float, n: int, m: int, columns: int) -> None:
    """Unstructured (n = m = 0) needs sparsity in [0, 1); N:M needs both n and m."""
    if n or m:
        check_n_m(n, m, columns)
    else:
        check_sparsity(sparsity)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float = 0.5, n: int = 0, m: int = 0,
              block_size: int = 128, damp: float = 0.01, name: str = "weight") -> PruneResult:
    """Prunes W (rows, columns) at `sparsity`, or to n of every m along the columns when n, m > 0."""
    rows, columns = weight.shape
    check_pattern(sparsity, n, m, columns)
    if m and block_size % m:
        raise InvalidArgument(f"block_size {block_size} must be a multiple of m={m}", field="prune.m")
    original, H_original = weight.float(), hessian.to(weight.device).float()
    H, W = prepare_hessian(H_original, weight, name)       # dead inputs: weight 0, pruned first
    U = inverse_cholesky(H, damp, name)
    keep = torch.ones((rows, columns), dtype=torch.bool, device=W.device)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)                             # (B,)
        keep1 = keep[:, i1:i2]
        if not m:                                          # adaptive mask over the whole block
            saliency = W1.pow(2) / d.pow(2)
            keep1.copy_(drop_smallest(saliency, round(sparsity * saliency.numel())).reshape(W1.shape))
        for i in range(i2 - i1):
            if m and i % m == 0:                           # N:M: decided when the group's first column comes
                saliency = W1[:, i:i + m].pow(2) / d[i:i + m].pow(2)
                keep1[:, i:i + m] = n_m_mask(saliency, n, m)
            w = W1[:, i]
            err = (w - w * keep1[:, i]) / d[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)    # OBS update of this and the later columns
            E1[:, i] = err
        W[:, i1:i2] = W1 * keep1                           # column i's own update zeroes its pruned weights
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return PruneResult(W, keep, relative_output_error(original, W, H_original))
