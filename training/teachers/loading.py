"""One black-box interface over every teacher family, so the bank, distillation and export never special-case one."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from core.noise import NoiseSpec, draw_z
from core.vocabulary import MECHANISMS
from training.teachers.cgn_mnist import IMAGE_SIZE, LATENT_DIM, N_CLASSES, TEACHERS, TeacherError, load_teacher

__all__ = ["TeacherAdapter", "TeacherError", "load_teacher_adapter", "teacher_names"]

# MNIST students: narrow enough that the three together outrun the teacher on CPU (v1's 128,64,32,16 bilinear
# students did not: memory-bound passes at 32×32 dominated). The mask student is the one short of its fidelity
# bar at that width, so it gets twice the width at every resolution and the sub-pixel head, which makes no hidden
# tensor at 32×32 and so costs about what 64-32-16-8 with the conv head does.
MNIST_STUDENTS = {
    "shape": {"channels": [96, 64, 32], "embed_dim": 32, "upsample": "nearest", "head": "subpixel"},
    "texture": {"channels": [64, 32, 16, 8], "embed_dim": 32, "upsample": "nearest", "head": "conv"},
    "background": {"channels": [64, 32, 16, 8], "embed_dim": 32, "upsample": "nearest", "head": "conv"},
}


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
    # The StudentConfig fields each mechanism's student defaults to (widths, class embedding, upsampling, head).
    student_presets: dict[str, dict] = field(default_factory=lambda: dict(MNIST_STUDENTS))
    query_batch: int = 1000
    # Sample-bank defaults: its size, and samples per chunk, which bounds memory while the bank is written.
    bank_size: int = 50000
    chunk_size: int = 5000

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
        return np.stack([draw_z(rng, self.noise) for _ in range(count)])



IMAGENET = "imagenet"


def teacher_names() -> list[str]:
    return sorted([*TEACHERS, IMAGENET])


def load_teacher_adapter(
    name: str, path=None, allow_unknown: bool = False, device="cpu", truncation: float | None = None
) -> TeacherAdapter:
    """The named teacher behind the common interface; `truncation` applies to the ImageNet CGN only.

    The ImageNet CGN accepts any checkpoint that loads strictly (its official sha256 is unknown here), so
    `allow_unknown` matters only for the MNIST teachers.
    """
    if name == IMAGENET:
        return _imagenet_adapter(path, device, truncation)
    if name not in TEACHERS:
        raise TeacherError(f"unknown teacher {name!r}; choose one of {', '.join(teacher_names())}")
    if truncation is not None:
        raise TeacherError(f"the {name} teacher takes no truncation: its noise is N(0, I)")
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
        mechanisms={m: model.mechanism(m) for m in MECHANISMS},
        device=torch.device(device),
    )


def _imagenet_adapter(path, device, truncation: float | None) -> TeacherAdapter:
    from training.teachers import cgn_imagenet as cgn  # imported here: it needs the `imagenet` extra

    model = cgn.load_teacher(path, cgn.DEFAULT_TRUNCATION if truncation is None else truncation, device)
    return TeacherAdapter(
        name=IMAGENET,
        family=IMAGENET,
        sha256=model.sha256,
        parameters=sum(p.numel() for p in model.parameters()),
        n_classes=cgn.N_CLASSES,
        image_size=cgn.IMAGE_SIZE,
        noise=NoiseSpec(dim=cgn.LATENT_DIM, distribution="truncated_normal", truncation=model.truncation,
                        shared_across_mechanisms=True),
        texture_shuffle=False,
        label_names=cgn.class_names(),
        mechanisms={m: model.mechanism(m) for m in MECHANISMS},
        device=torch.device(device),
        student_presets={m: {"channels": list(cgn.STUDENT_CHANNELS), "embed_dim": cgn.STUDENT_EMBED_DIM,
                             "upsample": cgn.STUDENT_UPSAMPLE, "head": "conv"} for m in MECHANISMS},
        query_batch=cgn.QUERY_BATCH,
        bank_size=cgn.BANK_SIZE,
        chunk_size=cgn.CHUNK_SIZE,
    )
