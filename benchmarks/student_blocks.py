"""Co-design of the students with the engine: candidate changes to the student blocks, each timed as the workers
run the students (the fused graph, onnxruntime on CPU), beside the teacher's fused graph, in one run.

    python -m benchmarks.student_blocks --family double_colored_mnist [--threads 1] [--rounds 3]
    python -m benchmarks.student_blocks --family colored_mnist --version v6 \
        --trial "sub-pixel heads (codesign)=models/colored_mnist/v7"     # the blocks v7 changed, v7's fidelity

A candidate is the student configs of the family's LATEST (or --version) with one change: label lookups folded
into tables at export (exact: same weights, same function), label conditioning kept only up to a resolution (a
different architecture: needs distilling), or sub-pixel heads. The cost of a graph does not depend on its
weights, so each candidate is exported with random weights by training.export exactly as a shipped version is,
and timed at every batch of the sweep in alternating rounds with the teacher; each engine is judged at its best
batch (fastest round). What a change does to fidelity is known only once it is distilled: the RESULTS table says
which rows are exact, and `--trial` puts a distilled candidate's held-out fidelity beside the base version's.
Writes benchmarks/results/student_blocks_<family>.json and the "Student blocks" section of docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks import host
from benchmarks.models import (
    TeacherGraphs, TeacherMechanism, alternating_rounds, cost, export_teacher, inputs,
)
from core.manifest import load_manifest
from core.runtime import CPU, ModelRuntime, open_session
from core.settings import Paths
from core.vocabulary import MECHANISMS
from reporting import report
from training.export import export_students
from training.package import student_configs
from training.students import TinyGenerator
from training.teachers import load_teacher, teacher_for_family

SWEEP = (8, 16, 32, 64, 128, 256)
# name -> (what changes, student config fields changed: for every mechanism ("all") and per mechanism, fold at
# export, exact: the same function as today's students). Each row adds to the one before it.
CANDIDATES = {
    "today": ("the shipped architecture and export", {}, False, True),
    "labels folded": ("label lookups and BatchNorm folded into per-class tables at export", {}, True, True),
    "conditioned ≤ 16 px": ("+ plain BatchNorm in blocks above 16×16", {"all": {"conditioned_up_to": 16}}, True,
                            False),
    "conditioned ≤ 8 px": ("+ plain BatchNorm in blocks above 8×8", {"all": {"conditioned_up_to": 8}}, True, False),
    "sub-pixel heads (codesign)": (
        "+ a sub-pixel head on every student, its last (32×32) block dropped: the `codesign` recipe's blocks",
        {"all": {"conditioned_up_to": 8, "subpixel_head": True}}, True, False),
}


def changed(config, changes: dict):
    """`config` with `changes`; `subpixel_head` turns a conv-head student into a sub-pixel one with the same widths
    but the last, so no hidden tensor reaches full size."""
    changes = dict(changes)
    if changes.pop("subpixel_head", False) and config.head == "conv":
        changes |= {"head": "subpixel", "channels": list(config.channels[:-1])}
    return dataclasses.replace(config, **changes)


def candidate_students(configs: dict, changes: dict, seed: int) -> dict[str, TinyGenerator]:
    """The students of `configs` with `changes` ({"all": fields, mechanism: fields}), random weights."""
    torch.manual_seed(seed)
    return {m: TinyGenerator(changed(configs[m], changes.get("all", {}) | changes.get(m, {})), m).eval()
            for m in MECHANISMS}


class FusedGraph:
    """One exported fused graph, run like ModelRuntime.run_fused (the teacher's TeacherGraphs has the same call)."""

    def __init__(self, path: Path, threads: int):
        self.session = open_session(path, threads, [CPU])

    def step(self, batch: int, noise):
        z, y = inputs(batch, noise)
        feeds = {name: (y if name.startswith("y_") else z) for name in (i.name for i in self.session.get_inputs())}
        return lambda: self.session.run(None, feeds)


def run(args: argparse.Namespace) -> dict:
    students = ModelRuntime.from_repository(args.models_dir, args.family, args.version, threads=args.threads,
                                            providers=[CPU])
    configs = student_configs(students.manifest)
    noise = students.noise
    teacher = load_teacher(teacher_for_family(args.family), args.teacher_path)
    teacher_mods = {m: TeacherMechanism(teacher, m).eval() for m in MECHANISMS}
    z, y = (torch.from_numpy(a) for a in inputs(4, noise))
    trials = dict(item.split("=", 1) for item in args.trial)
    unknown = sorted(set(trials) - set(CANDIDATES))
    if unknown:
        raise SystemExit(f"--trial names unknown candidate(s) {unknown}; candidates: {', '.join(CANDIDATES)}")
    result = {"family": args.family, "version": students.version, "threads": args.threads, "rounds": args.rounds,
              "batches": list(args.batches), "host": host.start(torch=torch.__version__), "candidates": {}}
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"teacher": TeacherGraphs(export_teacher(teacher_mods, Path(tmp), noise), args.threads, [CPU])}
        macs = {}
        for name, (what, changes, fold, exact) in CANDIDATES.items():
            modules = candidate_students(configs, changes, args.seed)
            folder = Path(tmp) / name.replace(" ", "_").replace("≤", "le")
            folder.mkdir()
            blocks = export_students(modules, folder, fold=fold)
            graphs[name] = FusedGraph(folder / blocks["fused"]["file"], args.threads)
            macs[name] = sum(cost(modules[m], z, y)["macs_per_image"] for m in MECHANISMS)
            result["candidates"][name] = {"what": what, "changes": changes, "fold": fold, "exact": exact,
                                          "macs_per_counterfactual": macs[name],
                                          "parity_max_abs_diff": blocks["fused"]["parity_max_abs_diff"]}
            if name in trials:
                result["candidates"][name]["fidelity"] = trial_fidelity(load_manifest(Path(trials[name])),
                                                                        students.manifest)
        per_batch = {}
        for batch in args.batches:
            steps = {"teacher": _teacher_step(graphs["teacher"], batch, noise)}
            steps |= {name: graphs[name].step(batch, noise) for name in CANDIDATES}
            per_batch[batch] = {name: max(values) for name, values in
                                alternating_rounds(steps, batch, args.min_seconds, args.rounds).items()}
            print(f"batch {batch}: " + ", ".join(f"{n} {v:,.0f}" for n, v in per_batch[batch].items()),
                  file=sys.stderr, flush=True)
    result["host"] = host.finish(result["host"])
    result["images_per_second"] = {str(b): v for b, v in per_batch.items()}
    teacher_best = max(per_batch[b]["teacher"] for b in args.batches)
    result["teacher_best"] = {"images_per_second": teacher_best,
                              "batch": max(args.batches, key=lambda b: per_batch[b]["teacher"])}
    for name, entry in result["candidates"].items():
        best_batch = max(args.batches, key=lambda b: per_batch[b][name])
        entry.update(best_batch=best_batch, images_per_second=per_batch[best_batch][name],
                     ratio=per_batch[best_batch][name] / teacher_best,
                     gflops=2 * entry["macs_per_counterfactual"] * per_batch[best_batch][name] / 1e9)
    return result


