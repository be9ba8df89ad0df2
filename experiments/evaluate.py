"""Research on shipped students against their CGN teacher: fidelity, the invariant-classifier experiment and the
SKDCGN paper's experiments (`python -m experiments`; `make eval` runs `all`).

Examples:
    python -m experiments fidelity --family double_colored_mnist
    python -m experiments invariance --family double_colored_mnist --mask both            # 20k images, 6 epochs, 3 seeds
    python -m experiments invariance --family wildlife_mnist --paper-scale               # 100k images, 10 epochs
    python -m experiments invariance --family double_colored_mnist --images 2000 --epochs 1 --seeds 0
    python -m experiments all                                                           # every shipped family
    python -m experiments render     # rewrite the RESULTS.md sections from the JSON files (re-make sections too)

The re-make check belongs to distillation: `python -m training.evaluate remake` (training/evaluate.py).

The SKDCGN paper's experiments (experiments/paper.py; JSON benchmarks/results/paper_*.json, sections of
docs/RESULTS.md under "The SKDCGN paper's experiments" and "Paper claims" at the top):
    python -m experiments table1 --family double_colored_mnist --seeds 0          # Table 1, four columns
    python -m experiments transparency --family wildlife_mnist                   # a = 0.75 vs unmodified
    python -m experiments transparency --family double_colored_mnist --paper-scale --seeds 0
    python -m experiments original-plus-cf --family double_colored_mnist --seeds 0 # CGN Table 2's protocol
    python -m experiments baseline --gan-minutes 20 --seeds 0    # §4.2: TinyGAN CGN from scratch, compared

Results go to --results-dir as JSON and into marked sections of --results-md.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import torch

from core.compose import PAPER_STUDY, UNMODIFIED
from core.manifest import ManifestError, VersionNotFound, latest_version
from core.runtime import ModelRuntime
from core.settings import Paths
from experiments import paper_report
from experiments.baseline_cgn import CGN_STEPS
from experiments.classifier import TrainConfig
from experiments.fidelity import digit_recogniser, evaluate_fidelity
from experiments.invariance import InvarianceConfig, run_experiment
from experiments.paper import COLUMNS
from experiments.sources import student_source, teacher_source
from reporting import report
from training.evaluate import render_remake

PAPER_COMMANDS = ("table1", "transparency", "original-plus-cf", "baseline")

EVALUATED_FAMILIES = ("double_colored_mnist", "wildlife_mnist", "colored_mnist")  # fidelity: every MNIST family
INVARIANCE_FAMILIES = ("double_colored_mnist", "wildlife_mnist")  # the families with a real-data recipe
PAPER_SCALE = {"images": 100_000, "epochs": 10}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    paths = Paths.from_env()  # defaults: the model repository and ../shared (teachers, MNIST, textures)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["fidelity", "invariance", "all", "render", *PAPER_COMMANDS])
    parser.add_argument("--family", help=f"model family (default for `all`: every shipped one of {EVALUATED_FAMILIES}; the "
                        f"invariant-classifier experiment runs for {INVARIANCE_FAMILIES})")
    parser.add_argument("--models-dir", default=str(paths.models_dir),
                        help="model repository (default $SKDCGN_MODELS_DIR, else models)")
    parser.add_argument("--version", help="student version (default the family's LATEST)")
    parser.add_argument("--teacher-path", default=str(paths.shared_dir / "teachers" / "cgn_mnist"))
    parser.add_argument("--data-dir", default=str(paths.shared_dir / "data"), help="holds mnist/ and textures/")
    parser.add_argument("--pairs", type=int, default=2000, help="held-out pairs for fidelity")
    parser.add_argument("--baseline-pairs", type=int, default=5000, help="teacher samples for the class-mean baseline")
    parser.add_argument("--recogniser-epochs", type=int, default=3, help="epochs of the digit CNN that reads masks")
    parser.add_argument("--images", type=int, default=20_000, help="counterfactuals per arm")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data and classifier)")
    parser.add_argument("--per-shape", type=int, default=10, help="counterfactuals per mask")
    parser.add_argument("--paper-scale", action="store_true", help="100,000 images and 10 epochs, as in CGN")
    parser.add_argument("--mask", choices=["unmodified", "modified", "both"], default="both",
                        help="modified: noise σ 0.1, rotation ±90°, transparency 0.75 (the shape study)")
    parser.add_argument("--arms", default="real,teacher,student", help="which arms to train (real, teacher, student)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch and onnxruntime threads (0: their defaults; 1 is much faster on a busy CPU)")
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--results-md", default="docs/RESULTS.md")
    parser.add_argument("--note", default="", help="a line added under each written section (e.g. 'dev model')")
    paper = parser.add_argument_group("the SKDCGN paper's experiments")
    paper.add_argument("--columns", default=",".join(COLUMNS), help=f"table1: which of {', '.join(COLUMNS)}")
    paper.add_argument("--parts", default="detector,digit", help="table1: detector (real vs counterfactual), digit")
    paper.add_argument("--detector-images", type=int, default=5000,
                       help="table1/baseline: real and counterfactual images per class in each of train and test")
    paper.add_argument("--figures-dir", default=None, help="where sample grids go (default: beside --results-md)")
    paper.add_argument("--gan-steps", type=int, default=CGN_STEPS, help="baseline: generator steps (CGN: 4,690)")
    paper.add_argument("--gan-minutes", type=float, default=None, help="baseline: wall-clock cap of this call's training")
    paper.add_argument("--gan-batch", type=int, default=64)
    paper.add_argument("--work-dir", default="runs/baseline_cgn", help="baseline: checkpoints (a rerun resumes)")
    paper.add_argument("--skip-training", action="store_true", help="baseline: evaluate the saved generators only")
    args = parser.parse_args(argv)
    if args.paper_scale:
        args.images, args.epochs = PAPER_SCALE["images"], PAPER_SCALE["epochs"]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if set(args.arms) - {"real", "teacher", "student"} or not args.seeds:
        parser.error("--arms takes real, teacher, student; --seeds needs at least one seed")
    if args.command in ("fidelity", "invariance", "transparency", "original-plus-cf") and not args.family:
        parser.error(f"{args.command} needs --family")
    if args.command in ("table1", "baseline"):
        args.family = args.family or "double_colored_mnist"
    args.columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(args.columns) - set(COLUMNS) or set(args.parts) - {"detector", "digit"}:
        parser.error(f"--columns takes {', '.join(COLUMNS)}; --parts takes detector, digit")
    return args


def render_fidelity(results_md: str, result: dict) -> str:
    body = report.fidelity_markdown(result["family"], result["version"], result) + "\n\n" + result["note"]
    report.update_section(results_md, f"fidelity-{result['family']}", body)
    return body


def render_invariance(results_md: str, result: dict, results_dir: str) -> str:
    """The study's section, and the side-by-side shape study once both mask settings have results."""
    family = result["family"]
    body = report.invariance_markdown(result, " ".join(dict.fromkeys(n for n in result.get("notes", {}).values() if n)))
    report.update_section(results_md, f"invariance-{family}-{result['mask']['setting']}", body)
    studies = {s: Path(results_dir) / f"invariance_{family}_{s}.json" for s in ("unmodified", "modified")}
    if all(path.is_file() for path in studies.values()):
        both = {s: json.loads(path.read_text()) for s, path in studies.items()}
        report.update_section(results_md, f"invariance-{family}-shape-study",
                              report.shape_study_markdown(both["unmodified"], both["modified"]))
    return body


