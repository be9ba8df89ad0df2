"""How faithful a student version is to its teacher, and whether both respect the labels.

- per mechanism on held-out (z, y): mask IoU and L1 (shape), L1 and PSNR (texture, background), beside the
  class-mean baseline of REFERENCE.md (predict each label's mean teacher output);
- composed counterfactuals, teacher and student given identical noise, shuffles and labels;
- recognisability: a digit CNN trained on real MNIST masks reads the shape label back from generated masks;
- label match: the texture and background wear their label's colour (double-colored palette) or texture
  (wildlife: nearest mean texture colour).
"""
from __future__ import annotations

import os

import numpy as np

from core.fidelity import mask_iou, mean_l1, psnr, summarise_psnr
from core.vocabulary import MECHANISMS
from experiments.classifier import TrainConfig, accuracy, predict, train_classifier
from experiments.counterfactuals import compose_draws, draw
from experiments.sources import Source
from training.data import DIGIT_PALETTE, NUM_CLASSES, PALETTE, DataError, binarise_digits, load_mnist, load_textures
from training.evaluation.heldout import fidelity

HELDOUT_SEED = 20_261_127  # far from the banks' seeds, so held-out pairs are never training pairs
BASELINE_SEED = HELDOUT_SEED + 1


def class_means(outputs: np.ndarray, labels: np.ndarray, n_classes: int = NUM_CLASSES) -> np.ndarray:
    """[n_classes, ...] mean output per label (zeros for a label never seen)."""
    return np.stack([outputs[labels == c].mean(axis=0) if (labels == c).any() else np.zeros(outputs.shape[1:],
                     outputs.dtype) for c in range(n_classes)])


def mean_colours(images: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """[N, C, H, W] images → [N, C] mean colour in [0, 1]."""
    low, high = value_range
    return (images.reshape(*images.shape[:2], -1).mean(axis=2) - low) / (high - low)


def nearest_colour(images: np.ndarray, palette: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Index of the palette row nearest (Euclidean, RGB in [0, 1]) to each image's mean colour."""
    colours = mean_colours(images, value_range)
    return np.argmin(((colours[:, None, :] - palette[None]) ** 2).sum(axis=2), axis=1)


def label_palettes(family: str, texture_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray] | None:
    """The colour each texture / background label should show: the palettes, or the textures' mean colours.

    None for colored_mnist: its teacher was trained on a dataset whose label colours this project does not
    rebuild, so there is nothing to match against.
    """
    if family == "colored_mnist":
        return None
    if family == "double_colored_mnist":
        return {"texture": np.asarray(DIGIT_PALETTE), "background": np.asarray(PALETTE)}
    if family == "wildlife_mnist":
        textures = load_textures(texture_dir)
        return {"texture": textures["object"].mean(axis=(1, 2)), "background": textures["background"].mean(axis=(1, 2))}
    raise ValueError(f"no label colours for family {family!r}")


def digit_recogniser(data_dir: str | os.PathLike | None, epochs: int = 3, seed: int = 0):
    """A SmallCNN on real binarised digits: MNIST train when present, else the first half of t10k.

    Returns (model, info); info says what it was trained on and its accuracy on the second half of t10k.
    """
    test_images, test_labels = load_mnist("test", data_dir)
    try:
        train_images, train_labels = load_mnist("train", data_dir)
        trained_on = "MNIST train (60,000)"
    except DataError:
        train_images, train_labels = test_images[:5000], test_labels[:5000]
        trained_on = "t10k[:5000]"
    to_input = lambda digits: binarise_digits(digits) * 2 - 1  # noqa: E731 - masks in [0, 1] → [-1, 1]
    config = TrainConfig(epochs=epochs)
    model = train_classifier(to_input(train_images), train_labels, config, seed)
    held_out = 100 * accuracy(model, to_input(test_images[5000:]), test_labels[5000:])
    return model, {"trained_on": trained_on, "accuracy_on_t10k[5000:]": held_out, **config.to_dict()}


def evaluate_fidelity(teacher: Source, student: Source, family: str, pairs: int = 2000,
                      data_dir: str | os.PathLike | None = None, texture_dir: str | os.PathLike | None = None,
                      baseline_pairs: int = 5000, recogniser: tuple | None = None) -> dict:
    """Every fidelity measurement of `student` against `teacher` on `pairs` held-out samples.

    `recogniser` is (model, info) from digit_recogniser, trained here when None.
    """
    draws = draw(teacher, HELDOUT_SEED, 0, pairs)
    outputs = {}
    for name, source in (("teacher", teacher), ("student", student)):
        outputs[name] = {m: source.run(m, draws.z(m), draws.labels[m]) for m in MECHANISMS}
    baseline_draws = draw(teacher, BASELINE_SEED, 0, baseline_pairs)
    result: dict = {"pairs": pairs, "heldout_seed": HELDOUT_SEED, "baseline_pairs": baseline_pairs, "mechanisms": {}}
    for m in MECHANISMS:
        means = class_means(teacher.run(m, baseline_draws.z(m), baseline_draws.labels[m]), baseline_draws.labels[m])
        result["mechanisms"][m] = {
            "student": fidelity(m, outputs["student"][m], outputs["teacher"][m]),
            "class_mean_baseline": fidelity(m, means[draws.labels[m]], outputs["teacher"][m]),
        }

    composed = {name: compose_draws(teacher, outputs[name], draws) for name in outputs}
    result["composite"] = {
        "l1": float(mean_l1(composed["student"]["image"], composed["teacher"]["image"]).mean()),
        "psnr": summarise_psnr(psnr(composed["student"]["image"], composed["teacher"]["image"])),
        "mask_iou": float(mask_iou(composed["student"]["mask"], composed["teacher"]["mask"]).mean()),
    }

    model, info = recogniser or digit_recogniser(data_dir)
    result["recognisability"] = {"recogniser": info, **{
        name: 100 * float((predict(model, outputs[name]["shape"] * 2 - 1) == draws.labels["shape"]).mean())
        for name in outputs
    }}

    palettes = label_palettes(family, texture_dir)
    if palettes is None:
        return result
    result["label_match"] = {
        "method": "nearest palette colour" if family == "double_colored_mnist" else "nearest mean texture colour",
        **{m: {name: 100 * float((nearest_colour(outputs[name][m], palettes[m]) == draws.labels[m]).mean())
               for name in outputs} for m in ("texture", "background")},
    }
    return result
