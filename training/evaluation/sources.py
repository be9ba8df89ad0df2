"""The teacher (PyTorch) and a shipped student version (onnxruntime) behind one interface.

Evaluation feeds both the same (z, y) drawn by core.noise, so every difference in their outputs is the
students' doing. Students are loaded exactly as they ship: manifest checked, ONNX files sha256-verified.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from core.manifest import load_manifest, resolve_version, verify_files
from core.noise import MECHANISMS, NoiseSpec
from core.onnx_session import session_options
from training.teachers.cgn_mnist import TEACHERS

Runner = Callable[[str, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Source:
    """Something that maps (mechanism, z [B, Z], y [B]) to a mechanism output, plus how to compose it."""

    name: str
    noise: NoiseSpec
    image_size: int
    texture_shuffle: bool
    run: Runner


def teacher_for_family(family: str) -> str:
    """The teacher name (`double_colored`) of a family (`double_colored_mnist`)."""
    for name, info in TEACHERS.items():
        if info.family == family:
            return name
    raise ValueError(f"no teacher for family {family!r}; known: {', '.join(info.family for info in TEACHERS.values())}")


def teacher_source(family: str, teacher_path: str | os.PathLike | None = None, device: str = "cpu") -> Source:
    from training.teachers.loading import load_teacher_adapter

    adapter = load_teacher_adapter(teacher_for_family(family), teacher_path, device=device)
    return Source(f"teacher:{adapter.name}", adapter.noise, adapter.image_size, adapter.texture_shuffle, adapter.query)


class OnnxStudents:
    """One verified version of a family: an onnxruntime session per mechanism, and the fused one when shipped."""

    def __init__(self, version_dir: str | os.PathLike, threads: int = 0, providers: list[str] | None = None):
        import onnxruntime as ort

        self.directory = Path(version_dir)
        self.manifest = load_manifest(self.directory)
        verify_files(self.directory, self.manifest)
        self.family, self.version = self.manifest["family"], self.manifest["version"]
        providers = providers or ["CPUExecutionProvider"]
        options = session_options(threads)
        self.sessions = {
            m: ort.InferenceSession(str(self.directory / block["file"]), options, providers=providers)
            for m, block in self.manifest["mechanisms"].items()
        }
        fused = self.manifest.get("fused")
        self.fused = (
            ort.InferenceSession(str(self.directory / fused["file"]), options, providers=providers) if fused else None
        )
        self.output_names = {m: next(iter(b["outputs"])) for m, b in self.manifest["mechanisms"].items()}

    def run(self, mechanism: str, z: np.ndarray, y: np.ndarray, batch: int = 1000) -> np.ndarray:
        session = self.sessions[mechanism]
        parts = [
            session.run(None, {"z": np.ascontiguousarray(z[i:i + batch]), "y": np.ascontiguousarray(y[i:i + batch])})[0]
            for i in range(0, len(z), batch)
        ]
        return np.concatenate(parts)

    def run_fused(self, z: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All three mechanisms in one call of the fused graph."""
        feeds = {f"z_{m}": z[m] for m in MECHANISMS} | {f"y_{m}": y[m] for m in MECHANISMS}
        outputs = self.fused.run([self.output_names[m] for m in MECHANISMS], feeds)
        return dict(zip(MECHANISMS, outputs))

    def source(self) -> Source:
        return Source(
            f"student:{self.family}/{self.version}", NoiseSpec.from_manifest(self.manifest["noise"]),
            int(self.manifest["image_size"]), bool(self.manifest["texture_shuffle"]), self.run,
        )


def load_students(models_dir: str | os.PathLike, family: str, version: str | None = None, threads: int = 0) -> OnnxStudents:
    """The version `version` of `family` (LATEST when None) from a model repository."""
    _, directory = resolve_version(models_dir, family, version)
    return OnnxStudents(directory, threads)
