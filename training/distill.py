"""Distil each mechanism of a pretrained CGN into a TinyGAN student, evaluate, export to ONNX, write a manifest.

Example:
    python training/distill.py --teacher double_colored --teacher-path ../shared/teachers/cgn_mnist \
        --out models/double_colored_mnist/v1 --promote

The teacher is a black box: the students see only (z, y, T(z, y)) triples from the sample bank. Training
checkpoints live in the work folder (default runs/<family>/<version>) and `--resume` continues from them.
The version folder appears only when export, parity and evaluation all succeed.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python training/distill.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from core.atomic import atomic_directory, atomic_path
from core.hashing import sha256_file
from core.manifest import SCHEMA_VERSION, validate_version_name, write_manifest
from core.metrics import mask_iou, mean_l1, psnr, summarise_psnr
from core.noise import NoiseSpec
from training import losses
from training.bank import OUTPUT_KEY, Bank, BankSpec, generate_bank
from training.export import ParityError, export_students
from training.fetch import ChecksumError
from training.plots import save_figure
from training.students import (
    HEADS, UPSAMPLE_MODES, ProjectionDiscriminator, StudentConfig, TinyGenerator, count_parameters,
)
from training.teachers.loading import TeacherAdapter, TeacherError, load_teacher_adapter, teacher_names

VALUE_RANGE = {"shape": (0.0, 1.0), "texture": (-1.0, 1.0), "background": (-1.0, 1.0)}
# Evaluation reads the bank a batch at a time: at 256 px a whole held-out split is GBs.
EVAL_BATCH = 32
BASELINE_MEMORY = 256 << 20  # bytes of per-class float64 sums the class-mean baseline holds at once
COMPARISON_COLUMNS = 10
LOG_FIELDS = ["mechanism", "step", "epoch", "loss_d", "loss_g", "pix", "adv", "feat", "kl", "lambda_pix", "lr"]


class DistillError(RuntimeError):
    """A problem the user can fix: printed as one line, with nothing half-written left behind."""


@dataclass
class LossWeights:
    """Defaults are TinyGAN's; λ_kl (SKDCGN's addition) has no TinyGAN value, see training/losses.py."""

    pix: float = 0.2
    pix_decay: float = 0.01  # per epoch over the bank, floored at 0
    adv: float = 0.01
    feat: float = 1.0
    kl: float = 0.1
    feature_layers: list[float] = field(default_factory=lambda: list(losses.FEATURE_WEIGHTS))

    def pixel_weight(self, epoch: float) -> float:
        return max(0.0, self.pix - self.pix_decay * int(epoch))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DistillError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def to_discriminator_range(x: torch.Tensor, mechanism: str) -> torch.Tensor:
    return x * 2.0 - 1.0 if mechanism == "shape" else x


def train_student(
    mechanism: str,
    bank: Bank,
    config: StudentConfig,
    weights: LossWeights,
    args: argparse.Namespace,
    device: torch.device,
    work_dir: Path,
) -> tuple[TinyGenerator, list[dict]]:
    """Train one student with checkpoints every --checkpoint-every steps; resumes from the last one."""
    torch.manual_seed(args.seed)
    student = TinyGenerator(config, mechanism).to(device)
    disc = ProjectionDiscriminator(HEADS[mechanism][1], config.n_classes, args.disc_channels).to(device)
    opt_g = torch.optim.Adam(student.parameters(), lr=args.lr, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.0, 0.9))
    rng = np.random.default_rng([args.seed, list(HEADS).index(mechanism)])
    checkpoint_path = work_dir / f"{mechanism}.pt"
    log: list[dict] = []
    start, earlier_seconds = 0, 0.0
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        student.load_state_dict(state["student"])
        disc.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        for group in opt_g.param_groups + opt_d.param_groups:  # --lr given now wins over the checkpoint's
            group["lr"] = args.lr
        rng.bit_generator.state = state["rng"]
        log, start = state["log"], state["step"]
        earlier_seconds = state.get("seconds", 0.0)
    started = time.time()

    def save(step: int) -> None:
        state = {"student": student.state_dict(), "discriminator": disc.state_dict(), "opt_g": opt_g.state_dict(),
                 "opt_d": opt_d.state_dict(), "rng": rng.bit_generator.state, "log": log, "step": step,
                 "config": config.to_dict(), "seconds": earlier_seconds + time.time() - started}
        with atomic_path(checkpoint_path) as tmp:
            torch.save(state, tmp)

    key = OUTPUT_KEY[mechanism]
    value_range = VALUE_RANGE[mechanism]
    student.train()
    disc.train()
    steps = args.steps[mechanism]
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"distil {mechanism}", unit="step")
    for step in bar:
        z, y, target = (torch.from_numpy(a).to(device) for a in bank.sample(key, args.batch_size, rng))
        epoch = step * args.batch_size / len(bank)
        fake = student(z, y)
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
        terms = {
            "pix": losses.pixel_l1(fake, target),
            "adv": losses.hinge_generator(fake_scores),
            "feat": losses.feature_l1(fake_features, real_features, weights.feature_layers),
            "kl": losses.bernoulli_kl(fake, target, value_range),
        }
        lambda_pix = weights.pixel_weight(epoch)
        loss_g = (weights.feat * terms["feat"] + lambda_pix * terms["pix"] + weights.adv * terms["adv"]
                  + weights.kl * terms["kl"])
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        if step % args.log_every == 0 or step == steps - 1:
            row = {"mechanism": mechanism, "step": step, "epoch": round(epoch, 4), "loss_d": loss_d.item(),
                   "loss_g": loss_g.item(), "lambda_pix": lambda_pix, "lr": args.lr,
                   **{k: v.item() for k, v in terms.items()}}
            log.append(row)
            bar.set_postfix(pix=f"{row['pix']:.4f}", feat=f"{row['feat']:.3f}", kl=f"{row['kl']:.4f}")
        if (step + 1) % args.checkpoint_every == 0:
            save(step + 1)
    bar.close()
    if start < steps:
        save(steps)
    return student.eval(), log, earlier_seconds + time.time() - started


def predict(student: TinyGenerator, z: np.ndarray, y: np.ndarray, device: torch.device, batch: int = 500) -> np.ndarray:
    with torch.no_grad():
        parts = [student(torch.from_numpy(z[i:i + batch]).to(device), torch.from_numpy(y[i:i + batch]).to(device)).cpu()
                 for i in range(0, len(z), batch)]
    return torch.cat(parts).numpy()


def class_means(bank: Bank, key: str, classes: np.ndarray, limit: int = 10000) -> np.ndarray:
    """[len(classes), ...] mean teacher output of each (sorted) label over the first `limit` training
    samples, zeros for a label never seen; reads only those labels' samples, a batch at a time."""
    y = bank.load(["y"], limit)["y"]
    rows = np.flatnonzero(np.isin(y, classes))
    sums = np.zeros((len(classes), *bank.take([key], [0])[key].shape[1:]), np.float64)
    counts = np.zeros(len(classes), np.int64)
    for start in range(0, len(rows), EVAL_BATCH):
        batch = rows[start:start + EVAL_BATCH]
        values, slots = bank.take([key], batch)[key], np.searchsorted(classes, y[batch])
        for slot in np.unique(slots):
            sums[slot] += values[slots == slot].sum(axis=0)
            counts[slot] += int((slots == slot).sum())
    return (sums / np.maximum(counts, 1).reshape(-1, *[1] * (sums.ndim - 1))).astype(np.float32)


