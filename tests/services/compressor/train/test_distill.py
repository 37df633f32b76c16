"""Distillation: the loss against hand arithmetic and the seed's own function, and a student that learns its teacher."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from services.compressor.train.distill import distill, distillation_loss
from services.compressor.train.loop import TrainingConfig
from shared.errors import InvalidArgument

# Two examples, two classes. Example 0: student uniform, teacher (ln 3, 0); example 1 the other way round.
STUDENT = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
TEACHER = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
LABELS = torch.tensor([0, 1])


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def seed_distillation_loss(student_logits, teacher_logits, labels, alpha=0.7, T=3.0):
    """The seed's function (model-compression, chapter 6), as printed there."""
    soft_student = nn.functional.log_softmax(student_logits / T, dim=-1)
    soft_teacher = nn.functional.softmax(teacher_logits / T, dim=-1)
    kl = nn.functional.kl_div(soft_student, soft_teacher, reduction='batchmean') * T**2
    ce = nn.functional.cross_entropy(student_logits, labels)
    return alpha * kl + (1 - alpha) * ce


def test_kl_term_by_hand_with_the_t_squared_factor():
    # T = 1: example 0 is KL((3/4, 1/4) ‖ (1/2, 1/2)) = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.130812;
    # example 1 is KL((1/2, 1/2) ‖ (3/4, 1/4)) = 0.5 ln(2/3) + 0.5 ln 2 = 0.143841; batchmean 0.137327.
    assert kl([0.75, 0.25], [0.5, 0.5]) == pytest.approx(0.130812, abs=1e-6)
    one = distillation_loss(STUDENT, TEACHER, alpha=1.0, temperature=1.0)
    assert one.item() == pytest.approx((0.130812 + 0.143841) / 2, abs=1e-6)
    # T = 2: the logits halve, so ln 3 becomes ln √3: p = (√3, 1)/(√3 + 1) = (0.633975, 0.366025);
    # KL = 0.036341 and 0.037252 (batchmean 0.036797), times T² = 4: 0.147186.
    r3 = math.sqrt(3.0)
    soft = [r3 / (r3 + 1), 1 / (r3 + 1)]
    expected = 4 * (kl(soft, [0.5, 0.5]) + kl([0.5, 0.5], soft)) / 2
    assert expected == pytest.approx(0.147186, abs=1e-6)
    assert distillation_loss(STUDENT, TEACHER, alpha=1.0, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)


def test_alpha_extremes_and_the_mixture():
    # Cross-entropy alone (α = 0): example 0 is −ln ½ = ln 2; example 1 (label 1 under (3/4, 1/4)) is ln 4.
    ce = (math.log(2.0) + math.log(4.0)) / 2
    assert distillation_loss(STUDENT, TEACHER, LABELS, alpha=0.0, temperature=2.0).item() == pytest.approx(ce)
    kd = distillation_loss(STUDENT, TEACHER, LABELS, alpha=1.0, temperature=2.0).item()
    assert kd == pytest.approx(0.147186, abs=1e-6)                  # labels are ignored at α = 1
    mixed = distillation_loss(STUDENT, TEACHER, LABELS, alpha=0.7, temperature=2.0).item()
    assert mixed == pytest.approx(0.7 * 0.147186 + 0.3 * ce, abs=1e-6)


def test_matches_the_seeds_function():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 10, generator=generator), torch.randn(16, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (16,), generator=generator)
    for alpha, temperature in [(0.7, 3.0), (0.0, 1.0), (1.0, 5.0), (0.5, 0.5)]:
        ours = distillation_loss(student, teacher, labels, alpha=alpha, temperature=temperature)
        theirs = seed_distillation_loss(student, teacher, labels, alpha=alpha, T=temperature)
        torch.testing.assert_close(ours, theirs)


def test_language_model_logits_are_flattened_over_positions():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 3, 7, generator=generator), torch.randn(2, 3, 7, generator=generator)
    whole = distillation_loss(student, teacher, alpha=1.0, temperature=2.0)
    per_position = [distillation_loss(student[b, t:t + 1], teacher[b, t:t + 1], alpha=1.0, temperature=2.0)
                    for b in range(2) for t in range(3)]
    torch.testing.assert_close(whole, torch.stack(per_position).mean())


@pytest.mark.parametrize("kwargs, field, message", [
    ({"alpha": 1.5, "temperature": 1.0}, "distill.alpha", r"in \[0, 1\]"),
    ({"alpha": 0.5, "temperature": 0.0}, "distill.temperature", r"in \(0, 100\]"),
    ({"alpha": 0.5, "temperature": 2.0}, "distill.alpha", "no labels"),
])
def test_arguments_are_validated(kwargs, field, message):
    with pytest.raises(InvalidArgument, match=message) as raised:
        distillation_loss(STUDENT, TEACHER, **kwargs)
    assert raised.value.field == field


def test_a_student_learns_its_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    student = nn.Linear(6, 4)
    frozen = copy.deepcopy(teacher.state_dict())
    x = torch.randn(512, 6)
    with torch.no_grad():
        before = F.kl_div(F.log_softmax(student(x), -1), F.log_softmax(teacher(x), -1), reduction="batchmean",
                          log_target=True).item()
    teacher.train()
    report = distill(student, teacher, (x,), TrainingConfig(steps=150, batch_size=64, learning_rate=3e-2),
                     alpha=1.0, temperature=2.0, device="cpu")
    with torch.no_grad():
        after = F.kl_div(F.log_softmax(student(x), -1), F.log_softmax(teacher(x), -1), reduction="batchmean",
                         log_target=True).item()
        agree = (student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean().item()
    assert after < 0.3 * before and agree > 0.8 and report.steps == 150
    assert teacher.training and all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(InvalidArgument, match="no labels"):
        distill(student, teacher, (x,), TrainingConfig(steps=1), alpha=0.5, temperature=2.0, device="cpu")
