"""Fidelity numbers of a student against its teacher (mask IoU, L1, PSNR), shared by distillation and evaluation
(numpy only). Not to be confused with the Prometheus metrics of service/metrics.py and workers/metrics.py."""
from __future__ import annotations

import numpy as np


def mask_iou(mask_a: np.ndarray, mask_b: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per-sample IoU of the masks binarised at `threshold`; two empty masks count as a perfect match."""
    a = mask_a.reshape(len(mask_a), -1) > threshold
    b = mask_b.reshape(len(mask_b), -1) > threshold
    intersection = (a & b).sum(axis=1)
    union = (a | b).sum(axis=1)
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def mean_l1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample mean absolute difference."""
    return np.abs(a - b).reshape(len(a), -1).mean(axis=1)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> np.ndarray:
    """Per-sample PSNR in dB; images in [-1, 1] have data_range 2. Identical images give +inf."""
    mse = ((a.astype(np.float64) - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def summarise_psnr(values: np.ndarray) -> float:
    """Mean PSNR with infinite values (exact matches) capped at 100 dB, so the mean stays finite."""
    return float(np.mean(np.minimum(values, 100.0)))
