"""The SKDCGN paper's own experiments, teacher and students side by side (CLI: experiments/evaluate.py).

- Table 1, the shape-mechanism study on double-coloured MNIST: one modifier at a time (unit Gaussian noise on
  the mask σ = 1, rotation within ±90°, transparency 0.75) beside the unmodified masks. The paper says "a
  classifier trained to tell real images from counterfactual ones" and gives neither classifier nor split; its
  test accuracies (14.96 / 13.51 / 58.86 %) are below the 50 % a real-vs-counterfactual detector scores by
  chance, and read like 10-way digit accuracies. So each column gets both:
  * detector: SmallCNN with two outputs, real = 1, counterfactual = 0. Train: t10k[:5000] with random colours
    (the test recipe, so a colour pairing that only real images obey cannot give them away) + 5,000
    counterfactuals (seed s); test: t10k[5000:] with random colours + 5,000 counterfactuals of another seed.
  * digit: the invariant classifier (CGN Table 2's protocol, experiments.invariance) trained on the
    modified counterfactuals, tested on t10k[5000:] with random colours.
- Transparency (§4.4): the invariant classifier with a = 0.75 alone, beside unmodified masks.
- Original + counterfactuals (CGN Table 2's protocol): the biased real set t10k[:5000] added to the
  counterfactuals, beside counterfactuals only.
- The §4.2 baseline (experiments/baseline_cgn.py) is evaluated here too.

Runs of the digit classifier are stored in the shape of experiments.invariance results (family, mask,
config, sources, arms), wherever they sit in a JSON file, so any later experiment reuses a run with the same
protocol (family, images, masks per shape, training recipe, mask modifiers, generator version, seed, training set)
instead of training it again; a reused run says which file it came from.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from core.compose import UNMODIFIED, MaskModifiers
from experiments.classifier import TrainConfig, fit_and_score
from experiments.counterfactuals import compose_draws, counterfactual_dataset, draw
from experiments.invariance import REAL_SPLIT, InvarianceConfig, build_real, real_splits, summarise
from experiments.sources import Source
from reporting import report
from training.data import DigitImages, load_mnist

COLUMNS = {
    "unmodified": UNMODIFIED,
    "noise": MaskModifiers(noise_std=1.0),
    "rotation": MaskModifiers(rotation_deg=90.0),
    "transparency": MaskModifiers(transparency=0.75),
}
COLUMN_TITLES = {"unmodified": "unmodified masks", "noise": "noise σ 1", "rotation": "rotation ±90°",
                 "transparency": "transparency 0.75"}
TRANSPARENCY = COLUMNS["transparency"]
PAPER_TABLE1 = {"noise": {"train": 99.9, "test": 14.96}, "rotation": {"train": 99.1, "test": 13.51},
                "transparency": {"train": 94.7, "test": 58.86}}
CF_ONLY, ORIGINAL_PLUS_CF = "counterfactuals", "original + counterfactuals"
DETECTOR_HELDOUT = 7919  # held-out counterfactuals of the detector come from seed + DETECTOR_HELDOUT
REAL, FAKE = 1, 0

Log = Callable[[str], None]


@dataclass
class DetectorConfig:
    images_per_class: int = REAL_SPLIT  # real and counterfactual images in each of train and test
    per_shape: int = 10
    seeds: list[int] = field(default_factory=lambda: [0])
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def mask_dict(setting: str, modifiers: MaskModifiers) -> dict:
    return {"setting": setting, **modifiers.to_dict()}


def same_mask(mask: dict, modifiers: MaskModifiers) -> bool:
    return all(abs(float(mask.get(k, default)) - float(getattr(modifiers, k))) < 1e-9
               for k, default in (("transparency", 1.0), ("rotation_deg", 0.0), ("noise_std", 0.0)))


# --- finding runs already made ----------------------------------------------------------------------------------

def result_blocks(obj) -> Iterator[dict]:
    """Every dict in `obj` shaped like an invariance result (family, mask, config, sources, arms)."""
    if isinstance(obj, dict):
        if {"family", "mask", "config", "sources", "arms"} <= obj.keys():
            yield obj
        for value in obj.values():
            yield from result_blocks(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from result_blocks(value)


def protocol(config: dict) -> dict:
    """A config without its seed list: runs are matched seed by seed."""
    return {k: v for k, v in config.items() if k != "seeds"}


def find_runs(results_dir: str | os.PathLike, family: str, config: dict, modifiers: MaskModifiers, source: str,
              task: str = "digit", training_set: str = CF_ONLY) -> dict[int, dict]:
    """seed → a finished run with this exact protocol, from any JSON in `results_dir` (first file wins).

    `source` is a generator name (`teacher:double_colored`, `student:double_colored_mnist/v2`) or "real" for the
    biased real arm, which matches on the training recipe alone (it uses no counterfactuals and no mask).
    """
    found: dict[int, dict] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for block in result_blocks(payload):
            if block["family"] != family or block.get("task", "digit") != task:
                continue
            if source == "real":
                if block["config"].get("train") != config.get("train") or "real" not in block["arms"]:
                    continue
                arm_names = ["real"]
            else:
                if protocol(block["config"]) != protocol(config) or not same_mask(block["mask"], modifiers):
                    continue
                if block.get("training_set", CF_ONLY) != training_set:
                    continue
                arm_names = [arm for arm, name in block["sources"].items() if name == source]
            for arm in arm_names:
                for run in block["arms"].get(arm, {}).get("runs", []):
                    if run["seed"] not in found:
                        found[run["seed"]] = {**run, "reused_from": run.get("reused_from", path.name)}
    return found


# --- data ---------------------------------------------------------------------------------------------------------

class RealData:
    """The real digits every experiment uses, built once: biased training sets per seed and the random-style test set."""

    def __init__(self, family: str, data_dir=None, texture_dir=None):
        self.family, self.data_dir, self.texture_dir = family, data_dir, texture_dir
        self._train: dict[int, DigitImages] = {}
        self._test: DigitImages | None = None
        self._random_train: dict[int, DigitImages] = {}

    def biased_train(self, seed: int) -> DigitImages:
        if seed not in self._train:
            self._train[seed], self._test = real_splits(self.family, self.data_dir, self.texture_dir, train_seed=seed)
        return self._train[seed]

    @property
    def test(self) -> DigitImages:
        if self._test is None:
            self.biased_train(0)
        return self._test

    def random_train(self, seed: int, count: int) -> DigitImages:
        """t10k[:count] wearing random colours/textures (the test recipe), for the detector."""
        if seed not in self._random_train:
            images, labels = load_mnist("test", self.data_dir)
            self._random_train[seed] = build_real(self.family, images[:REAL_SPLIT], labels[:REAL_SPLIT], "test", seed,
                                                  self.texture_dir)
        data = self._random_train[seed]
        return DigitImages(data.images[:count], data.labels[:count], data.fg_index[:count], data.bg_index[:count])


# --- the digit classifier (invariance) ----------------------------------------------------------------------------

def digit_arms(block: dict, family: str, sources: dict[str, Source], config: InvarianceConfig, setting: str,
               modifiers: MaskModifiers, real: RealData, results_dir, save: Callable[[], None], log: Log = print,
               training_set: str = CF_ONLY) -> dict:
    """Fill `block` (an invariance-shaped result) with one run per arm and seed, reusing finished runs."""
    block.update(family=family, mask=mask_dict(setting, modifiers), config=config.to_dict(), training_set=training_set,
                 real_images=REAL_SPLIT if training_set == ORIGINAL_PLUS_CF else 0, test_images=len(real.test.labels))
    block.setdefault("sources", {}).update({arm: source.name for arm, source in sources.items()})
    arms = block.setdefault("arms", {})
    for arm, source in sources.items():
        done = find_runs(results_dir, family, config.to_dict(), modifiers, source.name, training_set=training_set)
        runs = []
        for seed in config.seeds:
            if seed in done:
                run = done[seed]
                log(f"[{family}] {arm} {setting} ({training_set}) seed {seed}: reused from {run['reused_from']}")
            else:
                data = counterfactual_dataset(source, config.images, seed, config.per_shape, modifiers)
                images, labels = data.images, data.labels
                if training_set == ORIGINAL_PLUS_CF:
                    biased = real.biased_train(seed)
                    images, labels = np.concatenate([biased.images, images]), np.concatenate([biased.labels, labels])
                run = fit_and_score((images, labels), (real.test.images, real.test.labels), config.train, seed)
                log(f"[{family}] {arm} {setting} ({training_set}) seed {seed}: {run}")
            runs.append(run)
            arms[arm] = {"runs": runs, **summarise(runs)}
            save()
    return block


def real_arm(block: dict, family: str, config: InvarianceConfig, real: RealData, results_dir, save,
             log: Log = print) -> dict:
    """The biased real arm alone (t10k[:5000] in label colours), reused where the same recipe already ran."""
    done = find_runs(results_dir, family, config.to_dict(), UNMODIFIED, "real")
    runs = []
    for seed in config.seeds:
        if seed in done:
            run = done[seed]
            log(f"[{family}] real seed {seed}: reused from {run['reused_from']}")
        else:
            biased = real.biased_train(seed)
            run = fit_and_score((biased.images, biased.labels), (real.test.images, real.test.labels), config.train, seed)
            log(f"[{family}] real seed {seed}: {run}")
        runs.append(run)
    block.update(family=family, config={"train": config.train.to_dict(), "seeds": config.seeds}, task="real",
                 real_images=REAL_SPLIT, test_images=len(real.test.labels),
                 arms={"real": {"runs": runs, **summarise(runs)}})
    save()
    return block


# --- the real-vs-counterfactual detector ------------------------------------------------------------------------

def detector_split(source: Source, modifiers: MaskModifiers, real_part: DigitImages, count: int, seed: int,
                   per_shape: int) -> tuple[np.ndarray, np.ndarray]:
    fake = counterfactual_dataset(source, count, seed, per_shape, modifiers).images
    images = np.concatenate([real_part.images[:count], fake])
    labels = np.concatenate([np.full(count, REAL), np.full(len(fake), FAKE)]).astype(np.int64)
    return images, labels


def detector_arms(block: dict, family: str, sources: dict[str, Source], config: DetectorConfig, setting: str,
                  modifiers: MaskModifiers, real: RealData, results_dir, save, log: Log = print) -> dict:
    """Real vs counterfactual, balanced: chance is 50 %."""
    block.update(task="detector", family=family, mask=mask_dict(setting, modifiers), config=config.to_dict(),
                 chance=50.0)
    block.setdefault("sources", {}).update({arm: source.name for arm, source in sources.items()})
    arms = block.setdefault("arms", {})
    count = config.images_per_class
    test_real = real.test
    for arm, source in sources.items():
        done = find_runs(results_dir, family, config.to_dict(), modifiers, source.name, task="detector")
        runs = []
        for seed in config.seeds:
            if seed in done:
                run = done[seed]
                log(f"[{family}] detector {arm} {setting} seed {seed}: reused from {run['reused_from']}")
            else:
                train = detector_split(source, modifiers, real.random_train(seed, count), count, seed, config.per_shape)
                test = detector_split(source, modifiers, test_real, count, seed + DETECTOR_HELDOUT, config.per_shape)
                run = fit_and_score(train, test, config.train, seed, n_classes=2)
                log(f"[{family}] detector {arm} {setting} seed {seed}: {run}")
            runs.append(run)
            arms[arm] = {"runs": runs, **summarise(runs)}
            save()
    return block


# --- pictures -----------------------------------------------------------------------------------------------------

def counterfactual_rows(sources: dict[str, Source], modifiers: MaskModifiers, seed: int = 11, columns: int = 10,
                        show_masks: bool = False) -> list[np.ndarray]:
    """uint8 rows per source: counterfactuals whose shape label is the column (0…9), textures and backgrounds of
    independently drawn labels, identical draws for every source; with `show_masks`, each source's masks first."""
    from core.imageio import to_uint8

    first = next(iter(sources.values()))
    draws = draw(first, seed, 0, columns, modifiers)
    draws.labels["shape"] = np.arange(columns) % 10
    rows = []
    for source in sources.values():
        outputs = {m: source.run(m, draws.z(m), draws.labels[m]) for m in ("shape", "texture", "background")}
        composed = compose_draws(source, outputs, draws, modifiers)
        if show_masks:
            rows.append(to_uint8(composed["mask"], (0.0, 1.0)))
        rows.append(to_uint8(composed["image"]))
    return rows


