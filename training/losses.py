"""The four SKDCGN loss terms: pixel L1, hinge adversarial, discriminator-feature L1 and a KL term, and a fifth
of ours for the mask: a soft IoU against the teacher's mask binarised where the fidelity metric binarises it.

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
MASK_THRESHOLD = 0.5  # core.fidelity.mask_iou's default: where held-out mask IoU binarises both masks


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


def soft_iou_loss(student: torch.Tensor, teacher: torch.Tensor, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """1 − mean per-sample soft IoU of the student's mask against the teacher's binarised at `threshold`.

    Why: pixel L1 and KL weigh every pixel alike, so a small digit's few boundary pixels count for little, while
    the held-out metric is a per-sample IoU of binarised masks. This term is that metric made differentiable
    (Σ s·t / Σ (s + t − s·t), the Jaccard loss): each sample weighs by its own union. Two empty masks score 1.
    """
    target = (teacher > threshold).to(student.dtype).flatten(1)
    mask = student.flatten(1)
    intersection = (mask * target).sum(1)
    union = (mask + target - mask * target).sum(1)
    return 1.0 - ((intersection + 1e-6) / (union + 1e-6)).mean()
