"""ImageNet family speed at 256 px: the CGN teacher (3 × BigGAN-deep-256 + U²-Net) vs TinyGAN-256 students.

Parameters, MACs per image and images/s per mechanism and for one counterfactual (noise, the three
mechanisms, composition with core.compose, uint8), in PyTorch on CPU (plus CUDA when present) and through
onnxruntime on CPU: the students' served graphs through core.runtime.ModelRuntime (as the workers run them:
per mechanism `run`, a counterfactual through `run_all`, i.e. the fused graph), and the teacher exported to
three parity-checked graphs (core.runtime.open_session) so the headline ratio compares one engine with
itself. Speed does not depend on the weights, so the teacher is randomly initialised unless --teacher-path
names a cgn.pth, and the students are the TinyGAN-256 preset with random weights, exported with a manifest
to a temporary folder, unless --model-dir names an exported version.

    python -m benchmarks.imagenet_speed [--batch 1] [--reps 3] [--teacher-path cgn.pth] [--model-dir DIR]
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import host
from benchmarks.models import (
    TeacherGraphs, TeacherMechanism, attempt, cost, counterfactual_ms, export_teacher, images_per_second, inputs,
    torch_runner,
)
from core.hashing import sha256_file
from core.manifest import SCHEMA_VERSION, load_manifest, write_manifest
from core.noise import NoiseSpec
from core.vocabulary import MECHANISMS
from core.runtime import CPU, ModelRuntime
from reporting import report
from training.export import export_students
from training.students import StudentConfig, TinyGenerator
from training.teachers import cgn_imagenet as cgn

COUNTERFACTUAL = "counterfactual"
NOISE = NoiseSpec(cgn.LATENT_DIM, "truncated_normal", cgn.DEFAULT_TRUNCATION, True)
TEACHER_PARTS = {"shape": ("f_shape", "u2net"), "texture": ("f_text",), "background": ("f_bg",)}


def parameters(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def students_from(model_dir: Path | None, out_dir: Path) -> tuple[dict[str, torch.nn.Module], Path]:
    """PyTorch students of the version's config (the TinyGAN-256 preset by default) and the version folder
    of their ONNX graphs: `model_dir`, or the preset exported to `out_dir` with a manifest of its own."""
    manifest = load_manifest(model_dir) if model_dir is not None else None
    config = StudentConfig(**manifest["training"]["student"]) if manifest is not None else cgn.student_config()
    torch.manual_seed(0)
    modules = {m: TinyGenerator(config, m).eval() for m in MECHANISMS}
    if manifest is not None:
        return modules, model_dir
    blocks = export_students(modules, out_dir)
    write_manifest(out_dir, {
        "schema_version": SCHEMA_VERSION, "family": "imagenet", "version": "benchmark",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "teacher": {"name": "imagenet"}, "image_size": cgn.IMAGE_SIZE, "noise": NOISE.to_manifest(),
        "texture_shuffle": False, "labels": {"count": 1000}, **blocks, "training": {"student": config.to_dict()},
        "files": {path.name: sha256_file(path) for path in sorted(out_dir.iterdir()) if path.is_file()},
    })
    return modules, out_dir


def torch_speeds(modules: dict, batch: int, device: str, reps: int) -> dict[str, float | str]:
    """images/s per mechanism at `batch`, and for one counterfactual at batch 1."""
    moved = {m: module.to(device) for m, module in modules.items()}
    z, y = (torch.from_numpy(a).to(device) for a in inputs(batch, NOISE))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(mechanism):
        def run():
            with torch.no_grad():
                moved[mechanism](z, y)
            sync()
        return run

    speeds = {m: attempt(lambda m=m: images_per_second(step(m), batch, 0.0, reps)) for m in MECHANISMS}
    ms = counterfactual_ms(torch_runner(moved, device), NOISE, cgn.IMAGE_SIZE, False, 0.0)
    speeds[COUNTERFACTUAL] = 1000.0 / ms if isinstance(ms, float) else ms
    return speeds


def onnx_speeds(graphs: ModelRuntime | TeacherGraphs, batch: int, reps: int) -> dict[str, float | str]:
    """images/s per mechanism graph (`run`) at `batch`, and one counterfactual at batch 1 (`run_all`: the
    fused graph when there is one, three sessions otherwise)."""
    z, y = inputs(batch, NOISE)
    speeds = {m: attempt(lambda m=m: images_per_second(lambda: graphs.run(m, z, y), batch, 0.0, reps))
              for m in MECHANISMS}
    ms = counterfactual_ms(graphs.run_all, NOISE, cgn.IMAGE_SIZE, False, 0.0)
    speeds[COUNTERFACTUAL] = 1000.0 / ms if isinstance(ms, float) else ms
    return speeds


def run(args: argparse.Namespace) -> dict:
    print("building the teacher ...", file=sys.stderr)
    teacher = cgn.load_teacher(args.teacher_path) if args.teacher_path else cgn.random_teacher()
    teacher_mods = {m: TeacherMechanism(teacher, m).eval() for m in MECHANISMS}
    z1, y1 = (torch.from_numpy(a) for a in inputs(1, NOISE))
    result = {
        "image_size": cgn.IMAGE_SIZE, "batch": args.batch, "reps": args.reps,
        "teacher_weights": args.teacher_path or "random initialisation (timing only)",
        "host": host.start(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                           cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
        "images_per_second": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        print("exporting the students ...", file=sys.stderr)
        student_mods, model_dir = students_from(Path(args.model_dir) if args.model_dir else None, Path(tmp))
        result["student_weights"] = (f"ONNX of {args.model_dir}, PyTorch rows its config with random weights"
                                     if args.model_dir else "random TinyGAN-256 preset (timing only)")
        used = {"teacher": {m: [getattr(teacher, part) for part in TEACHER_PARTS[m]] for m in MECHANISMS},
                "student": {m: [student_mods[m]] for m in MECHANISMS}}
        result["cost"] = {}
        for name, mods in (("teacher", teacher_mods), ("student", student_mods)):
            per = {m: {"parameters": parameters(*used[name][m]), "macs_per_image": cost(mods[m], z1, y1)["macs_per_image"]}
                   for m in MECHANISMS}
            # No weights are shared between mechanisms, so a counterfactual's cost is their sum.
            per[COUNTERFACTUAL] = {key: sum(per[m][key] for m in MECHANISMS) for key in ("parameters", "macs_per_image")}
            result["cost"][name] = per
        speeds = result["images_per_second"]
        print("timing the students with onnxruntime on cpu ...", file=sys.stderr)
        students = ModelRuntime(model_dir, providers=[CPU])
        speeds["student/onnxruntime-cpu"] = onnx_speeds(students, args.batch, args.reps)
        del students
        print("exporting the teacher to onnx (three graphs, parity-checked) ...", file=sys.stderr)
        teacher_paths = export_teacher(teacher_mods, Path(tmp), NOISE, batch=2, fused=False)
        print("timing the teacher with onnxruntime on cpu ...", file=sys.stderr)
        speeds["teacher/onnxruntime-cpu"] = onnx_speeds(TeacherGraphs(teacher_paths, providers=[CPU]),
                                                        args.batch, args.reps)
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for name, modules in (("student", student_mods), ("teacher", teacher_mods)):
            print(f"timing the {name} with PyTorch on {device} ...", file=sys.stderr)
            speeds[f"{name}/pytorch-{device}"] = torch_speeds(modules, args.batch, device, args.reps)
    host.finish(result["host"])
    # Student over teacher images/s on the same device: like for like (same engine) first, then the served
    # students against the teacher as its authors run it (PyTorch).
    pairs = [("student/onnxruntime-cpu", "teacher/onnxruntime-cpu")]
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        pairs += [(f"student/pytorch-{device}", f"teacher/pytorch-{device}")]
    pairs += [("student/onnxruntime-cpu", "teacher/pytorch-cpu")]
    result["speedup"] = {
        f"{engine} vs {base}": {key: speeds[engine][key] / speeds[base][key] for key in [*MECHANISMS, COUNTERFACTUAL]
                                if isinstance(speeds[engine][key], float) and isinstance(speeds[base][key], float)}
        for engine, base in pairs}
    return result


def engine_order(name: str) -> tuple:
    """The order the run measures engines in (onnxruntime then PyTorch, CPU then CUDA, students first): result files
    are written with sorted keys, so tables rendered again from them need it."""
    who, engine = name.split("/", 1)
    kind, device = engine.split("-")[:2]
    return (kind != "onnxruntime", device != "cpu", device, who != "student")


def pair_order(pair: str) -> tuple:
    """Like for like (onnxruntime, then PyTorch per device) first, then the students against the teacher's PyTorch."""
    engine, base = pair.split(" vs ")
    kind = lambda name: name.split("/")[1].split("-")[0]  # noqa: E731
    return (kind(engine) != kind(base), engine_order(engine), engine_order(base))


