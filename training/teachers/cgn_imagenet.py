"""The ImageNet CGN (three BigGAN-deep-256 generators and a frozen U²-Net) as a black-box teacher.

Each mechanism is a function of (u, y): u [B, 128] is truncation × truncnorm(−2, 2) and is shared by the
three mechanisms; y int64 [B] is an ImageNet class index, fed to BigGAN as a one-hot vector. The mask is
clamp(sigmoid(U²-Net d0 of the shape generator's output), 1e-4, 0.9999) [B, 1, 256, 256]; texture and
background are [B, 3, 256, 256] in [-1, 1].

Weights: the CGN's `cgn.pth` (about 1.1 GB), which cannot be downloaded here: a user passes its path. Its
official sha256 is not known to us, so any checkpoint that loads strictly is accepted and its actual
sha256 is recorded (in the bank and the manifest) instead of being checked against a constant.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from pytorch_pretrained_biggan import BigGAN, BigGANConfig
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.spectral_norm import SpectralNorm

from training.fetch import file_digest
from training.students import StudentConfig
from training.teachers.cgn_mnist import MASK_RANGE, TeacherError
from training.teachers.u2net import U2Net

LATENT_DIM = 128
N_CLASSES = 1000
IMAGE_SIZE = 256
DEFAULT_TRUNCATION = 0.5  # what CGN used to generate its counterfactual datasets
CHECKPOINT_NAME = "cgn.pth"
PARALLEL_PREFIX = "module."  # added by DataParallel / DistributedDataParallel
TRAINING_ONLY_PREFIX = "biggan_GT."  # CGN's fourth, frozen BigGAN: used in its training losses only
CLASS_NAMES_FILE = Path(__file__).with_name("imagenet_classes.txt")
# TinyGAN-256 students: TinyGAN's design at BigGAN-256's seven resolutions (4×4 … 256×256) with a 128-d
# class embedding and BigGAN's nearest upsampling: 5.17 M parameters each against 55.9 M for one
# BigGAN-deep-256 (10.8×). Over half of them sit in the (z, embedding) → 4×4 linear, so the 4×4 width sets
# the size; the high-resolution blocks set the speed, and they are memory-bound on CPU: halving the widths
# from 32×32 up (384…32 → 256…16) doubled onnxruntime throughput for 0.3 M fewer parameters.
STUDENT_CHANNELS = (704, 512, 256, 128, 64, 32, 16)
STUDENT_EMBED_DIM = 128
STUDENT_UPSAMPLE = "nearest"


def student_config() -> StudentConfig:
    """The TinyGAN-256 preset as a full StudentConfig (what distillation builds without --channels)."""
    return StudentConfig(z_dim=LATENT_DIM, n_classes=N_CLASSES, image_size=IMAGE_SIZE, channels=list(STUDENT_CHANNELS),
                         embed_dim=STUDENT_EMBED_DIM, upsample=STUDENT_UPSAMPLE)
# A 256-px sample is 1.8 MB of float32 outputs: small teacher batches and bank chunks (about 230 MB each)
# keep memory flat; 10,000 samples fill about 18 GB of disk.
QUERY_BATCH = 16
CHUNK_SIZE = 128
BANK_SIZE = 10000
# BigGAN-deep-256 in pytorch-pretrained-biggan: (upsample?, in, out) channel multipliers per block.
BIGGAN_DEEP_256_LAYERS = [
    (False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8), (True, 8, 8),
    (False, 8, 8), (True, 8, 4), (False, 4, 4), (True, 4, 2), (False, 2, 2), (True, 2, 1),
]


def validate_truncation(truncation) -> float:
    """BigGAN's batch-norm statistics exist for truncations in (0, 1] only."""
    try:
        value = float(truncation)
    except (TypeError, ValueError):
        raise TeacherError(f"truncation must be a number in (0, 1], got {truncation!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise TeacherError(f"truncation must be in (0, 1], got {truncation!r}")
    return value


def biggan_deep_256() -> BigGAN:
    """BigGAN-deep-256 (55,880,833 parameters) with defined values everywhere before a checkpoint is loaded.

    The package allocates the final BatchNorm's affine weights with torch.Tensor(n), i.e. uninitialised
    memory, which makes a randomly initialised generator output NaN; we set them to the identity.
    """
    model = BigGAN(BigGANConfig(output_dim=256, layers=BIGGAN_DEEP_256_LAYERS, attention_layer_position=8))
    with torch.no_grad():
        model.generator.bn.weight.fill_(1.0)
        model.generator.bn.bias.zero_()
    return model


class CGNImageNet(nn.Module):
    """The three mechanisms of the ImageNet CGN; state-dict keys match `cgn.pth` without `biggan_GT.`."""

    def __init__(self, truncation: float = DEFAULT_TRUNCATION):
        super().__init__()
        self.truncation = validate_truncation(truncation)
        self.f_shape = biggan_deep_256()
        self.f_text = biggan_deep_256()
        self.f_bg = biggan_deep_256()
        self.u2net = U2Net()

    def _generate(self, generator: BigGAN, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return generator(u, F.one_hot(y, N_CLASSES).to(u.dtype), self.truncation)

    def shape(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        premask = self._generate(self.f_shape, u, y)
        return torch.sigmoid(self.u2net(premask)).clamp(*MASK_RANGE)

    def texture(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._generate(self.f_text, u, y)

    def background(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._generate(self.f_bg, u, y)

    def mechanism(self, name: str):
        return {"shape": self.shape, "texture": self.texture, "background": self.background}[name]


def random_teacher(truncation: float = DEFAULT_TRUNCATION, seed: int = 0, power_iterations: int = 1) -> CGNImageNet:
    """An untrained teacher for tests and benchmarks: the real architecture and cost, with finite outputs.

    Spectral norm divides each weight by u·Wv, and the package draws u and v at random, refining them only
    in training-mode forwards; in eval mode a fresh generator divides by a near-zero or negative estimate
    and outputs NaN. We run the power iterations that training would have run: one already makes the
    estimate ‖Wv‖, positive and of the right scale.
    """
    torch.manual_seed(seed)
    model = CGNImageNet(truncation)
    with torch.no_grad():
        for module in model.modules():
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, SpectralNorm):
                    for _ in range(power_iterations):
                        hook.compute_weight(module, do_power_iteration=True)
    return model.eval().requires_grad_(False)


def class_names() -> list[str]:
    lines = CLASS_NAMES_FILE.read_text(encoding="utf-8").splitlines()
    names = [line for line in lines if line and not line.startswith("#")]
    if len(names) != N_CLASSES:
        raise TeacherError(f"{CLASS_NAMES_FILE} lists {len(names)} class names, expected {N_CLASSES}")
    return names


def resolve_checkpoint(path: str | os.PathLike | None) -> Path:
    if path is None:
        raise TeacherError(
            "the ImageNet CGN needs its checkpoint: pass --teacher-path /path/to/cgn.pth (about 1.1 GB; "
            "it cannot be downloaded here)"
        )
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise TeacherError(f"teacher checkpoint not found: {path}")
    return path


def _strip_parallel(key: str) -> str:
    return key[len(PARALLEL_PREFIX):] if key.startswith(PARALLEL_PREFIX) else key


def mechanism_state(state: Mapping) -> OrderedDict:
    """A CGN state dict reduced to what the mechanisms use: no `module.` prefix, no `biggan_GT.` keys.

    torch's per-module metadata (state-dict versions) is carried along under the same renaming, so
    version-dependent loading (BatchNorm, spectral norm) behaves as it would on the original dict.
    """
    kept = OrderedDict(
        (key, value) for key, value in ((_strip_parallel(k), v) for k, v in state.items())
        if not key.startswith(TRAINING_ONLY_PREFIX)
    )
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        kept._metadata = OrderedDict((_strip_parallel(k), v) for k, v in metadata.items())
    return kept


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … and {len(keys) - limit} more" if len(keys) > limit else "")


def load_state(model: CGNImageNet, state, source: str) -> CGNImageNet:
    """Load a CGN state dict into `model`, strictly for every module the mechanisms use.

    Raises TeacherError naming the missing and unexpected keys, or the tensors of the wrong shape.
    """
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherError(f"{source} is not a state dict (a mapping of names to tensors)")
    try:
        result = model.load_state_dict(mechanism_state(state), strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even when strict=False
        raise TeacherError(f"{source} does not fit the ImageNet CGN: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        problems = []
        if result.missing_keys:
            problems.append(f"{len(result.missing_keys)} missing keys ({_preview(result.missing_keys)})")
        if result.unexpected_keys:
            problems.append(f"{len(result.unexpected_keys)} unexpected keys ({_preview(result.unexpected_keys)})")
        raise TeacherError(
            f"{source} is not an ImageNet CGN checkpoint: {' and '.join(problems)}; expected the keys of "
            f"f_shape, f_text, f_bg (BigGAN-deep-256) and u2net (U²-Net), optionally prefixed with "
            f"'{PARALLEL_PREFIX}', plus the {TRAINING_ONLY_PREFIX.rstrip('.')} keys, which are dropped"
        )
    return model


def load_teacher(
    path: str | os.PathLike | None,
    truncation: float = DEFAULT_TRUNCATION,
    device: str | torch.device = "cpu",
) -> CGNImageNet:
    """The teacher from `cgn.pth` (file, or folder holding it), frozen, in eval mode, on `device`."""
    truncation = validate_truncation(truncation)
    checkpoint = resolve_checkpoint(path)
    digest = file_digest(checkpoint, "sha256")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and format errors all mean "not a usable checkpoint"
        raise TeacherError(f"cannot read {checkpoint} as a PyTorch checkpoint: {exc}") from exc
    model = load_state(CGNImageNet(truncation), state, str(checkpoint))
    del state
    model.sha256 = digest
    return model.eval().requires_grad_(False).to(device)
