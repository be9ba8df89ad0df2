"""The teacher (PyTorch) and a shipped student version (onnxruntime) behind one interface.

Evaluation feeds both the same (z, y) drawn by core.noise, so every difference in their outputs is the
students' doing. Students run exactly as the service runs them: through core.runtime.ModelRuntime (manifest
checked, ONNX files sha256-verified, input and output names from the manifest), long inputs in batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from core.noise import NoiseSpec
from training.teachers.cgn_mnist import teacher_for_family

if TYPE_CHECKING:  # core.runtime imports onnxruntime: only the student side needs it
    from core.runtime import ModelRuntime

Runner = Callable[[str, np.ndarray, np.ndarray], np.ndarray]
BATCH = 1000  # samples per onnxruntime call when a source runs a long input


@dataclass
class Source:
    """Something that maps (mechanism, z [B, Z], y [B]) to a mechanism output, plus how to compose it."""

    name: str
    noise: NoiseSpec
    image_size: int
    texture_shuffle: bool
    run: Runner


def teacher_source(family: str, teacher_path: str | os.PathLike | None = None, device: str = "cpu") -> Source:
    from training.teachers.loading import load_teacher_adapter

    adapter = load_teacher_adapter(teacher_for_family(family), teacher_path, device=device)
    return Source(f"teacher:{adapter.name}", adapter.noise, adapter.image_size, adapter.texture_shuffle, adapter.query)


def student_source(runtime: ModelRuntime, batch: int = BATCH) -> Source:
    """A shipped student version as a Source: its mechanisms run through `runtime`, `batch` samples per call."""

    def run(mechanism: str, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        parts = [runtime.run(mechanism, z[i:i + batch], y[i:i + batch]) for i in range(0, len(z), batch)]
        return np.concatenate(parts)

    return Source(f"student:{runtime.name}", runtime.noise, runtime.image_size, runtime.texture_shuffle, run)
