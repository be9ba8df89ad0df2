"""Distillation by a recipe: sample bank, the recipe's stages of training, held-out evaluation, ONNX export and
the manifest. training/distill.py is its command line; `run(DistillConfig(...))` is the same from Python.

The teacher is a black box: the students see only (z, y, T(z, y)) triples from the sample bank. The work folder
(default <runs>/<family>/<version>) holds one checkpoint per mechanism, written every `checkpoint_every` steps
and at the end of each stage, beside the recipe they follow (recipe.json); resuming continues at the stage and
step the checkpoints reached. The version folder appears only when export, parity and evaluation all succeed.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.atomic import atomic_directory, atomic_path
from core.manifest import MECHANISM_OUTPUTS, validate_version_name, value_range, write_manifest
from core.settings import Paths
from reporting.plots import save_figure
from training import losses
from training.bank import Bank, BankSpec, generate_bank
from training.evaluation.heldout import evaluate, render_comparison
from training.export import export_students
from training.package import build_manifest, training_block
from training.recipe import DEFAULT_PRESET, RECIPE_FILE, Recipe, RecipeChanges, load_preset, load_recipe, save_recipe
from training.students import HEADS, ProjectionDiscriminator, StudentConfig, TinyGenerator
from training.teachers.loading import TeacherAdapter, load_teacher_adapter, teacher_names

BETAS = (0.0, 0.9)  # TinyGAN's Adam betas, for the students and the discriminators
LOG_FIELDS = ["mechanism", "stage", "step", "epoch", "loss_d", "loss_g", "pix", "adv", "feat", "kl", "iou", "lambda_pix", "lr"]


class DistillError(RuntimeError):
    """A problem the user can fix: printed as one line, with nothing half-written left behind."""


@dataclass
class DistillConfig:
    """One distillation run: the recipe and its edits, and where and how to run it."""

    teacher: str
    out: Path  # the version folder to create, models/<family>/<version>
    recipe: Recipe | None = None  # None: the work folder's recipe when resuming, else the default (shipping) one
    changes: RecipeChanges = field(default_factory=RecipeChanges)
    teacher_path: str | None = None
    allow_unknown_teacher: bool = False
    truncation: float | None = None
    overwrite: bool = False
    promote: bool = False
    device: str = "auto"
    work_dir: Path | None = None  # checkpoints and recipe.json; default <runs>/<family>/<version>
    bank_dir: Path | None = None  # default <runs>/<family>/bank-s<seed>-n<size>
    chunk_size: int | None = None  # bank samples per chunk; default: the teacher's
    resume: bool = False
    checkpoint_every: int = 500
    log_every: int = 25


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DistillError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def to_discriminator_range(x: torch.Tensor, mechanism: str) -> torch.Tensor:
    """Map an output from its value range to [-1, 1], the discriminator's input range (images pass unchanged)."""
    low, high = value_range(mechanism)
    return x * (2.0 / (high - low)) - (high + low) / (high - low)


