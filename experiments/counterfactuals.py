"""Labelled counterfactual data sets from any Source, drawn with the project's one noise scheme.

Sample i takes its noise from core.noise.draw_sample_noise(seed, i) and its labels from draw_labels(seed, i),
so the teacher and the students given the same seed see identical z, labels, shuffles and mask modifiers.
As in CGN, each mask is reused for `per_shape` counterfactuals: samples g·k … g·k + k − 1 share the shape
label and shape noise of sample g·k and draw their own texture and background labels and noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.compose import UNMODIFIED, MaskModifiers, compose_samples
from core.noise import SampleNoise, draw_labels, draw_sample_noise
from core.vocabulary import MECHANISMS
from experiments.sources import Source
from training.data import NUM_CLASSES, DigitImages

ALL_LABELS = {m: list(range(NUM_CLASSES)) for m in MECHANISMS}


@dataclass
class Draws:
    """The random inputs of samples start … start + len − 1: noise, and labels per mechanism."""

    noises: list[SampleNoise]
    labels: dict[str, np.ndarray]  # mechanism -> int64 [N]

    def z(self, mechanism: str) -> np.ndarray:
        return np.stack([noise.z[mechanism] for noise in self.noises])


def draw(source: Source, seed: int, start: int, count: int, modifiers: MaskModifiers = UNMODIFIED,
         per_shape: int = 1) -> Draws:
    """Noise and labels of samples [start, start + count); shape draws come from each group's first sample."""
    indices = range(start, start + count)
    noises = [draw_sample_noise(seed, i, source.noise, source.image_size, modifiers.rotation_deg, modifiers.noise_std)
              for i in indices]
    labels = [draw_labels(seed, i, ALL_LABELS) for i in indices]
    leaders: dict[int, tuple] = {}
    for offset, i in enumerate(indices):
        leader = i - i % per_shape
        if leader != i:
            if leader not in leaders:
                leaders[leader] = (draw_sample_noise(seed, leader, source.noise, source.image_size).z["shape"],
                                   draw_labels(seed, leader, ALL_LABELS)["shape"])
            noises[offset].z["shape"], labels[offset]["shape"] = leaders[leader]
    return Draws(noises, {m: np.array([label[m] for label in labels], dtype=np.int64) for m in MECHANISMS})


def compose_draws(source: Source, outputs: dict[str, np.ndarray], draws: Draws,
                  modifiers: MaskModifiers = UNMODIFIED) -> dict[str, np.ndarray]:
    """Shuffle, modify and compose mechanism outputs: {"image", "mask", "texture", "background"} as composed."""
    image, mask, texture, background = compose_samples(
        outputs["shape"], outputs["texture"], outputs["background"], draws.noises, source.texture_shuffle,
        modifiers.transparency,
    )
    return {"image": image, "mask": mask, "texture": texture, "background": background}


def counterfactual_dataset(source: Source, count: int, seed: int, per_shape: int = 10,
                           modifiers: MaskModifiers = UNMODIFIED, chunk: int = 2000) -> DigitImages:
    """`count` counterfactuals labelled by shape, with the texture / background labels they wear.

    Chunks are multiples of `per_shape`, so the mask shared by a group is computed once per group.
    """
    chunk = max(per_shape, chunk - chunk % per_shape)
    images = np.empty((count, 3, source.image_size, source.image_size), np.float32)
    labels = {m: np.empty(count, np.int64) for m in MECHANISMS}
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        draws = draw(source, seed, start, size, modifiers, per_shape)
        leaders = np.arange(size) % per_shape == 0  # start is a multiple of per_shape
        masks = source.run("shape", draws.z("shape")[leaders], draws.labels["shape"][leaders])
        outputs = {"shape": masks[np.cumsum(leaders) - 1]}
        for m in ("texture", "background"):
            outputs[m] = source.run(m, draws.z(m), draws.labels[m])
        images[start:start + size] = compose_draws(source, outputs, draws, modifiers)["image"]
        for m in MECHANISMS:
            labels[m][start:start + size] = draws.labels[m]
    return DigitImages(images, labels["shape"], labels["texture"], labels["background"])
