"""Distillation recipes as data: every stage of a run, and everything about the run that shapes its students.

A recipe is what a version was trained with, so that it can be trained again: `training/distill.py --recipe FILE`
(YAML or JSON), `--recipe models/<family>/<version>` (the manifest's `recipe`) or `--preset NAME` (a file in
training/recipes/). Stages run in order, each continuing from the checkpoints the previous one left; a stage gives,
per mechanism, the steps it runs, and for all of them the learning rate, batch size and every loss weight. Student
widths are per mechanism, so a narrow shape student can sit beside wider texture and background students. Fields
left unset (the students, the bank size) take the teacher's presets: the recipe written beside the checkpoints and
into the manifest has them filled in.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from core.atomic import write_text_atomic
from core.manifest import MANIFEST_NAME
from core.vocabulary import MECHANISMS
from training.losses import FEATURE_WEIGHTS
from training.students import DISCRIMINATOR_CHANNELS, HEAD_KINDS, UPSAMPLE_MODES

RECIPE_FILE = "recipe.json"  # beside the checkpoints in the work folder
PRESETS_DIR = Path(__file__).with_name("recipes")
DEFAULT_PRESET = "subpixel_mask_restart"  # what ships: the default recipe is the shipped one
LR_SCHEDULES = ("constant", "cosine")


class RecipeError(ValueError):
    """A recipe that cannot be run, or that would rewrite what the checkpoints were trained with."""


def _fill(cls, data: dict, where: str, **converters) -> Any:
    """`cls(**data)` refusing unknown keys (a typo must not silently fall back to a default)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
    try:  # null means "the default", as a key left out does
        return cls(**{key: converters.get(key, lambda v: v)(value) for key, value in data.items() if value is not None})
    except RecipeError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise RecipeError(f"{where}: {exc}") from None


def _floats(values) -> list[float]:
    return [float(v) for v in values]


def _ints(values) -> list[int]:
    return [int(v) for v in values]


@dataclass
class LossWeights:
    """TinyGAN's weights by default; λ_kl (SKDCGN's addition) has no TinyGAN value, see training/losses.py."""

    pix: float = 0.2
    pix_decay: float = 0.01  # per epoch over the bank, counted from the start of the run, floored at 0
    adv: float = 0.01
    feat: float = 1.0
    kl: float = 0.1
    iou: float = 0.0  # soft IoU of the mask (training/losses.py), ours; only the shape student has a mask
    feature_layers: list[float] = field(default_factory=lambda: list(FEATURE_WEIGHTS))

    def pixel_weight(self, epoch: float) -> float:
        return max(0.0, self.pix - self.pix_decay * int(epoch))

    def uses_discriminator(self) -> bool:
        """Whether the student's loss reads the discriminator (else a stage need not train it at all)."""
        return bool(self.adv or self.feat)

    @classmethod
    def from_dict(cls, data: dict, where: str = "weights") -> "LossWeights":
        return _fill(cls, data, where, pix=float, pix_decay=float, adv=float, feat=float, kl=float, iou=float,
                     feature_layers=_floats)


@dataclass
class Stage:
    """A stretch of training with one set of settings, continuing where the previous stage ended."""

    name: str
    steps: dict[str, int]  # steps this stage runs, per mechanism; a mechanism left out runs none
    lr: float = 2e-4
    lr_schedule: str = "constant"  # or "cosine": from lr down to 0 over the stage
    batch_size: int = 64
    weights: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self):
        # One spelling of each stage: mechanisms in their usual order, none listed with zero steps (unknown
        # names stay, for validate() to report).
        order = {m: i for i, m in enumerate(MECHANISMS)}
        self.steps = {m: n for m, n in sorted(self.steps.items(), key=lambda item: order.get(item[0], len(order))) if n}

    def lr_at(self, mechanism: str, step_in_stage: int) -> float:
        if self.lr_schedule == "cosine":
            return 0.5 * self.lr * (1.0 + math.cos(math.pi * step_in_stage / self.steps[mechanism]))
        return self.lr

    def settings(self) -> dict:
        """What every step of the stage trains with (all but its name and length)."""
        return {key: value for key, value in asdict(self).items() if key not in ("name", "steps")}

    @classmethod
    def from_dict(cls, data: dict, where: str = "stage") -> "Stage":
        return _fill(cls, data, where, lr=float, batch_size=int,
                     steps=lambda steps: {m: int(n) for m, n in steps.items()},
                     weights=lambda weights: LossWeights.from_dict(weights, f"{where}.weights"))