def render_all(args: argparse.Namespace) -> None:
    """Rewrite every evaluation section from the JSON files, e.g. after arms were trained in separate runs."""
    for path in sorted(Path(args.results_dir).glob("fidelity_*.json")):
        render_fidelity(args.results_md, json.loads(path.read_text()))
    for path in sorted(Path(args.results_dir).glob("invariance_*.json")):
        render_invariance(args.results_md, json.loads(path.read_text()), args.results_dir)
    for path in sorted(Path(args.results_dir).glob("remake_*.json")):
        render_remake(args.results_md, json.loads(path.read_text()))
    paper_report.render_all(args.results_dir, args.results_md)


def paper_sources(args: argparse.Namespace, family: str) -> dict:
    """The teacher and the family's LATEST students (or --version), as evaluation sources."""
    students = ModelRuntime.from_repository(args.models_dir, family, args.version, threads=args.threads)
    return {"teacher": teacher_source(family, args.teacher_path), "student": student_source(students)}


def run_paper(args: argparse.Namespace) -> None:
    """One of the SKDCGN paper's experiments, then every paper section of the results page."""
    from experiments import paper

    family, texture_dir = args.family, Path(args.data_dir) / "textures"
    figures_dir = args.figures_dir or str(Path(args.results_md).parent)
    real = paper.RealData(family, args.data_dir, texture_dir)
    invariance = InvarianceConfig(images=args.images, per_shape=args.per_shape, seeds=args.seeds,
                                  train=TrainConfig(epochs=args.epochs))
    detector = paper.DetectorConfig(images_per_class=args.detector_images, per_shape=args.per_shape, seeds=args.seeds,
                                    train=TrainConfig(epochs=args.epochs))
    if args.command == "table1":
        paper.run_table1(family, paper_sources(args, family), invariance, detector, real, args.results_dir, figures_dir,
                         args.columns, run_digit="digit" in args.parts, run_detector="detector" in args.parts)
    elif args.command == "transparency":
        paper.run_transparency(family, paper_sources(args, family), invariance, real, args.results_dir, args.paper_scale)
    elif args.command == "original-plus-cf":
        paper.run_original_plus_cf(family, paper_sources(args, family), invariance, real, args.results_dir,
                                   args.paper_scale)
    else:
        run_baseline(args, family, invariance, detector, real, figures_dir)
    paper_report.render_all(args.results_dir, args.results_md)