def train_student(
    mechanism: str,
    bank: Bank,
    config: StudentConfig,
    recipe: Recipe,
    device: torch.device,
    checkpoint: Path,
    checkpoint_every: int = 500,
    log_every: int = 25,
) -> tuple[TinyGenerator, list[dict], float]:
    """Train one student through the recipe's stages, continuing from `checkpoint` when it exists.

    Returns the student, its loss log (every stage) and its training seconds (resumed runs included).
    """
    torch.manual_seed(recipe.seed)
    segments = recipe.segments(mechanism)
    student = TinyGenerator(config, mechanism).to(device)
    disc = ProjectionDiscriminator(HEADS[mechanism][1], config.n_classes, recipe.discriminator_channels).to(device)
    opt_g = torch.optim.Adam(student.parameters(), lr=segments[0][2].lr, betas=BETAS)
    opt_d = torch.optim.Adam(disc.parameters(), lr=segments[0][2].lr, betas=BETAS)
    rng = np.random.default_rng([recipe.seed, list(HEADS).index(mechanism)])
    log: list[dict] = []
    start, earlier_seconds = 0, 0.0
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if StudentConfig(**state["config"]) != config:  # fields added since it was saved take their defaults
            raise DistillError(f"{checkpoint} holds a student {state['config']}, not the recipe's {config.to_dict()}; "
                               "use another --work-dir")
        student.load_state_dict(state["student"])
        disc.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        rng.bit_generator.state = state["rng"]
        log, start = state["log"], state["step"]
        earlier_seconds = state.get("seconds", 0.0)
    started = time.time()

    def save(step: int) -> None:
        state = {"student": student.state_dict(), "discriminator": disc.state_dict(), "opt_g": opt_g.state_dict(),
                 "opt_d": opt_d.state_dict(), "rng": rng.bit_generator.state, "log": log, "step": step,
                 "config": config.to_dict(), "seconds": earlier_seconds + time.time() - started}
        with atomic_path(checkpoint) as tmp:
            torch.save(state, tmp)

    key = MECHANISM_OUTPUTS[mechanism]
    student.train()
    disc.train()
    bar = tqdm(total=segments[-1][1], initial=start, desc=f"distil {mechanism}", unit="step")
    drawn = 0  # samples drawn before the current stage: λ_pix decays per epoch of the whole run
    for first, end, stage in segments:
        weights = stage.weights
        for step in range(max(first, start), end):
            lr = stage.lr_at(mechanism, step - first)
            for group in opt_g.param_groups + opt_d.param_groups:
                group["lr"] = lr
            z, y, target = (torch.from_numpy(a).to(device) for a in bank.sample(key, stage.batch_size, rng))
            epoch = (drawn + (step - first) * stage.batch_size) / len(bank)
            fake = student(z, y)
            terms = {"pix": losses.pixel_l1(fake, target),
                     "kl": losses.bernoulli_kl(fake, target, value_range(mechanism))}
            loss_d = None
            if weights.uses_discriminator():  # else the stage leaves the discriminator as it was, untouched
                real_in = to_discriminator_range(target, mechanism)
                real_scores, _ = disc(real_in, y)
                fake_scores, _ = disc(to_discriminator_range(fake.detach(), mechanism), y)
                loss_d = losses.hinge_discriminator(real_scores, fake_scores)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()

                with torch.no_grad():
                    _, real_features = disc(real_in, y)
                fake_scores, fake_features = disc(to_discriminator_range(fake, mechanism), y)
                terms["adv"] = losses.hinge_generator(fake_scores)
                terms["feat"] = losses.feature_l1(fake_features, real_features, weights.feature_layers)
            if mechanism == "shape":
                terms["iou"] = losses.soft_iou_loss(fake, target)
            lambda_pix = weights.pixel_weight(epoch)
            loss_g = (lambda_pix * terms["pix"] + weights.kl * terms["kl"] + weights.iou * terms.get("iou", 0.0)
                      + weights.feat * terms.get("feat", 0.0) + weights.adv * terms.get("adv", 0.0))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()

            bar.update()
            if step % log_every == 0 or step == end - 1:
                row = {"mechanism": mechanism, "stage": stage.name, "step": step, "epoch": round(epoch, 4),
                       "loss_d": None if loss_d is None else loss_d.item(), "loss_g": loss_g.item(),
                       "lambda_pix": lambda_pix, "lr": lr, **{k: v.item() for k, v in terms.items()}}
                log.append(row)
                bar.set_postfix({k: f"{row[k]:.4f}" for k in ("pix", "feat", "kl", "iou") if k in row})
            if (step + 1) % checkpoint_every == 0 or step + 1 == end:  # the next stage starts from this one's end
                save(step + 1)
        drawn += (end - first) * stage.batch_size
    bar.close()
    return student.eval(), log, earlier_seconds + time.time() - started


def checkpoint_steps(work_dir: Path) -> dict[str, int]:
    """The step each mechanism's checkpoint in `work_dir` has reached (mechanisms without one left out)."""
    return {m: torch.load(work_dir / f"{m}.pt", map_location="cpu", weights_only=False, mmap=True)["step"]
            for m in HEADS if (work_dir / f"{m}.pt").is_file()}


def plan_recipe(config: DistillConfig, teacher: TeacherAdapter, work_dir: Path) -> Recipe:
    """The recipe this run follows: asked for, or saved in the work folder, or the default; edited by
    `config.changes`, filled in from the teacher's presets, and checked against the checkpoints it continues."""
    saved_path = work_dir / RECIPE_FILE
    saved = load_recipe(saved_path) if config.resume and saved_path.is_file() else None
    progress = checkpoint_steps(work_dir) if config.resume else {}
    base = config.recipe or saved
    recipe = config.changes.apply(base or load_preset(DEFAULT_PRESET),
                                  resuming=base is not None and any(progress.values()), replaceable=base is None)
    recipe = recipe.resolve(teacher.student_presets, teacher.bank_size)
    if recipe.classes and not all(0 <= c < teacher.n_classes for c in recipe.classes):
        raise DistillError(f"classes must lie in 0..{teacher.n_classes - 1}, got {recipe.classes}")
    recipe.check_continues(saved, progress, work_dir)
    return recipe


def checked_student_configs(recipe: Recipe, teacher: TeacherAdapter) -> dict[str, StudentConfig]:
    """Each trained mechanism's full student config, checked now rather than after the bank is built."""
    configs = {}
    for mechanism in recipe.mechanisms:
        configs[mechanism] = StudentConfig(z_dim=teacher.noise.dim, n_classes=teacher.n_classes,
                                           image_size=teacher.image_size, **asdict(recipe.students[mechanism]))
        with torch.device("meta"):  # builds the modules (and so checks the widths) without allocating weights
            TinyGenerator(configs[mechanism], mechanism)
    return configs


