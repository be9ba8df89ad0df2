"""The four SKDCGN loss terms: pixel L1, hinge adversarial, discriminator-feature L1 and a KL term.

KL formulation (our choice): each output pixel is read as a Bernoulli probability — the mask as is, an
image mapped from [-1, 1] to [0, 1] — and we take the mean per-pixel KL(teacher ‖ student). Why: it is a
true divergence between the teacher's and the student's outputs (zero only when they agree), it is
stationary (unlike a KL over discriminator features, which move while D trains, the variant the public
SKDCGN code computed and then never used), and its gradient grows where the student is confidently
wrong near 0 or 1, which is exactly where a binarised mask's IoU is decided.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

FEATURE_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
KL_EPS = 1e-4


def pixel_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).abs().mean()


def hinge_discriminator(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """relu(1 − D(T)) + relu(1 + D(S)), averaged over the batch."""
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


def hinge_generator(fake_scores: torch.Tensor) -> torch.Tensor:
    return -fake_scores.mean()


def feature_l1(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    weights: Sequence[float] = FEATURE_WEIGHTS,
) -> torch.Tensor:
    """Σ_l α_l · mean |D_l(T) − D_l(S)| over the discriminator's conv outputs."""
    if not len(student_features) == len(teacher_features) == len(weights):
        raise ValueError(
            f"need one weight per feature layer: {len(weights)} weights, {len(student_features)} layers"
        )
    return sum(w * (s - t).abs().mean() for w, s, t in zip(weights, student_features, teacher_features))


def to_probability(values: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    low, high = value_range
    return ((values - low) / (high - low)).clamp(KL_EPS, 1.0 - KL_EPS)


def bernoulli_kl(student: torch.Tensor, teacher: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Mean per-pixel KL(Bern(t) ‖ Bern(s)) with outputs mapped from `value_range` to probabilities."""
    p = to_probability(teacher, value_range)
    q = to_probability(student, value_range)
    kl = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
    return kl.mean()