def save_grid(rows: list[np.ndarray], path: str | os.PathLike, columns: int = 10, scale: int = 2) -> str:
    from core.atomic import atomic_path
    from core.imageio import encode, labelled_rows

    with atomic_path(path) as tmp:
        tmp.write_bytes(encode(labelled_rows(rows, columns=columns, scale=scale)))
    return Path(path).name


# --- the documents each command writes --------------------------------------------------------------------------

class Document:
    """A result JSON written after every finished run, so that an interrupted command loses at most one run."""

    def __init__(self, path: str | os.PathLike, initial: dict):
        self.path = Path(path)
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data.update(initial)

    def save(self) -> None:
        report.write_json(self.path, self.data)


def result_path(results_dir, name: str, family: str, paper_scale: bool = False) -> Path:
    return Path(results_dir) / f"paper_{name}_{family}{'_paper_scale' if paper_scale else ''}.json"


def run_table1(family: str, sources: dict[str, Source], invariance: InvarianceConfig, detector: DetectorConfig,
               real: RealData, results_dir, figures_dir, columns=tuple(COLUMNS), log: Log = print,
               run_digit: bool = True, run_detector: bool = True) -> dict:
    doc = Document(result_path(results_dir, "table1", family),
                   {"family": family, "paper": PAPER_TABLE1, "column_titles": COLUMN_TITLES})
    table = doc.data.setdefault("columns", {})
    for name in columns:
        modifiers = COLUMNS[name]
        column = table.setdefault(name, {})
        column["modifiers"] = modifiers.to_dict()
        if run_detector:
            detector_arms(column.setdefault("detector", {}), family, sources, detector, name, modifiers, real,
                          results_dir, doc.save, log)
        if run_digit:
            digit_arms(column.setdefault("digit", {}), family, sources, invariance, name, modifiers, real, results_dir,
                       doc.save, log)
    rows = []
    for name in COLUMNS:
        rows += counterfactual_rows(sources, COLUMNS[name])
    doc.data["grid"] = save_grid(rows, Path(figures_dir) / f"paper_table1_{family}.png")
    doc.data["grid_rows"] = [f"{COLUMN_TITLES[name]}: {arm}" for name in COLUMNS for arm in sources]
    doc.save()
    return doc.data