def run_baseline(args, family, invariance, detector, real, figures_dir) -> None:
    from experiments import baseline_cgn
    from experiments import paper
    from experiments.fidelity import digit_recogniser

    if family != "double_colored_mnist":
        raise ValueError("the §4.2 baseline is defined on double_colored_mnist")
    config = baseline_cgn.BaselineConfig(steps=args.gan_steps, batch_size=args.gan_batch, max_minutes=args.gan_minutes)
    work_dir = Path(args.work_dir)
    recogniser = digit_recogniser(args.data_dir, args.recogniser_epochs)  # reads masks; frozen copy: style features
    if args.skip_training:
        training = json.loads((work_dir / "training.json").read_text())
    else:
        style_net = baseline_cgn.ChannelwiseStyleFeatures(copy.deepcopy(recogniser[0]))
        biased = real.biased_train(0)
        training = baseline_cgn.train_baseline(config, biased.images, biased.labels, style_net, work_dir)
    generators = baseline_cgn.load_generators(work_dir)
    name = f"baseline:tinygan-cgn/{training['steps_done']}-steps"
    sources = {**paper_sources(args, family), "baseline": baseline_cgn.baseline_source(generators, name)}
    paper.run_baseline(family, sources, training, invariance, detector, real, args.results_dir, figures_dir,
                       args.data_dir, args.recogniser_epochs, args.pairs, recogniser=recogniser)


def run_fidelity(args: argparse.Namespace, family: str) -> None:
    students = ModelRuntime.from_repository(args.models_dir, family, args.version, threads=args.threads)
    result = evaluate_fidelity(teacher_source(family, args.teacher_path), student_source(students), family, args.pairs,
                               args.data_dir, Path(args.data_dir) / "textures", args.baseline_pairs,
                               recogniser=digit_recogniser(args.data_dir, args.recogniser_epochs))
    result.update(family=family, version=students.version, models_dir=str(students.directory), grid=None,
                  note=f"Students: `{students.directory}` (created {students.manifest['created']}). {args.note}".strip())
    # The version's pictures go beside the results page: its sample grid and its distillation loss curves.
    for key, name in (("grid", "teacher_vs_student"), ("loss_curves", "loss_curves")):
        if (students.directory / f"{name}.png").is_file():
            target = Path(args.results_md).parent / f"{name}_{family}.png"
            shutil.copyfile(students.directory / f"{name}.png", target)
            result[key] = target.name
    report.write_json(Path(args.results_dir) / f"fidelity_{family}.json", result)
    print(render_fidelity(args.results_md, result))


def run_invariance(args: argparse.Namespace, family: str) -> None:
    sources = {}
    if "teacher" in args.arms:
        sources["teacher"] = teacher_source(family, args.teacher_path)
    if "student" in args.arms:
        students = ModelRuntime.from_repository(args.models_dir, family, args.version, threads=args.threads)
        sources["student"] = student_source(students)
    config = InvarianceConfig(images=args.images, per_shape=args.per_shape, seeds=args.seeds,
                              train=TrainConfig(epochs=args.epochs))
    studies = {"unmodified": [UNMODIFIED], "modified": [PAPER_STUDY], "both": [UNMODIFIED, PAPER_STUDY]}[args.mask]
    for modifiers in studies:
        # The real arm does not depend on the mask setting: train it once, beside the unmodified study.
        include_real = "real" in args.arms and (modifiers == UNMODIFIED or args.mask == "modified")
        result = run_experiment(family, sources, config, modifiers, include_real, args.data_dir,
                                Path(args.data_dir) / "textures")
        result["notes"] = {arm: args.note for arm in result["arms"]}  # per arm: a rerun arm replaces its note
        path = Path(args.results_dir) / f"invariance_{family}_{modifiers.name}.json"
        result = merge_arms(path, result)
        report.write_json(path, result)
        print(render_invariance(args.results_md, result, args.results_dir))


def merge_arms(path: Path, result: dict) -> dict:
    """Keep arms of an earlier run with identical settings that this run did not train (arms may run separately)."""
    if not path.is_file():
        return result
    earlier = json.loads(path.read_text())
    if (earlier.get("config"), earlier.get("mask")) != (result["config"], result["mask"]):
        return result
    merged = dict(result)
    merged["arms"] = {**earlier["arms"], **result["arms"]}
    merged["sources"] = {**earlier.get("sources", {}), **result["sources"]}
    merged["real_images"] = max(earlier.get("real_images", 0), result["real_images"])
    merged["notes"] = {**earlier.get("notes", {}), **result["notes"]}
    return merged


def shipped_families(models_dir: str) -> list[str]:
    families = []
    for family in EVALUATED_FAMILIES:
        try:
            latest_version(models_dir, family)
            families.append(family)
        except ManifestError:
            print(f"skipping {family}: no shipped version in {models_dir}", file=sys.stderr)
    return families


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "render":
        render_all(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.command in PAPER_COMMANDS:
            run_paper(args)
        else:
            for family in [args.family] if args.family else shipped_families(args.models_dir):
                if args.command in ("fidelity", "all"):
                    run_fidelity(args, family)
                if args.command == "invariance" or (args.command == "all" and family in INVARIANCE_FAMILIES):
                    run_invariance(args, family)
    except (ManifestError, VersionNotFound, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
