"""One noise and seeding scheme for requests, jobs, training banks and evaluation.

Sample i of a request or job owns the stream `SeedSequence([seed, i])` (numpy PCG64). From it we draw,
in this fixed order: z for shape, texture and background, the texture and background shuffle offsets,
then the mask-modifier randomness (rotation angle, then the noise field). A sample is therefore the
same whichever chunk, batch or worker computes it. Labels of dataset jobs come from a separate stream,
`SeedSequence([seed, i, LABEL_STREAM])`, so restricting labels never changes the noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from core.vocabulary import MECHANISMS

LABEL_STREAM = 1


@dataclass(frozen=True)
class NoiseSpec:
    """The manifest's `noise` block."""

    dim: int
    distribution: str = "normal"  # "normal" (MNIST) or "truncated_normal" (ImageNet)
    truncation: float | None = None
    shared_across_mechanisms: bool = False

    @classmethod
    def from_manifest(cls, block: Mapping) -> "NoiseSpec":
        return cls(
            dim=int(block["dim"]),
            distribution=block.get("distribution", "normal"),
            truncation=block.get("truncation"),
            shared_across_mechanisms=bool(block.get("shared_across_mechanisms", False)),
        )

    def to_manifest(self) -> dict:
        return {
            "dim": self.dim,
            "distribution": self.distribution,
            "truncation": self.truncation,
            "shared_across_mechanisms": self.shared_across_mechanisms,
        }


def sample_stream(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index)])))


def label_stream(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index), LABEL_STREAM])))


def draw_z(rng: np.random.Generator, spec: NoiseSpec) -> np.ndarray:
    """One noise vector: N(0, I), or truncation × truncnorm(−2, 2) by resampling values outside ±2."""
    if spec.distribution == "normal":
        return rng.standard_normal(spec.dim).astype(np.float32)
    if spec.distribution == "truncated_normal":
        values = rng.standard_normal(spec.dim)
        outside = np.abs(values) > 2.0
        while outside.any():
            values[outside] = rng.standard_normal(int(outside.sum()))
            outside = np.abs(values) > 2.0
        return (values * (spec.truncation if spec.truncation is not None else 1.0)).astype(np.float32)
    raise ValueError(f"unknown noise distribution {spec.distribution!r}; expected 'normal' or 'truncated_normal'")


@dataclass
class SampleNoise:
    """Everything random about one counterfactual sample."""

    z: dict  # mechanism -> float32 [dim]
    shift_texture: tuple[int, int]
    shift_background: tuple[int, int]
    rotation_deg: float
    mask_noise: np.ndarray | None


def draw_sample_noise(
    seed: int,
    index: int,
    spec: NoiseSpec,
    image_size: int,
    rotation_deg: float = 0.0,
    noise_std: float = 0.0,
    z_override: Mapping[str, Sequence[float]] | None = None,
) -> SampleNoise:
    """Draw sample `index`'s noise in the contract's order; explicit z replaces the drawn z, nothing else."""
    rng = sample_stream(seed, index)
    if spec.shared_across_mechanisms:
        shared = draw_z(rng, spec)
        z = {name: shared for name in MECHANISMS}
    else:
        z = {name: draw_z(rng, spec) for name in MECHANISMS}
    shifts = rng.integers(0, image_size, size=4)
    angle = float(rng.uniform(-rotation_deg, rotation_deg)) if rotation_deg > 0 else 0.0
    field = (rng.standard_normal((1, image_size, image_size)) * noise_std).astype(np.float32) if noise_std > 0 else None
    for name, values in (z_override or {}).items():
        if values is not None:
            z[name] = np.asarray(values, dtype=np.float32).reshape(spec.dim)
    return SampleNoise(
        z=z,
        shift_texture=(int(shifts[0]), int(shifts[1])),
        shift_background=(int(shifts[2]), int(shifts[3])),
        rotation_deg=angle,
        mask_noise=field,
    )


def draw_labels(seed: int, index: int, choices: Mapping[str, Sequence[int]]) -> dict:
    """Labels of dataset sample `index`: each mechanism uniformly from its allowed labels, independently, the
    values `label_stream(seed, index).choice(labels)` draws mechanism by mechanism (the seed rule). Indexing by
    `integers(0, len(labels))`, which is what `choice` draws, gives the same values at a fraction of the cost:
    `choice` validates its argument on every call, and a job draws labels for every sample."""
    rng = label_stream(seed, index)
    return {name: int(choices[name][rng.integers(0, len(choices[name]))]) for name in MECHANISMS}