def scaled_document(name: str, family: str, results_dir, paper_scale: bool) -> tuple[Document, dict]:
    """The result document of experiment `name` at one scale, and its `settings` (one block per arm setting)."""
    doc = Document(result_path(results_dir, name, family, paper_scale),
                   {"family": family, "scale": "paper" if paper_scale else "default"})
    return doc, doc.data.setdefault("settings", {})


def run_transparency(family: str, sources: dict[str, Source], config: InvarianceConfig, real: RealData, results_dir,
                     paper_scale: bool, log: Log = print) -> dict:
    doc, settings = scaled_document("transparency", family, results_dir, paper_scale)
    for name in ("unmodified", "transparency"):
        digit_arms(settings.setdefault(name, {}), family, sources, config, name, COLUMNS[name], real, results_dir,
                   doc.save, log)
    return doc.data


def run_original_plus_cf(family: str, sources: dict[str, Source], config: InvarianceConfig, real: RealData, results_dir,
                         paper_scale: bool, log: Log = print) -> dict:
    doc, settings = scaled_document("original_plus_cf", family, results_dir, paper_scale)
    real_arm(settings.setdefault("real", {}), family, config, real, results_dir, doc.save, log)
    for training_set in (ORIGINAL_PLUS_CF, CF_ONLY):
        digit_arms(settings.setdefault(training_set, {}), family, sources, config, "unmodified", UNMODIFIED, real,
                   results_dir, doc.save, log, training_set=training_set)
    return doc.data


