"""Fidelity of freshly trained students on the sample bank's held-out pairs, beside the class-mean baseline.

Distillation runs this before anything is written (the numbers land in the manifest's `metrics`); the
per-mechanism scores (`fidelity`) are shared with the evaluation of shipped versions (fidelity.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.atomic import atomic_path
from core.manifest import MECHANISM_OUTPUTS, value_range
from core.fidelity import mask_iou, mean_l1, psnr, summarise_psnr
from training.bank import Bank
from training.students import TinyGenerator

# The bank is read a batch at a time: at 256 px a whole held-out split is GBs.
EVAL_BATCH = 32
BASELINE_MEMORY = 256 << 20  # bytes of per-class float64 sums the class-mean baseline holds at once
COMPARISON_COLUMNS = 10


def predict(student: TinyGenerator, z: np.ndarray, y: np.ndarray, device: torch.device, batch: int = 500) -> np.ndarray:
    with torch.no_grad():
        parts = [student(torch.from_numpy(z[i:i + batch]).to(device), torch.from_numpy(y[i:i + batch]).to(device)).cpu()
                 for i in range(0, len(z), batch)]
    return torch.cat(parts).numpy()


def class_means(bank: Bank, key: str, classes: np.ndarray, limit: int = 10000) -> np.ndarray:
    """[len(classes), ...] mean teacher output of each (sorted) label over the first `limit` training
    samples, zeros for a label never seen; reads only those labels' samples, a batch at a time."""
    y = bank.load(["y"], limit)["y"]
    rows = np.flatnonzero(np.isin(y, classes))
    sums = np.zeros((len(classes), *bank.take([key], [0])[key].shape[1:]), np.float64)
    counts = np.zeros(len(classes), np.int64)
    for start in range(0, len(rows), EVAL_BATCH):
        batch = rows[start:start + EVAL_BATCH]
        values, slots = bank.take([key], batch)[key], np.searchsorted(classes, y[batch])
        for slot in np.unique(slots):
            sums[slot] += values[slots == slot].sum(axis=0)
            counts[slot] += int((slots == slot).sum())
    return (sums / np.maximum(counts, 1).reshape(-1, *[1] * (sums.ndim - 1))).astype(np.float32)


def fidelity_scores(mechanism: str, student_out: np.ndarray, teacher_out: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample scores, so that batches pool into exactly the whole-set summary."""
    if mechanism == "shape":
        return {"mask_iou": mask_iou(student_out, teacher_out), "l1": mean_l1(student_out, teacher_out)}
    return {"l1": mean_l1(student_out, teacher_out), "psnr": psnr(student_out, teacher_out)}


def summarise_scores(batches: list[dict[str, np.ndarray]]) -> dict:
    pooled = {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}
    return {name: summarise_psnr(values) if name == "psnr" else float(values.mean()) for name, values in pooled.items()}


def fidelity(mechanism: str, student_out: np.ndarray, teacher_out: np.ndarray) -> dict:
    return summarise_scores([fidelity_scores(mechanism, student_out, teacher_out)])


def evaluate(students: dict[str, TinyGenerator], bank: Bank, heldout: Bank, limit: int, device: torch.device) -> dict:
    """Each student and the class-mean baseline (each label's mean teacher output: the floor a student must
    clearly beat) against the teacher on the first `limit` held-out pairs, streamed in batches."""
    y_eval = heldout.load(["y"], limit)["y"]
    metrics = {"heldout_pairs": int(len(y_eval))}
    for mechanism, student in students.items():
        key = MECHANISM_OUTPUTS[mechanism]
        student_scores, baseline_scores = [], []
        for start in range(0, len(y_eval), EVAL_BATCH):
            data = heldout.take(["z", "y", key], np.arange(start, min(start + EVAL_BATCH, len(y_eval))))
            student_scores.append(fidelity_scores(mechanism, predict(student, data["z"], data["y"], device), data[key]))
        labels = np.unique(y_eval)
        per_label_bytes = 8 * int(np.prod(heldout.take([key], [0])[key].shape[1:]))
        group = max(1, BASELINE_MEMORY // per_label_bytes)
        for first in range(0, len(labels), group):
            classes = labels[first:first + group]
            means = class_means(bank, key, classes)
            rows = np.flatnonzero(np.isin(y_eval, classes))
            for start in range(0, len(rows), EVAL_BATCH):
                batch = rows[start:start + EVAL_BATCH]
                predicted = means[np.searchsorted(classes, y_eval[batch])]
                baseline_scores.append(fidelity_scores(mechanism, predicted, heldout.take([key], batch)[key]))
        metrics[mechanism] = {**summarise_scores(student_scores),
                              "class_mean_baseline": summarise_scores(baseline_scores)}
    return metrics


def render_comparison(students: dict[str, TinyGenerator], heldout: Bank, device: torch.device, path: Path) -> None:
    """Teacher row above student row for each mechanism, one column per label (the first
    COMPARISON_COLUMNS labels present), same (z, y)."""
    from core.imageio import encode, labelled_rows, to_uint8

    _, first = np.unique(heldout.load(["y"])["y"], return_index=True)
    data = heldout.take(["z", "y"] + [MECHANISM_OUTPUTS[m] for m in students], first[:COMPARISON_COLUMNS])
    rows = []
    for mechanism, student in students.items():
        teacher_out = data[MECHANISM_OUTPUTS[mechanism]]
        student_out = predict(student, data["z"], data["y"], device)
        rows += [to_uint8(teacher_out, value_range(mechanism)), to_uint8(student_out, value_range(mechanism))]
    scale = max(1, 96 // teacher_out.shape[-1])  # 32-px MNIST grids are upscaled to stay legible
    with atomic_path(path) as tmp:
        tmp.write_bytes(encode(labelled_rows(rows, columns=len(data["y"]), scale=scale)))
