"""Distil each mechanism of a pretrained CGN into a TinyGAN student by a recipe; evaluate, export to ONNX, write a
manifest that records the recipe.

Examples:
    # the default recipe: the one double_colored_mnist v5 shipped with
    python training/distill.py --teacher double_colored --teacher-path ../shared/teachers/cgn_mnist \\
        --out models/double_colored_mnist/v6 --promote
    # re-run a shipped version, or a recipe file (YAML or JSON), or a named preset
    python training/distill.py ... --recipe models/double_colored_mnist/v2
    python training/distill.py ... --recipe my_recipe.yaml
    python training/distill.py ... --preset tinygan

Recipes (training/recipe.py) hold every stage of a run. The flags under "edits" change the recipe: run edits
apply to any recipe; stage edits edit a one-stage recipe, make one stage of the default recipe's first, or, with
--resume, add a stage after the recipe's (the new --lr up to the new --steps total). Checkpoints and recipe.json
live in the work folder (default <runs>/<family>/<version>); --resume continues at the stage and step they reached.
The version folder appears only when export, parity and evaluation all succeed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.vocabulary import MECHANISMS
from training.export import ParityError
from training.fetch import ChecksumError
from training.recipe import RecipeChanges, StudentPreset, load_preset, load_recipe, preset_names
from training.students import HEAD_KINDS, UPSAMPLE_MODES
from training.teachers.loading import TeacherError, teacher_names
from training.trainer import DistillConfig, DistillError, run

WEIGHT_FLAGS = {"lambda_pix": "pix", "pix_decay": "pix_decay", "lambda_adv": "adv", "lambda_feat": "feat",
                "lambda_kl": "kl", "lambda_iou": "iou", "feature_weights": "feature_layers"}


def numbers(kind):
    """argparse type for comma-separated numbers."""
    def parse(text: str) -> list:
        try:
            return [kind(value) for value in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def steps(text: str) -> dict[str, int]:
    """`6000` for every mechanism, or `shape=6000,texture=2000` (only the mechanisms named)."""
    try:
        if "=" not in text:
            return {m: int(text) for m in MECHANISMS}
        named = {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or mechanism=N pairs, got {text!r}") from None
    if set(named) - set(MECHANISMS):
        raise argparse.ArgumentTypeError(f"unknown mechanism(s) {sorted(set(named) - set(MECHANISMS))}")
    return named


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help=f"one of: {', '.join(teacher_names())}")
    parser.add_argument("--teacher-path", help="teacher checkpoint (file, or folder holding <teacher>.pth)")
    parser.add_argument("--allow-unknown-teacher", action="store_true", help="accept a checkpoint of unknown sha256")
    parser.add_argument("--truncation", type=float,
                        help="ImageNet noise truncation in (0, 1] (default 0.5, as CGN); MNIST teachers take none")
    parser.add_argument("--out", required=True, help="version folder to create, e.g. models/double_colored_mnist/v3")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--promote", action="store_true", help="point <family>/LATEST at the new version on success")

    source = parser.add_argument_group("recipe (default: the one double_colored_mnist v5 shipped with)")
    chosen = source.add_mutually_exclusive_group()
    chosen.add_argument("--recipe", help="a .yaml or .json recipe, a version folder (its manifest's recipe) or a "
                                         "work folder (its recipe.json)")
    chosen.add_argument("--preset", choices=preset_names(), help="a named recipe from training/recipes/")

    run_edits = parser.add_argument_group("run edits (any recipe)")
    run_edits.add_argument("--mechanisms", type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
                           help=f"train only these, comma-separated (of {', '.join(MECHANISMS)})")
    run_edits.add_argument("--channels", type=numbers(int), help="student widths for every mechanism, 4×4 first")
    run_edits.add_argument("--embed-dim", type=int, help="student class-embedding size for every mechanism")
    run_edits.add_argument("--upsample", choices=UPSAMPLE_MODES, help="student upsampling for every mechanism")
    run_edits.add_argument("--head", choices=HEAD_KINDS,
                           help="how students make the last ×2: conv (a full-size block, then a 3×3 conv; what "
                                "--channels alone means) or subpixel (a 3×3 conv at half size and depth-to-space; "
                                "--channels then lists one width fewer)")
    run_edits.add_argument("--disc-channels", type=numbers(int), help="discriminator widths, e.g. 16,32,64,128,128")
    run_edits.add_argument("--seed", type=int, help="seeds the bank, the initialisation and the batch order")
    run_edits.add_argument("--bank-size", type=int, help="training samples in the bank (teacher default: 50,000 for "
                                                         "MNIST, 10,000 for ImageNet)")
    run_edits.add_argument("--heldout", type=int, help="held-out pairs for evaluation (at least 2,000 to report)")
    run_edits.add_argument("--classes", type=numbers(int), help="train on these labels only (comma-separated)")

    stage_edits = parser.add_argument_group("stage edits")
    stage_edits.add_argument("--steps", type=steps,
                             help="total steps: N, or per mechanism, e.g. shape=6000,texture=2000 (unnamed "
                                  "mechanisms: the largest value, or on --resume their current total)")
    stage_edits.add_argument("--lr", type=float, help="Adam learning rate")
    stage_edits.add_argument("--batch-size", type=int)
    stage_edits.add_argument("--lambda-pix", type=float)
    stage_edits.add_argument("--pix-decay", type=float, help="λ_pix decrease per epoch of the run, floored at 0")
    stage_edits.add_argument("--lambda-adv", type=float)
    stage_edits.add_argument("--lambda-feat", type=float)
    stage_edits.add_argument("--lambda-kl", type=float)
    stage_edits.add_argument("--lambda-iou", type=float, help="soft mask IoU against the teacher's binarised mask "
                                                             "(shape student only; default 0)")
    stage_edits.add_argument("--feature-weights", type=numbers(float), help="one per discriminator layer")

    where = parser.add_argument_group("where and how")
    where.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    where.add_argument("--bank-dir", type=Path,
                       help="sample bank folder (default <runs>/<family>/bank-s<seed>-n<size>)")
    where.add_argument("--chunk-size", type=int, help="bank samples per chunk (default: the teacher's)")
    where.add_argument("--work-dir", type=Path, help="checkpoints and recipe.json (default <runs>/<family>/<version>)")
    where.add_argument("--resume", action="store_true", help="continue from the checkpoints in the work folder")
    where.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (and each "
                                                                          "stage's end)")
    where.add_argument("--log-every", type=int, default=25)
    return parser


def parse_args(argv: list[str] | None) -> DistillConfig:
    """The command line as a DistillConfig (a recipe that cannot be read raises RecipeError)."""
    args = build_parser().parse_args(argv)
    recipe = load_recipe(args.recipe) if args.recipe else load_preset(args.preset) if args.preset else None
    changes = RecipeChanges(
        mechanisms=args.mechanisms, student=StudentPreset(args.channels, args.embed_dim, args.upsample, args.head),
        discriminator_channels=args.disc_channels, seed=args.seed, bank_size=args.bank_size, heldout=args.heldout,
        classes=args.classes, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        weights={name: getattr(args, flag) for flag, name in WEIGHT_FLAGS.items() if getattr(args, flag) is not None},
    )
    return DistillConfig(
        teacher=args.teacher, out=Path(args.out), recipe=recipe, changes=changes, teacher_path=args.teacher_path,
        allow_unknown_teacher=args.allow_unknown_teacher, truncation=args.truncation, overwrite=args.overwrite,
        promote=args.promote, device=args.device, work_dir=args.work_dir, bank_dir=args.bank_dir,
        chunk_size=args.chunk_size, resume=args.resume, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except (DistillError, TeacherError, ChecksumError, ParityError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
