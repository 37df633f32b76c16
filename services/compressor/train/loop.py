"""The one training loop behind fine-tuning, QAT and distillation.

A dataset is a tuple of tensors sharing their first dimension — (images, labels) for a classifier,
(token ids,) for logit distillation of a language model. Each step draws `batch_size` examples
without replacement (a fresh permutation per pass, from `seed`), moves them to the device and asks
`loss_fn(model, batch)` for a scalar. The optimizer is AdamW (Loshchilov & Hutter 2019) with the
learning rate decayed along a cosine to zero over the run, so fine-tuning ends on small steps.

Keep-masks (bool, keyed like `named_parameters()`, True = kept) are applied before the first step and
after every optimizer step, so pruned weights stay exactly zero whatever the optimizer's momentum
says. A mask named "conv.weight" also finds the weight while it is parametrized (QAT, `qat.py`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from shared.errors import InvalidArgument

MAX_STEPS = 10_000_000
MAX_BATCH = 65_536


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """A fine-tuning budget; mirrors edgeforge.v1.TrainingConfig field for field."""
    steps: int = 200                 # optimizer steps (not epochs)
    batch_size: int = 64             # examples per step
    learning_rate: float = 1e-3      # AdamW's starting rate, cosine-decayed to 0 over `steps`
    seed: int = 0                    # fixes the batch order (the initial weights are the model's own)

    def validated(self, field: str = "training") -> "TrainingConfig":
        """Returns self after checking every field; InvalidArgument names it as `field`.steps etc."""
        if not 1 <= self.steps <= MAX_STEPS:
            raise InvalidArgument(f"{field}.steps must be in [1, {MAX_STEPS}], got {self.steps}",
                                  field=f"{field}.steps")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise InvalidArgument(f"{field}.batch_size must be in [1, {MAX_BATCH}], got {self.batch_size}",
                                  field=f"{field}.batch_size")
        if not 0.0 < self.learning_rate <= 1.0:
            raise InvalidArgument(f"{field}.learning_rate must be in (0, 1], got {self.learning_rate}",
                                  field=f"{field}.learning_rate")
        if self.seed < 0:
            raise InvalidArgument(f"{field}.seed must be >= 0, got {self.seed}", field=f"{field}.seed")
        return self


@dataclasses.dataclass
class TrainingReport:
    losses: list[float]              # the loss of every step, in order
    seconds: float
    steps: int
    device: str


def resolve_device(device: str | None) -> torch.device:
    """The named device, or CUDA when present, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def masked_parameters(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, mask) pairs; "a.b.weight" resolves to the original tensor while a.b's weight is
    parametrized. An unknown name or a shape mismatch is InvalidArgument."""
    parameters = dict(model.named_parameters())
    pairs = []
    for name, mask in masks.items():
        parameter = parameters.get(name)
        if parameter is None:
            module_name, _, attribute = name.rpartition(".")
            try:
                module = model.get_submodule(module_name)
            except AttributeError as error:
                raise InvalidArgument(f"mask {name!r} names no module of the model", field="masks") from error
            if not parametrize.is_parametrized(module, attribute):
                raise InvalidArgument(f"mask {name!r} names no parameter of the model", field="masks")
            parameter = module.parametrizations[attribute].original
        if tuple(mask.shape) != tuple(parameter.shape):
            raise InvalidArgument(f"mask {name!r} is {tuple(mask.shape)}, the parameter {tuple(parameter.shape)}",
                                  field="masks")
        pairs.append((parameter, mask))
    return pairs


def apply_kept(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for parameter, mask in pairs:
            parameter.mul_(mask)


def batch_indices(examples: int, config: TrainingConfig):
    """Yields config.steps index tensors of config.batch_size (the last of a pass may be shorter)."""
    order = torch.Generator().manual_seed(config.seed)
    produced = 0
    while True:
        for indices in torch.randperm(examples, generator=order).split(config.batch_size):
            if produced == config.steps:
                return
            produced += 1
            yield indices


def train(model: nn.Module, data: tuple[torch.Tensor, ...], loss_fn: Callable[[nn.Module, tuple], torch.Tensor],
          config: TrainingConfig, *, masks: dict[str, torch.Tensor] | None = None,
          device: str | None = None) -> TrainingReport:
    """Trains `model` in place for config.steps AdamW steps on batches of `data`, holding `masks`.
    The model trains on `device` (default: CUDA when present) and is returned to its own device after."""
    config.validated()
    if not data or any(len(t) != len(data[0]) for t in data) or len(data[0]) == 0:
        raise InvalidArgument(f"training data must be non-empty tensors of one length, got lengths "
                              f"{[len(t) for t in data]}", field="dataset")
    target = resolve_device(device)
    home = next(model.parameters()).device
    was_training = model.training
    model.to(target).train()
    pairs = [(p, m.to(device=target, dtype=p.dtype)) for p, m in masked_parameters(model, masks or {})]
    apply_kept(pairs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    losses = []
    started = time.perf_counter()
    for indices in batch_indices(len(data[0]), config):
        loss = loss_fn(model, tuple(t[indices].to(target) for t in data))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        apply_kept(pairs)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    model.to(home).train(was_training)
    return TrainingReport(losses, seconds, len(losses), str(target))