@dataclass
class StudentPreset:
    """One mechanism's student; z size, class count and image size come from the teacher. None: the teacher's."""

    channels: list[int] | None = None  # 4×4 first, then one per ResBlockUp (training/students.py)
    embed_dim: int | None = None
    upsample: str | None = None
    head: str | None = None  # "conv" or "subpixel"; channels given without a head mean "conv", as they always did
    conditioned_up_to: int | None = None  # label-conditioned norms only up to this size; None: every block's

    @classmethod
    def from_dict(cls, data: dict, where: str = "student") -> "StudentPreset":
        return _fill(cls, data, where, channels=_ints, embed_dim=int, conditioned_up_to=int).with_own_head()

    def with_own_head(self) -> "StudentPreset":
        """Widths given without a head mean the conv head (every recipe and manifest before the sub-pixel head):
        a teacher's preset head belongs to the preset's widths, never to these."""
        return replace(self, head="conv") if self.channels is not None and self.head is None else self

    def filled(self, preset: dict) -> "StudentPreset":
        """Unset fields taken from the teacher's `preset` for this mechanism."""
        own = {key: value for key, value in asdict(self.with_own_head()).items() if value is not None}
        return StudentPreset(**(preset | own))


def _all_students() -> dict[str, StudentPreset]:
    return {m: StudentPreset() for m in MECHANISMS}


