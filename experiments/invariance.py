"""CGN's invariant-classifier experiment (Table 2) with the real digits this project has.

Arms, each a SmallCNN trained from scratch and tested on the same test set:
- real: the first 5,000 t10k digits wearing their label's colours/textures (the biased training style);
- teacher / student: counterfactual sets of equal size, seed and settings from the CGN teacher and from the
  shipped ONNX students; the label is the shape label.
Test: the other 5,000 t10k digits with random colours/textures. A classifier that learnt shape scores high;
one that learnt the colour shortcut scores ~10 %.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from core.compose import UNMODIFIED, MaskModifiers
from experiments.classifier import TrainConfig, fit_and_score
from experiments.counterfactuals import counterfactual_dataset
from experiments.sources import Source
from training.data import DigitImages, build_double_colored, build_wildlife, load_mnist

REAL_SPLIT = 5000  # t10k[:5000] trains the real arm, t10k[5000:] is the test set
TEST_SEED = 1234


@dataclass
class InvarianceConfig:
    images: int = 20_000
    per_shape: int = 10
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def build_real(family: str, images: np.ndarray, labels: np.ndarray, style: str, seed: int,
               texture_dir: str | os.PathLike | None = None) -> DigitImages:
    if family == "double_colored_mnist":
        return build_double_colored(images, labels, style, seed)
    if family == "wildlife_mnist":
        return build_wildlife(images, labels, style, seed, texture_dir)
    raise ValueError(f"no real-data recipe for family {family!r}; use double_colored_mnist or wildlife_mnist")


def real_splits(family: str, data_dir: str | os.PathLike | None = None,
                texture_dir: str | os.PathLike | None = None, train_seed: int = 0) -> tuple[DigitImages, DigitImages]:
    """(biased training set from t10k[:5000], random-style test set from t10k[5000:])."""
    images, labels = load_mnist("test", data_dir)
    train = build_real(family, images[:REAL_SPLIT], labels[:REAL_SPLIT], "train", train_seed, texture_dir)
    test = build_real(family, images[REAL_SPLIT:], labels[REAL_SPLIT:], "test", TEST_SEED, texture_dir)
    return train, test


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for a single run) of train and test accuracy."""
    summary = {}
    for key in ("train_accuracy", "test_accuracy"):
        values = np.array([run[key] for run in runs])
        summary[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return summary


def run_experiment(family: str, sources: dict[str, Source], config: InvarianceConfig,
                   modifiers: MaskModifiers = UNMODIFIED, include_real: bool = True,
                   data_dir: str | os.PathLike | None = None, texture_dir: str | os.PathLike | None = None,
                   log=print) -> dict:
    """Train every arm once per seed; returns per-run results and their mean ± std per arm."""
    arms: dict[str, list[dict]] = {}
    test = None
    for seed in config.seeds:
        real, test = real_splits(family, data_dir, texture_dir, train_seed=seed)
        test_pair = (test.images, test.labels)
        if include_real:
            arms.setdefault("real", []).append(fit_and_score((real.images, real.labels), test_pair, config.train, seed))
            log(f"[{family}] real seed {seed}: {arms['real'][-1]}")
        for name, source in sources.items():
            data = counterfactual_dataset(source, config.images, seed, config.per_shape, modifiers)
            arms.setdefault(name, []).append(fit_and_score((data.images, data.labels), test_pair, config.train, seed))
            log(f"[{family}] {name} {modifiers.name} seed {seed}: {arms[name][-1]}")
    return {
        "family": family,
        "mask": {"setting": modifiers.name, **modifiers.to_dict()},
        "config": config.to_dict(),
        "real_images": REAL_SPLIT if include_real else 0,
        "test_images": 0 if test is None else len(test.labels),
        "sources": {name: source.name for name, source in sources.items()},
        "arms": {name: {"runs": runs, **summarise(runs)} for name, runs in arms.items()},
    }
