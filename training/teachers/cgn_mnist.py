"""The official MNIST CGN (colored, double-colored, wildlife) as a black-box teacher.

State-dict keys match the published checkpoints (`label_emb`, `f_shape`, `f_text1`, `f_text2`), so they
load with strict=True. Each mechanism is a function of (u, y) with u [B, 32] and y int64 [B]; the
shuffler is not part of the teacher (it is random, see core.compose.circular_shift).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.settings import Paths
from training.fetch import ChecksumError, download, file_digest

LATENT_DIM = 32
N_CLASSES = 10
IMAGE_SIZE = 32
MASK_RANGE = (1e-4, 0.9999)
CHECKPOINT_URL = (
    "https://raw.githubusercontent.com/autonomousvision/counterfactual_generative_networks/main/"
    "mnists/experiments/cgn_{variant}_MNIST/weights/ckp.pth"
)


@dataclass(frozen=True)
class TeacherInfo:
    variant: str
    family: str
    sha256: str


TEACHERS = {
    "colored": TeacherInfo("colored", "colored_mnist", "6b178e7c1924b9efc532c467e7f0b77d2702efb536de9816bbd7e92c26d9b3fe"),
    "double_colored": TeacherInfo(
        "double_colored", "double_colored_mnist", "7aa06c907f099c63a26127164a38d2ab353f1cdcafabdf8ca9303a0e9197b933"
    ),
    "wildlife": TeacherInfo("wildlife", "wildlife_mnist", "db5bc3108f7bfbd74a85e2b267e65e95bd918920a02fd8de64c947fd8a0015f0"),
}


def teacher_for_family(family: str) -> str:
    """The teacher name (`double_colored`) of a family (`double_colored_mnist`)."""
    for name, info in TEACHERS.items():
        if info.family == family:
            return name
    raise ValueError(f"no teacher for family {family!r}; known: {', '.join(info.family for info in TEACHERS.values())}")


class Reshape(nn.Module):
    def __init__(self, *shape: int):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], *self.shape)


def _conv(cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=1, padding=1, bias=bias)


def _shape_net(inp: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inp, 64 * 8 * 8), Reshape(64, 8, 8), nn.InstanceNorm2d(64),
        nn.Upsample(scale_factor=2), _conv(64, 32), nn.BatchNorm2d(32), nn.LeakyReLU(0.2), nn.InstanceNorm2d(32),
        nn.Upsample(scale_factor=2), _conv(32, 1), nn.BatchNorm2d(1), nn.LeakyReLU(0.2), nn.InstanceNorm2d(1),
    )


def _texture_net(inp: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inp, 64 * 8 * 8), Reshape(64, 8, 8),
        nn.Upsample(scale_factor=2), _conv(64, 64), nn.BatchNorm2d(64), nn.LeakyReLU(0.2),
        nn.Upsample(scale_factor=2), _conv(64, 32), nn.BatchNorm2d(32), nn.LeakyReLU(0.2),
        _conv(32, 3, bias=True), nn.BatchNorm2d(3), nn.Tanh(),
    )


class CGNMnist(nn.Module):
    """Three mechanisms sharing one label embedding; input of each is concat(u, E[y])."""

    def __init__(self) -> None:
        super().__init__()
        self.label_emb = nn.Embedding(N_CLASSES, N_CLASSES)
        self.f_shape = _shape_net(LATENT_DIM + N_CLASSES)
        self.f_text1 = _texture_net(LATENT_DIM + N_CLASSES)
        self.f_text2 = _texture_net(LATENT_DIM + N_CLASSES)

    def _input(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([u, self.label_emb(y)], dim=1)

    def shape(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.f_shape(self._input(u, y)).clamp(*MASK_RANGE)

    def texture(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.f_text1(self._input(u, y))

    def background(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.f_text2(self._input(u, y))

    def mechanism(self, name: str):
        return {"shape": self.shape, "texture": self.texture, "background": self.background}[name]


class TeacherError(ValueError):
    """A teacher name, path or checkpoint that cannot be used, with what to do about it."""


def default_cache_dir() -> Path:
    """Downloaded checkpoints: <core.settings.Paths.cache_dir>/teachers ($SKDCGN_CACHE, else ~/.cache/skdcgn)."""
    return Paths.from_env().cache_dir / "teachers"


def resolve_checkpoint(variant: str, path: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
    """A local checkpoint path: the given one, a cached one, or a verified download from the CGN repository."""
    if variant not in TEACHERS:
        raise TeacherError(f"unknown MNIST teacher {variant!r}; choose one of {', '.join(sorted(TEACHERS))}")
    if path is not None:
        path = Path(path)
        if path.is_dir():
            path = path / f"{variant}.pth"
        if not path.is_file():
            raise TeacherError(f"teacher checkpoint not found: {path}")
        return path
    cached = default_cache_dir() / f"cgn_{variant}_mnist.pth"
    if cached.is_file():
        return cached
    if not allow_download:
        raise TeacherError(f"teacher checkpoint not found at {cached}; pass a path or allow the download")
    return download([CHECKPOINT_URL.format(variant=variant)], cached, TEACHERS[variant].sha256, "sha256")


def load_teacher(
    variant: str,
    path: str | os.PathLike | None = None,
    allow_unknown: bool = False,
    device: str | torch.device = "cpu",
) -> CGNMnist:
    """Load an official checkpoint strictly, in eval mode, after checking its sha256."""
    checkpoint = resolve_checkpoint(variant, path)
    digest = file_digest(checkpoint, "sha256")
    if digest != TEACHERS[variant].sha256 and not allow_unknown:
        raise ChecksumError(
            f"teacher checkpoint {checkpoint} has sha256 {digest}, not the official {variant} CGN "
            f"({TEACHERS[variant].sha256}); pass allow_unknown=True (--allow-unknown-teacher) to use it anyway"
        )
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model = CGNMnist()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TeacherError(f"{checkpoint} is not a CGN MNIST state dict: {exc}") from exc
    model.sha256 = digest
    return model.eval().requires_grad_(False).to(device)