def fidelity_scores(mechanism: str, student_out: np.ndarray, teacher_out: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample scores, so that batches pool into exactly the whole-set summary."""
    if mechanism == "shape":
        return {"mask_iou": mask_iou(student_out, teacher_out), "l1": mean_l1(student_out, teacher_out)}
    return {"l1": mean_l1(student_out, teacher_out), "psnr": psnr(student_out, teacher_out)}


def summarise_scores(batches: list[dict[str, np.ndarray]]) -> dict:
    pooled = {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}
    return {name: summarise_psnr(values) if name == "psnr" else float(values.mean()) for name, values in pooled.items()}


def fidelity(mechanism: str, student_out: np.ndarray, teacher_out: np.ndarray) -> dict:
    return summarise_scores([fidelity_scores(mechanism, student_out, teacher_out)])


def evaluate(students: dict, bank: Bank, heldout: Bank, limit: int, device: torch.device) -> dict:
    """Each student and the class-mean baseline (each label's mean teacher output: the floor a student must
    clearly beat) against the teacher on the first `limit` held-out pairs, streamed in batches."""
    y_eval = heldout.load(["y"], limit)["y"]
    metrics = {"heldout_pairs": int(len(y_eval))}
    for mechanism, student in students.items():
        key = OUTPUT_KEY[mechanism]
        student_scores, baseline_scores = [], []
        for start in range(0, len(y_eval), EVAL_BATCH):
            data = heldout.take(["z", "y", key], np.arange(start, min(start + EVAL_BATCH, len(y_eval))))
            student_scores.append(fidelity_scores(mechanism, predict(student, data["z"], data["y"], device), data[key]))
        labels = np.unique(y_eval)
        per_label_bytes = 8 * int(np.prod(heldout.take([key], [0])[key].shape[1:]))
        group = max(1, BASELINE_MEMORY // per_label_bytes)
        for first in range(0, len(labels), group):
            classes = labels[first:first + group]
            means = class_means(bank, key, classes)
            rows = np.flatnonzero(np.isin(y_eval, classes))
            for start in range(0, len(rows), EVAL_BATCH):
                batch = rows[start:start + EVAL_BATCH]
                predicted = means[np.searchsorted(classes, y_eval[batch])]
                baseline_scores.append(fidelity_scores(mechanism, predicted, heldout.take([key], batch)[key]))
        metrics[mechanism] = {**summarise_scores(student_scores),
                              "class_mean_baseline": summarise_scores(baseline_scores)}
    return metrics


def render_comparison(students: dict, heldout: Bank, device: torch.device, path: Path) -> None:
    """Teacher row above student row for each mechanism, one column per label (the first
    COMPARISON_COLUMNS labels present), same (z, y)."""
    from core.imageio import encode, labelled_rows, to_uint8

    _, first = np.unique(heldout.load(["y"])["y"], return_index=True)
    data = heldout.take(["z", "y"] + [OUTPUT_KEY[m] for m in students], first[:COMPARISON_COLUMNS])
    rows = []
    for mechanism, student in students.items():
        teacher_out = data[OUTPUT_KEY[mechanism]]
        student_out = predict(student, data["z"], data["y"], device)
        rows += [to_uint8(teacher_out, VALUE_RANGE[mechanism]), to_uint8(student_out, VALUE_RANGE[mechanism])]
    scale = max(1, 96 // teacher_out.shape[-1])  # 32-px MNIST grids are upscaled to stay legible
    with atomic_path(path) as tmp:
        tmp.write_bytes(encode(labelled_rows(rows, columns=len(data["y"]), scale=scale)))


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
        steps = [row["step"] for row in rows]
        for term in ("pix", "feat", "kl", "loss_d", "adv"):
            ax.plot(steps, [abs(row[term]) + 1e-8 for row in rows], label=term if term != "adv" else "|adv|")
        ax.set_yscale("log")
        ax.set_title(f"{mechanism} student")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    save_figure(fig, png_path)


def parse_steps(text: str, mechanisms: list[str], parser: argparse.ArgumentParser) -> dict[str, int]:
    """`6000` for every mechanism, or `shape=6000,texture=2000` (unnamed mechanisms take the largest value)."""
    try:
        if "=" not in text:
            return {m: int(text) for m in mechanisms}
        named = {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        parser.error(f"--steps must be N or mechanism=N pairs, got {text!r}")
    if set(named) - set(HEADS):
        parser.error(f"--steps names unknown mechanism(s) {sorted(set(named) - set(HEADS))}")
    return {m: named.get(m, max(named.values())) for m in mechanisms}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help=f"one of: {', '.join(teacher_names())}")
    parser.add_argument("--teacher-path", help="teacher checkpoint (file, or folder holding <teacher>.pth)")
    parser.add_argument("--allow-unknown-teacher", action="store_true", help="accept a checkpoint of unknown sha256")
    parser.add_argument("--truncation", type=float,
                        help="ImageNet noise truncation in (0, 1] (default 0.5, as CGN); MNIST teachers take none")
    parser.add_argument("--out", required=True, help="version folder to create, e.g. models/double_colored_mnist/v2")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--promote", action="store_true", help="point <family>/LATEST at the new version on success")
    parser.add_argument("--mechanisms", default="shape,texture,background")
    parser.add_argument("--steps", default="6000",
                        help="training steps per mechanism: N, or per mechanism, e.g. shape=6000,texture=2000")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (on --resume it replaces the saved one)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels", default=None,
                        help="student widths, comma-separated (4×4 first; default: the teacher's student preset)")
    parser.add_argument("--embed-dim", type=int, help="student class-embedding size (default: the teacher's preset)")
    parser.add_argument("--upsample", choices=UPSAMPLE_MODES,
                        help="student upsampling (default: the teacher's preset)")
    parser.add_argument("--disc-channels", default="16,32,64,128,128")
    parser.add_argument("--lambda-pix", type=float, default=0.2)
    parser.add_argument("--pix-decay", type=float, default=0.01)
    parser.add_argument("--lambda-adv", type=float, default=0.01)
    parser.add_argument("--lambda-feat", type=float, default=1.0)
    parser.add_argument("--lambda-kl", type=float, default=0.1)
    parser.add_argument("--feature-weights", default=",".join(f"{w:g}" for w in losses.FEATURE_WEIGHTS))
    parser.add_argument("--bank-dir", help="sample bank folder (default runs/<family>/bank-s<seed>-n<size>)")
    parser.add_argument("--bank-size", type=int, help="training samples in the bank (default: 50,000 for MNIST, "
                                                     "10,000 for ImageNet)")
    parser.add_argument("--heldout", type=int, default=2000, help="held-out pairs for evaluation (at least 2,000)")
    parser.add_argument("--chunk-size", type=int, help="bank samples per chunk (default: the teacher's)")
    parser.add_argument("--classes", help="restrict training to these labels (comma-separated)")
    parser.add_argument("--work-dir", help="checkpoints and logs (default runs/<family>/<version>)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work-dir")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    args.mechanisms = [m.strip() for m in args.mechanisms.split(",") if m.strip()]
    unknown = [m for m in args.mechanisms if m not in HEADS]
    if unknown or not args.mechanisms:
        parser.error(f"unknown mechanism(s) {unknown}; choose from {', '.join(HEADS)}")
    args.steps = parse_steps(args.steps, args.mechanisms, parser)
    args.disc_channels = [int(v) for v in args.disc_channels.split(",")]
    args.feature_weights = [float(v) for v in args.feature_weights.split(",")]
    if len(args.feature_weights) != len(args.disc_channels):
        parser.error("--feature-weights needs one weight per discriminator layer (--disc-channels)")
    args.classes = [int(v) for v in args.classes.split(",")] if args.classes else None
    return args


def run(args: argparse.Namespace) -> Path:
    if args.teacher not in teacher_names():
        raise DistillError(f"unknown teacher {args.teacher!r}; choose one of {', '.join(teacher_names())}")
    out = Path(args.out)
    version = validate_version_name(out.name)
    if out.exists() and not args.overwrite:
        raise DistillError(f"{out} already exists; pass --overwrite to replace it or choose another version")
    device = pick_device(args.device)
    teacher: TeacherAdapter = load_teacher_adapter(args.teacher, args.teacher_path, args.allow_unknown_teacher, device,
                                                   args.truncation)
    if args.classes and not all(0 <= c < teacher.n_classes for c in args.classes):
        raise DistillError(f"--classes must lie in 0..{teacher.n_classes - 1}, got {args.classes}")
    family = teacher.family
    if args.promote and out.parent.name != family:
        raise DistillError(f"--promote needs --out inside the family folder, e.g. models/{family}/{version}")
    runs = Path(os.environ.get("SKDCGN_RUNS_DIR", "runs"))
    work_dir = Path(args.work_dir) if args.work_dir else runs / family / version
    if work_dir.exists() and any(work_dir.glob("*.pt")) and not args.resume:
        raise DistillError(f"{work_dir} holds checkpoints of an earlier run: pass --resume to continue it")
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.heldout < 1:
        raise DistillError("--heldout must be positive")
    weights = LossWeights(args.lambda_pix, args.pix_decay, args.lambda_adv, args.lambda_feat, args.lambda_kl,
                          args.feature_weights)

    bank_size = args.bank_size if args.bank_size is not None else teacher.bank_size
    chunk_size = args.chunk_size if args.chunk_size is not None else teacher.chunk_size
    bank_spec = BankSpec(teacher.name, teacher.sha256, list(HEADS), bank_size, args.heldout, chunk_size,
                         args.seed, teacher.noise.dim, teacher.n_classes, args.classes, teacher.noise.truncation)
    bank_dir = Path(args.bank_dir) if args.bank_dir else runs / family / f"bank-s{args.seed}-n{bank_size}"
    generate_bank(teacher.query, bank_spec, bank_dir, draw_z=teacher.draw_z)
    bank, heldout = Bank(bank_dir, "train"), Bank(bank_dir, "heldout")

    preset = teacher.student_preset()
    if args.channels:
        preset["channels"] = [int(c) for c in args.channels.split(",")]
    if args.embed_dim is not None:
        preset["embed_dim"] = args.embed_dim
    if args.upsample:
        preset["upsample"] = args.upsample
    config = StudentConfig(z_dim=teacher.noise.dim, n_classes=teacher.n_classes, image_size=teacher.image_size, **preset)
    students, log, train_seconds = {}, [], {}
    for mechanism in args.mechanisms:
        students[mechanism], mechanism_log, train_seconds[mechanism] = train_student(
            mechanism, bank, config, weights, args, device, work_dir)
        log += mechanism_log
    students = {m: s.cpu() for m, s in students.items()}
    cpu = torch.device("cpu")

    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        print("evaluating on held-out pairs ...")
        metrics = evaluate(students, bank, heldout, args.heldout, cpu)
        render_comparison(students, heldout, cpu, tmp / "teacher_vs_student.png")
        write_loss_log(log, tmp / "losses.csv", tmp / "loss_curves.png")
        print("exporting ONNX and checking parity ...")
        blocks = export_students(students, tmp, seed=args.seed)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "family": family,
            "version": version,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "teacher": {"name": teacher.name, "sha256": teacher.sha256, "parameters": teacher.parameters},
            "image_size": teacher.image_size,
            "noise": teacher.noise.to_manifest(),
            "texture_shuffle": teacher.texture_shuffle,
            "labels": {"count": teacher.n_classes, "names": teacher.label_names},
            **blocks,
            "student_parameters": {m: count_parameters(s) for m, s in students.items()},
            "training": {
                "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "betas": [0.0, 0.9],
                "seed": args.seed, "device": str(device), "seconds": {m: round(t, 1) for m, t in train_seconds.items()},
                "student": config.to_dict(), "discriminator_channels": args.disc_channels,
                "loss_weights": weights.__dict__, "kl": "mean per-pixel Bernoulli KL(teacher || student)",
                "bank": bank_spec.to_dict(), "classes": args.classes,
            },
            "metrics": metrics,
            "files": {path.name: sha256_file(path) for path in sorted(tmp.iterdir()) if path.is_file()},
        }
        write_manifest(tmp, manifest)
    print(json.dumps(metrics, indent=2))
    if args.promote:
        from training.registry import promote

        promote(out.parent.parent, family, version)
        print(f"promoted {family}/{version}")
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (DistillError, TeacherError, ChecksumError, ParityError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