def run_baseline(family: str, sources: dict[str, Source], training: dict, invariance: InvarianceConfig,
                 detector: DetectorConfig, real: RealData, results_dir, figures_dir, data_dir, recogniser_epochs: int = 3,
                 pairs: int = 2000, log: Log = print, recogniser: tuple | None = None) -> dict:
    """The §4.2 baseline beside the teacher and the distilled students: masks read back by the digit CNN, textures
    and backgrounds wearing their label, the invariant classifier, the detector and a sample grid.

    `sources` holds "teacher", "student" and "baseline"; all see the same held-out (z, y) draws (fidelity's seed).
    """
    from experiments.classifier import predict
    from experiments.fidelity import HELDOUT_SEED, digit_recogniser, label_palettes, nearest_colour

    doc = Document(result_path(results_dir, "baseline", family),
                   {"family": family, "training": training, "sources": {a: s.name for a, s in sources.items()}})
    draws = draw(sources["teacher"], HELDOUT_SEED, 0, pairs)
    model, info = recogniser or digit_recogniser(data_dir, recogniser_epochs)
    palettes = label_palettes(family, real.texture_dir)
    checks: dict = {"pairs": pairs, "heldout_seed": HELDOUT_SEED, "recogniser": info}
    for arm, source in sources.items():
        masks = source.run("shape", draws.z("shape"), draws.labels["shape"])
        entry = {
            "mask_recognised": 100 * float((predict(model, masks * 2 - 1) == draws.labels["shape"]).mean()),
            "mask_mean": float(masks.mean()),
            "mask_undecided": 100 * float(((masks > 0.1) & (masks < 0.9)).mean()),  # % of pixels neither 0 nor 1
        }
        for m in ("texture", "background"):
            outputs = source.run(m, draws.z(m), draws.labels[m])
            entry[f"{m}_wears_label"] = 100 * float((nearest_colour(outputs, palettes[m]) == draws.labels[m]).mean())
        checks[arm] = entry
        log(f"[{family}] baseline comparison, {arm}: {entry}")
    doc.data["checks"] = checks
    doc.save()
    digit_arms(doc.data.setdefault("digit", {}), family, sources, invariance, "unmodified", UNMODIFIED, real,
               results_dir, doc.save, log)
    detector_arms(doc.data.setdefault("detector", {}), family, sources, detector, "unmodified", UNMODIFIED, real,
                  results_dir, doc.save, log)
    doc.data["grid"] = save_grid(counterfactual_rows(sources, UNMODIFIED, show_masks=True),
                                 Path(figures_dir) / f"paper_baseline_{family}.png")
    doc.data["grid_rows"] = [f"{arm} {what}" for arm in sources for what in ("masks", "counterfactuals")]
    doc.save()
    return doc.data