def trial_fidelity(trial: dict, latest: dict) -> dict:
    """Held-out L1 (masks: IoU) of each mechanism a distilled trial of a candidate trained, beside the base version's
    (key `latest`: LATEST unless --version) and the class-mean baseline's, from the two manifests."""
    out = {}
    for mechanism in MECHANISMS:
        metrics = trial["metrics"].get(mechanism)
        if metrics:
            key = "mask_iou" if mechanism == "shape" else "l1"
            out[mechanism] = {"metric": key, "trial": metrics[key], "latest": latest["metrics"][mechanism][key],
                              "baseline": metrics["class_mean_baseline"][key]}
    return {"trial_version": f"{trial['family']}/{trial['version']}", "pairs": trial["metrics"]["heldout_pairs"],
            "mechanisms": out}


def fidelity_text(entry: dict, latest: str) -> str:
    if entry["exact"]:
        return f"exact (max Δ {entry['parity_max_abs_diff']:.0e})"
    fidelity = entry.get("fidelity")
    if not fidelity:
        return "needs distilling"
    parts = [f"{m} {v['metric'].replace('_', ' ')} {v['trial']:.4f} ({latest} {v['latest']:.4f}, class-mean "
             f"{v['baseline']:.4f})" for m, v in fidelity["mechanisms"].items()]
    return f"distilled ({fidelity['pairs']:,} held-out pairs): " + "; ".join(parts)


def _teacher_step(graphs: TeacherGraphs, batch: int, noise):
    z, y = inputs(batch, noise)
    zs, ys = {m: z for m in MECHANISMS}, {m: y for m in MECHANISMS}
    return lambda: graphs.run_fused(zs, ys)


def markdown(result: dict) -> str:
    today = result["candidates"]["today"]["images_per_second"]
    rows = [[name, entry["what"], f"{entry['macs_per_counterfactual'] / 1e6:.2f}", entry["best_batch"],
             f"{entry['images_per_second']:,.0f}", f"{entry['images_per_second'] / today:.2f}×",
             f"{entry['ratio']:.2f}×", fidelity_text(entry, result["version"])]
            for name, entry in result["candidates"].items()]
    teacher = result["teacher_best"]
    return "\n".join([
        f"### Student blocks: {result['family']} (architecture of {result['version']}), "
        f"{result['threads']} thread(s)", "",
        f"`python -m benchmarks.student_blocks`: each candidate exported with random weights by training.export, "
        f"fused graph timed at batches {', '.join(map(str, result['batches']))} in {result['rounds']} alternating "
        f"rounds with the teacher's fused graph (best {teacher['images_per_second']:,.0f} counterfactuals/s at batch "
        f"{teacher['batch']}); each at its best batch, fastest round. {result['host']['cpus']} CPUs, "
        f"{host.describe(result['host'])}.", "",
        report.table(["candidate", "change", "MMACs / counterfactual", "best batch", "counterfactuals/s",
                      "vs today", "vs teacher", "fidelity"], rows)])


def main(argv: list[str] | None = None) -> int:
    paths = Paths.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="double_colored_mnist")
    parser.add_argument("--models-dir", default=str(paths.models_dir))
    parser.add_argument("--teacher-path", default=str(paths.shared_dir / "teachers" / "cgn_mnist"))
    parser.add_argument("--version", help="the version whose blocks the candidates change (default: LATEST); once a "
                        "candidate ships, the version before it keeps the table about the change")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.5)
    parser.add_argument("--batches", default=",".join(map(str, SWEEP)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trial", action="append", default=[], metavar="CANDIDATE=VERSION_DIR",
                        help="a distilled trial of a candidate (its version folder): its held-out fidelity is reported")
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--results-md", default="docs/RESULTS.md")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(1)
    np.random.seed(args.seed)
    result = run(args)
    stem = f"student_blocks_{args.family}_{args.threads}t"
    report.publish(result, Path(args.results_dir) / f"{stem}.json", args.results_md, stem, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
