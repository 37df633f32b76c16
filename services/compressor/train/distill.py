"""Knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").

    L = α · KL(p_T(teacher) ‖ p_T(student)) · T² + (1 − α) · CE(student, labels),   p_T = softmax(logits / T)

the seed's loss (model-compression, chapter 6). T > 1 softens both distributions so the teacher's
ranking of the wrong classes carries signal; the gradient of the KL term shrinks as 1/T², which T²
restores, keeping the two terms on one scale whatever T. The KL is summed over classes and averaged
over examples (PyTorch's "batchmean", the true KL per example). Language-model logits (B, T, V) are
flattened to (B·T, V): every position is an example. Unlabelled data (labels None) needs α = 1.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from services.compressor.train.loop import TrainingConfig, TrainingReport, resolve_device, train
from shared.errors import InvalidArgument


def check_distill(alpha: float, temperature: float, labelled: bool) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgument(f"distill.alpha must be in [0, 1], got {alpha}", field="distill.alpha")
    if not 0.0 < temperature <= 100.0:
        raise InvalidArgument(f"distill.temperature must be in (0, 100], got {temperature}",
                              field="distill.temperature")
    if not labelled and alpha != 1.0:
        raise InvalidArgument(f"distill.alpha is {alpha}, but the data has no labels for the (1 − alpha) "
                              "cross-entropy term; use alpha 1 (pure logit distillation)", field="distill.alpha")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor | None = None, *, alpha: float, temperature: float) -> torch.Tensor:
    """α·KL(p_T(teacher) ‖ p_T(student))·T² + (1 − α)·CE(student, labels). Logits (..., V); labels (...)."""
    check_distill(alpha, temperature, labels is not None)
    if student_logits.shape != teacher_logits.shape:
        raise InvalidArgument(f"student logits {tuple(student_logits.shape)} and teacher logits "
                              f"{tuple(teacher_logits.shape)} differ", field="distill")
    classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, classes).float()                 # (N, V)
    teacher = teacher_logits.reshape(-1, classes).float()
    kl = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                  reduction="batchmean", log_target=True)
    loss = alpha * kl * temperature ** 2
    if labels is not None and alpha < 1.0:
        loss = loss + (1.0 - alpha) * F.cross_entropy(student, labels.reshape(-1))
    return loss


def distill(student: nn.Module, teacher: nn.Module, data: tuple[torch.Tensor, ...], config: TrainingConfig, *,
            alpha: float, temperature: float, masks: dict[str, torch.Tensor] | None = None,
            device: str | None = None) -> TrainingReport:
    """Trains `student` (in place) towards the frozen `teacher` with `loop.train`. data = (inputs, labels)
    or (inputs,) for α = 1; both models take the inputs and return logits (..., V)."""
    check_distill(alpha, temperature, len(data) > 1)
    target = resolve_device(device)
    home = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.to(target).eval()

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, labels = batch[0], (batch[1] if len(batch) > 1 else None)
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        return distillation_loss(model(inputs), teacher_logits, labels, alpha=alpha, temperature=temperature)

    try:
        return train(student, data, loss_fn, config, masks=masks, device=str(target))
    finally:
        teacher.to(home).train(was_training)