def markdown(result: dict) -> str:
    keys = [*MECHANISMS, COUNTERFACTUAL]
    teacher, student = result["cost"]["teacher"], result["cost"]["student"]
    cost_rows = [[key, f"{teacher[key]['parameters'] / 1e6:.2f} M", f"{student[key]['parameters'] / 1e6:.2f} M",
                  f"{teacher[key]['parameters'] / student[key]['parameters']:.1f}×",
                  f"{teacher[key]['macs_per_image'] / 1e9:.1f}", f"{student[key]['macs_per_image'] / 1e9:.2f}"]
                 for key in keys]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else v  # noqa: E731
    speed_rows = [[engine] + [fmt(values[key]) for key in keys]
                  for engine, values in sorted(result["images_per_second"].items(), key=lambda i: engine_order(i[0]))]
    ratio_rows = [[pair] + [f"{ratios[key]:.1f}×" if key in ratios else "" for key in keys]
                  for pair, ratios in sorted(result["speedup"].items(), key=lambda i: pair_order(i[0]))]
    machine = result["host"]
    return "\n".join([
        f"### ImageNet family at {result['image_size']} px: teacher vs TinyGAN-256 students",
        "",
        f"Host: {machine['cpus']} CPUs ({machine['machine']}), torch {machine['torch']} with "
        f"{machine['torch_threads']} threads" + (f", GPU {machine['cuda']}" if machine["cuda"] else ", no GPU")
        + f"; {host.describe(machine)}. "
        f"Batch {result['batch']} per mechanism, a counterfactual at batch 1; {result['reps']} timed calls after one "
        f"warm-up. Teacher: {result['teacher_weights']}; students: {result['student_weights']}.",
        "",
        report.table(["", "teacher parameters", "student parameters", "ratio", "teacher GMACs / image",
                      "student GMACs / image"], cost_rows),
        "",
        report.table(["images / s", *keys], speed_rows),
        "",
        report.table(["speedup", *keys], ratio_rows),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="batch size of the per-mechanism timings")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per measurement, after one warm-up")
    parser.add_argument("--teacher-path", help="the CGN's cgn.pth (default: a randomly initialised teacher)")
    parser.add_argument("--model-dir", help="an exported imagenet version folder (default: random preset students)")
    parser.add_argument("--results-json", default="benchmarks/results/imagenet_speed.json")
    parser.add_argument("--results-md", default="docs/RESULTS.md", help="Markdown file whose imagenet section is updated")
    args = parser.parse_args(argv)
    result = run(args)
    report.write_json(args.results_json, result)
    body = markdown(result)
    report.update_section(args.results_md, "bench-imagenet-speed", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