def write_loss_log(log: list[dict], csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(log)
    mechanisms = list(dict.fromkeys(row["mechanism"] for row in log))
    fig, axes = plt.subplots(1, len(mechanisms), figsize=(5 * len(mechanisms), 3.6), squeeze=False)
    for ax, mechanism in zip(axes[0], mechanisms):
        rows = [row for row in log if row["mechanism"] == mechanism]
        for term in ("pix", "feat", "kl", "iou", "loss_d", "adv"):
            points = [(row["step"], abs(row[term]) + 1e-8) for row in rows if row.get(term) is not None]
            if points:  # iou: shape only, and absent from logs written before it existed
                ax.plot(*zip(*points), label=term if term != "adv" else "|adv|")
        for previous, row in zip(rows, rows[1:]):  # stage boundaries
            if row.get("stage") != previous.get("stage"):
                ax.axvline(row["step"], color="0.6", linewidth=0.8, linestyle=":")
        ax.set_yscale("log")
        ax.set_title(f"{mechanism} student")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    save_figure(fig, png_path)


def run(config: DistillConfig) -> Path:
    """Distil, evaluate, export and (with `promote`) publish one version; returns its folder."""
    if config.teacher not in teacher_names():
        raise DistillError(f"unknown teacher {config.teacher!r}; choose one of {', '.join(teacher_names())}")
    out = Path(config.out)
    version = validate_version_name(out.name)
    if out.exists() and not config.overwrite:
        raise DistillError(f"{out} already exists; pass --overwrite to replace it or choose another version")
    device = pick_device(config.device)
    teacher = load_teacher_adapter(config.teacher, config.teacher_path, config.allow_unknown_teacher, device,
                                   config.truncation)
    family = teacher.family
    if config.promote and out.parent.name != family:
        raise DistillError(f"--promote needs --out inside the family folder, e.g. models/{family}/{version}")
    runs = Paths.from_env().runs_dir
    work_dir = Path(config.work_dir) if config.work_dir else runs / family / version
    if any(work_dir.glob("*.pt")) and not config.resume:
        raise DistillError(f"{work_dir} holds checkpoints of an earlier run: pass --resume to continue it")
    recipe = plan_recipe(config, teacher, work_dir)
    configs = checked_student_configs(recipe, teacher)
    save_recipe(recipe, work_dir / RECIPE_FILE)

    bank_spec = BankSpec(teacher.name, teacher.sha256, list(HEADS), recipe.bank_size, recipe.heldout,
                         config.chunk_size or teacher.chunk_size, recipe.seed, teacher.noise.dim, teacher.n_classes,
                         recipe.classes, teacher.noise.truncation)
    bank_dir = Path(config.bank_dir) if config.bank_dir else runs / family / f"bank-s{recipe.seed}-n{recipe.bank_size}"
    generate_bank(teacher.query, bank_spec, bank_dir, draw_z=teacher.draw_z)
    bank, heldout = Bank(bank_dir, "train"), Bank(bank_dir, "heldout")

    students, log, seconds = {}, [], {}
    for mechanism, student_config in configs.items():
        students[mechanism], mechanism_log, seconds[mechanism] = train_student(
            mechanism, bank, student_config, recipe, device, work_dir / f"{mechanism}.pt", config.checkpoint_every,
            config.log_every)
        log += mechanism_log
    students = {m: s.cpu() for m, s in students.items()}
    cpu = torch.device("cpu")

    with atomic_directory(out, overwrite=config.overwrite) as tmp:
        print("evaluating on held-out pairs ...")
        metrics = evaluate(students, bank, heldout, recipe.heldout, cpu)
        render_comparison(students, heldout, cpu, tmp / "teacher_vs_student.png")
        write_loss_log(log, tmp / "losses.csv", tmp / "loss_curves.png")
        print("exporting ONNX and checking parity ...")
        blocks = export_students(students, tmp, seed=recipe.seed, fold=recipe.fold_labels)
        training = training_block(recipe, configs, betas=list(BETAS), device=str(device),
                                  seconds={m: round(t, 1) for m, t in seconds.items()}, bank=bank_spec.to_dict())
        write_manifest(tmp, build_manifest(tmp, version, teacher, blocks, students, recipe, training, metrics))
    print(json.dumps(metrics, indent=2))
    if config.promote:
        from training.registry import promote

        promote(out.parent.parent, family, version)
        print(f"promoted {family}/{version}")
    print(f"wrote {out}")
    return out