@dataclass
class Recipe:
    """Everything a distillation run needs to be run again, apart from where it runs (see DistillConfig)."""

    name: str
    stages: list[Stage]
    students: dict[str, StudentPreset] = field(default_factory=_all_students)
    mechanisms: list[str] = field(default_factory=lambda: list(MECHANISMS))
    discriminator_channels: list[int] = field(default_factory=lambda: list(DISCRIMINATOR_CHANNELS))
    seed: int = 0  # the bank's samples, the students' initialisation and their batch order
    bank_size: int | None = None  # training samples in the bank; None: the teacher's default
    heldout: int = 2000  # held-out pairs for evaluation
    classes: list[int] | None = None  # train on these labels only; None: all
    # export: what the graphs compute from the labels alone as per-class tables (training.fold_labels; exact)
    fold_labels: bool = False
    notes: str = ""  # provenance: what was reconstructed, what was edited on the command line

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
            raise RecipeError(f"{where}: a recipe needs a list of `stages`")
        recipe = _fill(cls, data, where, seed=int, bank_size=int, heldout=int, classes=_ints,
                       discriminator_channels=_ints, mechanisms=list,
                       stages=lambda stages: [Stage.from_dict(s, f"{where}: stages[{i}]") for i, s in enumerate(stages)],
                       students=lambda students: {m: StudentPreset.from_dict(s, f"{where}: students.{m}")
                                                  for m, s in students.items()})
        recipe.students = _all_students() | recipe.students
        return recipe

    def total_steps(self, mechanism: str) -> int:
        return sum(stage.steps.get(mechanism, 0) for stage in self.stages)

    def segments(self, mechanism: str) -> list[tuple[int, int, Stage]]:
        """(first step, end step, stage) of each stage that trains `mechanism`, in order."""
        out, start = [], 0
        for stage in self.stages:
            if stage.steps.get(mechanism):
                out.append((start, start + stage.steps[mechanism], stage))
                start += stage.steps[mechanism]
        return out

    def history(self, mechanism: str, steps: int) -> list[tuple[int, int, dict]]:
        """The settings `mechanism`'s first `steps` steps train with: adjacent stages that train alike merge,
        so one stage of 4,500 steps and two alike stages of 2,000 and 2,500 are the same history."""
        out: list[tuple[int, int, dict]] = []
        for first, end, stage in self.segments(mechanism):
            if first >= steps:
                break
            end, settings = min(end, steps), stage.settings()
            if out and out[-1][2] == settings:
                out[-1] = (out[-1][0], end, settings)
            else:
                out.append((first, end, settings))
        return out

    def resolve(self, student_presets: dict[str, dict], bank_size: int) -> "Recipe":
        """The recipe with every unset field taken from the teacher's presets (per mechanism), checked."""
        students = {m: preset.filled(student_presets[m]) for m, preset in self.students.items()}
        resolved = replace(self, students=students, bank_size=self.bank_size or bank_size)
        resolved.validate()
        return resolved

    def validate(self) -> None:
        problems = []
        if not self.mechanisms or set(self.mechanisms) - set(MECHANISMS):
            problems.append(f"mechanisms must be some of {', '.join(MECHANISMS)}, got {self.mechanisms}")
        if set(self.students) - set(MECHANISMS):
            problems.append(f"students names unknown mechanism(s) {sorted(set(self.students) - set(MECHANISMS))}")
        if not self.stages:
            problems.append("a recipe needs at least one stage")
        for index, stage in enumerate(self.stages):
            where = f"stage {index + 1} ({stage.name})"
            if set(stage.steps) - set(MECHANISMS) or any(n < 0 for n in stage.steps.values()):
                problems.append(f"{where}: steps must be non-negative counts per mechanism, got {stage.steps}")
            if stage.lr_schedule not in LR_SCHEDULES:
                problems.append(f"{where}: lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
            if not stage.lr > 0 or stage.batch_size < 1:
                problems.append(f"{where}: lr and batch_size must be positive")
            if len(stage.weights.feature_layers) != len(self.discriminator_channels):
                problems.append(f"{where}: feature_layers needs one weight per discriminator layer "
                                f"({len(self.discriminator_channels)})")
        for mechanism in self.mechanisms:
            if mechanism in MECHANISMS and not self.total_steps(mechanism):
                problems.append(f"no stage trains the {mechanism} student")
        for mechanism, preset in self.students.items():
            if preset.upsample is not None and preset.upsample not in UPSAMPLE_MODES:
                problems.append(f"students.{mechanism}.upsample must be one of {', '.join(UPSAMPLE_MODES)}")
            if preset.head is not None and preset.head not in HEAD_KINDS:
                problems.append(f"students.{mechanism}.head must be one of {', '.join(HEAD_KINDS)}")
        if self.heldout < 1 or (self.bank_size is not None and self.bank_size < 1):
            problems.append("heldout and bank_size must be positive")
        if problems:
            raise RecipeError(f"recipe {self.name!r}: " + "; ".join(problems))

    def check_continues(self, saved: "Recipe | None", progress: dict[str, int], work_dir: Path) -> None:
        """Refuse a recipe that disagrees with what the checkpoints in `work_dir` were trained with
        (`saved`, when recorded; `progress` = steps done per mechanism): history stays true."""
        for mechanism, done in progress.items():
            if done > self.total_steps(mechanism):
                raise RecipeError(f"the {mechanism} checkpoint in {work_dir} is at step {done}, beyond the "
                                  f"{self.total_steps(mechanism)} steps of recipe {self.name!r}; use another "
                                  "--work-dir")
        if saved is None:
            return
        run_fields = ("students", "discriminator_channels", "seed", "bank_size", "classes")
        changed = [name for name in run_fields if getattr(self, name) != getattr(saved, name)]
        changed += [f"the first {done} {m} steps" for m, done in progress.items()
                    if done and self.history(m, done) != saved.history(m, done)]
        if changed:
            raise RecipeError(f"the checkpoints in {work_dir} were trained otherwise ({', '.join(changed)} differ from "
                              f"its {RECIPE_FILE}): resume with that recipe, add stages after it, or use another "
                              "--work-dir")


@dataclass
class RecipeChanges:
    """Command-line edits of a recipe; None (or empty) keeps the recipe's value.

    Run fields apply to any recipe. Stage fields (steps, lr, batch size, loss weights) edit a one-stage recipe,
    replace the default recipe's stages by one stage or, when resuming, add a stage after the recipe's.
    """

    mechanisms: list[str] | None = None
    student: StudentPreset = field(default_factory=StudentPreset)  # its set fields apply to every mechanism
    discriminator_channels: list[int] | None = None
    seed: int | None = None
    bank_size: int | None = None
    heldout: int | None = None
    classes: list[int] | None = None
    steps: dict[str, int] | None = None  # total steps per mechanism, as --steps always meant
    lr: float | None = None
    batch_size: int | None = None
    weights: dict[str, Any] = field(default_factory=dict)  # LossWeights fields

    def edits_stages(self) -> bool:
        return self.steps is not None or self.lr is not None or self.batch_size is not None or bool(self.weights)

    def describe(self) -> str:
        edits = {key: value for key, value in asdict(self).items() if key not in ("student", "weights")}
        edits |= asdict(self.student) | self.weights
        return ", ".join(f"{key} {json.dumps(value)}" for key, value in edits.items() if value is not None)

    def apply(self, recipe: Recipe, resuming: bool, replaceable: bool) -> Recipe:
        """`recipe` edited. `resuming`: training already ran under `recipe`, so stage edits add a stage after
        its stages; `replaceable`: nobody asked for `recipe` by name, so stage edits may replace its stages."""
        run = {name: getattr(self, name) for name in ("mechanisms", "discriminator_channels", "seed", "bank_size",
                                                         "heldout", "classes") if getattr(self, name) is not None}
        chosen = {key: value for key, value in asdict(self.student.with_own_head()).items() if value is not None}
        edited = replace(recipe, students={m: replace(p, **chosen) for m, p in recipe.students.items()}, **run)
        if self.edits_stages():
            if resuming:
                edited = self._continue(edited)
            elif len(recipe.stages) == 1:
                edited.stages = [self._edit(recipe.stages[0], steps=self._totals(recipe))]
            elif replaceable:
                first = recipe.stages[0]
                return replace(edited, name=f"{recipe.name}, one stage",
                               stages=[self._edit(first, name="command-line", steps=self._totals(recipe))],
                               notes=f"One stage from the command line ({self.describe()}) over the first stage "
                                     f"of recipe {recipe.name!r}.")
            else:
                raise RecipeError(f"--steps, --lr, --batch-size and the loss weights are ambiguous for the "
                                  f"{len(recipe.stages)} stages of recipe {recipe.name!r}: edit a copy of the recipe")
        if edited != recipe:
            when = " on --resume" if resuming else ""
            edited.notes = _note(recipe.notes, f"Edited on the command line{when}: {self.describe()}.")
        return edited

    def _totals(self, recipe: Recipe) -> dict[str, int]:
        """--steps N for all, or per mechanism with the unnamed ones taking the largest value given."""
        if not self.steps:
            return {m: recipe.total_steps(m) for m in MECHANISMS}
        return {m: self.steps.get(m, max(self.steps.values())) for m in MECHANISMS}

    def _edit(self, stage: Stage, **changes) -> Stage:
        return replace(stage, lr=self.lr if self.lr is not None else stage.lr,
                       batch_size=self.batch_size if self.batch_size is not None else stage.batch_size,
                       weights=replace(stage.weights, **self.weights), **changes)

    def _continue(self, recipe: Recipe) -> Recipe:
        """The old `--resume --lr …` workflow, recorded: training goes on to --steps in total (mechanisms
        left unnamed keep theirs) with the edited settings, as a new stage or a longer last one."""
        if self.steps is None:
            raise RecipeError("on --resume, --lr, --batch-size and the loss weights start a new stage: give --steps "
                              "with the new total per mechanism")
        done = {m: recipe.total_steps(m) for m in MECHANISMS}
        short = {m: n for m, n in self.steps.items() if n < done[m]}
        if short:
            raise RecipeError(f"--steps {short} is below the steps recipe {recipe.name!r} already runs "
                              f"({ {m: done[m] for m in short} }): give the new total")
        more = {m: n - done[m] for m, n in self.steps.items()}
        last = recipe.stages[-1]
        added = self._edit(last, name=f"stage-{len(recipe.stages) + 1}", steps=more)
        if added.settings() == last.settings():
            if not any(more.values()):
                return recipe
            longer = replace(last, steps={m: last.steps.get(m, 0) + more.get(m, 0) for m in MECHANISMS})
            return replace(recipe, stages=recipe.stages[:-1] + [longer])
        if not any(more.values()):
            raise RecipeError(f"--steps adds no steps after the {done} recipe {recipe.name!r} already runs, so the "
                              "other edits would apply to none: give the new total")
        return replace(recipe, stages=recipe.stages + [added])


def _note(notes: str, addition: str) -> str:
    return f"{notes} {addition}".strip()


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> Recipe:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise RecipeError(f"no recipe preset {name!r}; choose one of {', '.join(preset_names())}")
    return load_recipe(path)


def load_recipe(source: str | os.PathLike) -> Recipe:
    """A recipe from a YAML or JSON file, a version folder (its manifest's `recipe`) or a work folder (recipe.json)."""
    path = Path(source)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            manifest = json.loads((path / MANIFEST_NAME).read_text())
            if "recipe" not in manifest:
                raise RecipeError(f"{path / MANIFEST_NAME} records no recipe; pass a recipe file instead")
            return Recipe.from_dict(manifest["recipe"], str(path / MANIFEST_NAME))
        path = path / RECIPE_FILE
    if not path.is_file():
        raise RecipeError(f"no recipe at {source}: give a .yaml or .json file, a version folder or a work folder")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise RecipeError(f"{path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: "
                          f"{str(exc).splitlines()[0]}") from None
    return Recipe.from_dict(data, str(path))


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    write_text_atomic(path, json.dumps(recipe.to_dict(), indent=2) + "\n")
