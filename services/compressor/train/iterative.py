"""Iterative magnitude pruning with fine-tuning between steps (Han et al. 2015, "Learning both
Weights and Connections"; Zhu & Gupta 2017 for gradual schedules).

For each sparsity of an increasing schedule: keep-masks by |w| at that sparsity
(`services.compressor.prune.masks.magnitude_masks`, per layer or global), zero the pruned weights, then fine-tune with
the masks held so the surviving weights take over the removed ones' work before the next cut. Weights
pruned earlier are zero and therefore the smallest, so each step's mask lies inside the previous one.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from services.compressor.prune.masks import SCOPES, apply_masks, check_sparsity, magnitude_masks, prunable_weights
from services.compressor.train.loop import TrainingConfig, TrainingReport, train
from shared.errors import InvalidArgument


@dataclasses.dataclass
class StepResult:
    sparsity: float                  # the schedule's target for this step
    achieved: float                  # zero weights / prunable weights after fine-tuning
    training: TrainingReport
    quality: float | None = None     # `evaluate(model)` after the step, when given


def check_schedule(schedule: list[float]) -> None:
    if not schedule:
        raise InvalidArgument("prune.schedule needs at least one sparsity", field="prune.schedule")
    for sparsity in schedule:
        check_sparsity(sparsity)
    if any(b <= a for a, b in zip(schedule, schedule[1:])):
        raise InvalidArgument(f"prune.schedule must increase strictly, got {list(schedule)}",
                              field="prune.schedule")


def zero_fraction(weights: dict[str, torch.Tensor]) -> float:
    total = sum(w.numel() for w in weights.values())
    return sum(int((w == 0).sum()) for w in weights.values()) / total if total else 0.0


def iterative_prune(model: nn.Module, schedule: list[float], finetune: TrainingConfig, data: tuple[torch.Tensor, ...],
                    loss_fn: Callable[[nn.Module, tuple], torch.Tensor], *, scope: str = "per_layer",
                    skip: tuple[str, ...] = (), evaluate: Callable[[nn.Module], float] | None = None,
                    device: str | None = None) -> list[StepResult]:
    """Prunes `model` in place along `schedule`, fine-tuning for `finetune` after every cut. Every step's
    fine-tuning uses the same budget, with its seed offset by the step index (a fresh batch order)."""
    check_schedule(schedule)
    if scope not in SCOPES:
        raise InvalidArgument(f"prune.scope must be one of {SCOPES}, got {scope!r}", field="prune.scope")
    finetune.validated("prune.finetune")
    results = []
    for step, sparsity in enumerate(schedule):
        weights = prunable_weights(model, skip)
        masks = magnitude_masks(weights, sparsity, scope=scope)
        apply_masks(model, masks)
        config = dataclasses.replace(finetune, seed=finetune.seed + step)
        report = train(model, data, loss_fn, config, masks=masks, device=device)
        quality = evaluate(model) if evaluate is not None else None
        results.append(StepResult(sparsity, zero_fraction(prunable_weights(model, skip)), report, quality))
    return results
