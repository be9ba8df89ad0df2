"""One black-box interface over every teacher family, so the bank, distillation and export never special-case one."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from core.noise import NoiseSpec
from training.teachers.cgn_mnist import IMAGE_SIZE, LATENT_DIM, N_CLASSES, TEACHERS, TeacherError, load_teacher

__all__ = ["TeacherAdapter", "TeacherError", "load_teacher_adapter", "teacher_names"]


@dataclass
class TeacherAdapter:
    name: str
    family: str
    sha256: str
    parameters: int
    n_classes: int
    image_size: int
    noise: NoiseSpec
    texture_shuffle: bool
    label_names: list[str]
    mechanisms: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    device: torch.device
    default_channels: list[int] = field(default_factory=lambda: [128, 64, 32, 16])
    query_batch: int = 1000

    def query(self, mechanism: str, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """T_mechanism(z, y) as float32 numpy, computed in batches on the teacher's device."""
        function = self.mechanisms[mechanism]
        outputs = []
        with torch.no_grad():
            for start in range(0, len(z), self.query_batch):
                zb = torch.from_numpy(np.ascontiguousarray(z[start:start + self.query_batch])).to(self.device)
                yb = torch.from_numpy(np.ascontiguousarray(y[start:start + self.query_batch])).to(self.device)
                outputs.append(function(zb, yb).float().cpu().numpy())
        return np.concatenate(outputs)

    def draw_z(self, rng: np.random.Generator, count: int) -> np.ndarray:
        from core.noise import draw_z

        return np.stack([draw_z(rng, self.noise) for _ in range(count)])

    def student_channels(self) -> dict:
        return {"channels": list(self.default_channels)}


def teacher_names() -> list[str]:
    return sorted(TEACHERS)


def load_teacher_adapter(name: str, path=None, allow_unknown: bool = False, device="cpu") -> TeacherAdapter:
    if name not in TEACHERS:
        raise TeacherError(f"unknown teacher {name!r}; choose one of {', '.join(teacher_names())}")
    model = load_teacher(name, path, allow_unknown=allow_unknown, device=device)
    return TeacherAdapter(
        name=name,
        family=TEACHERS[name].family,
        sha256=model.sha256,
        parameters=sum(p.numel() for p in model.parameters()),
        n_classes=N_CLASSES,
        image_size=IMAGE_SIZE,
        noise=NoiseSpec(dim=LATENT_DIM, distribution="normal", truncation=None, shared_across_mechanisms=False),
        texture_shuffle=True,
        label_names=[str(i) for i in range(N_CLASSES)],
        mechanisms={m: model.mechanism(m) for m in ("shape", "texture", "background")},
        device=torch.device(device),
    )
