"""Teacher vs students: parameters, MACs per image, and images/s at batch 1, 64 and 256.

Engines: the teacher in PyTorch and exported to ONNX (one fused graph and three per-mechanism graphs,
opened with core.runtime.open_session), the shipped students through core.runtime.ModelRuntime exactly as
the workers run them (per mechanism: `run`; "three_sessions": `run_separately`; "fused": `run_fused`), and
the students in PyTorch, rebuilt from the manifest's per-mechanism student configs with the weights of the
distillation run in <runs-dir>/<family>/<version>/ when present (random weights otherwise: same cost, so
the timing holds). CUDA is timed too when present. One-counterfactual latency covers noise drawing, the
three mechanisms, composition and uint8 conversion. The fused graphs are also timed like for like (FP32, one and
two onnxruntime threads, each engine at its best batch of --sweep, teacher / student in alternating rounds, each
engine's fastest round, GFLOPS as a share of the host's measured FP32 peak): the family's speed target
(reporting/targets.py) is judged there, at one thread. Default folders come from core.settings.Paths
($SKDCGN_MODELS_DIR, $SKDCGN_RUNS_DIR, $SKDCGN_SHARED).

    python -m benchmarks.models --family double_colored_mnist [--models-dir models] [--min-seconds 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from benchmarks import host
from core.compose import compose_samples
from core.imageio import to_uint8
from core.noise import NoiseSpec, draw_sample_noise
from core.vocabulary import MECHANISMS
from core.runtime import CPU, CUDA, ModelRuntime, execution_providers, open_session
from core.settings import Paths
from reporting import report
from reporting.plots import save_figure
from reporting.targets import SPEED_THREADS, TARGETS
from training.export import FusedStudents, check_parity, export_graph
from training.package import student_configs
from training.students import TinyGenerator
from training.teachers import load_teacher, teacher_for_family

BATCHES = (1, 64, 256)  # the defaults of --batches
SWEEP = (8, 16, 32, 64, 128, 256)  # the like-for-like comparison judges each engine at its best batch among these
THREAD_COUNTS = (1, 2)  # ... at each of these onnxruntime thread counts
PEAK_SIZE = 2048  # the FP32 peak: a square single-precision matrix product this large, the host's FMA-bound kernel
OUTPUT_NAMES = {"shape": "mask", "texture": "texture", "background": "background"}


class TeacherMechanism(nn.Module):
    """One mechanism of the teacher as a module of (z, y), so it exports and hooks like a student."""

    def __init__(self, teacher: nn.Module, mechanism: str):
        super().__init__()
        self.teacher, self.mechanism = teacher, mechanism

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.teacher.mechanism(self.mechanism)(z, y)


def cost(module: nn.Module, z: torch.Tensor, y: torch.Tensor) -> dict:
    """Parameters of the layers a forward pass uses, and multiply-accumulates per image of conv/linear layers.

    A conv's MACs are output elements × (input channels / groups) × kernel area; a linear's, output
    elements × input features. Normalisation, activations and upsampling are not counted.
    """
    macs, used = [0], {}

    def hook(layer: nn.Module, _inputs, output: torch.Tensor) -> None:
        used[id(layer)] = sum(p.numel() for p in layer.parameters(recurse=False))
        if isinstance(layer, nn.Conv2d):
            macs[0] += output.numel() * layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, nn.Linear):
            macs[0] += output.numel() * layer.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            module(z, y)
    finally:
        for handle in handles:
            handle.remove()
    return {"parameters": int(sum(used.values())), "macs_per_image": macs[0] // len(z)}


def images_per_second(step: Callable[[], object], batch: int, min_seconds: float, min_reps: int = 3) -> float:
    step()  # warm-up: allocation, kernel selection
    reps, started = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - started < min_seconds:
        step()
        reps += 1
    return batch * reps / (time.perf_counter() - started)


def inputs(batch: int, noise: NoiseSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, noise.dim)).astype(np.float32), rng.integers(0, 10, batch).astype(np.int64)


def torch_steps(modules: dict[str, nn.Module], batch: int, noise: NoiseSpec, device: str) -> dict[str, Callable]:
    """Per-mechanism steps and the three in sequence ("all"), synchronised on CUDA."""
    z, y = (torch.from_numpy(a).to(device) for a in inputs(batch, noise))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(names):
        def step():
            with torch.no_grad():
                for name in names:
                    modules[name](z, y)
            sync()
        return step

    return {m: run([m]) for m in MECHANISMS} | {"all": run(list(MECHANISMS))}


def onnx_steps(graphs: ModelRuntime | TeacherGraphs, batch: int, noise: NoiseSpec) -> dict[str, Callable]:
    """Per-mechanism sessions (`run`), the three in sequence ("three_sessions": `run_separately`) and the fused
    graph ("fused": `run_fused`)."""
    z, y = inputs(batch, noise)
    zs, ys = {m: z for m in MECHANISMS}, {m: y for m in MECHANISMS}
    steps = {m: (lambda m=m: graphs.run(m, z, y)) for m in MECHANISMS}
    steps["three_sessions"] = lambda: graphs.run_separately(zs, ys)
    steps["fused"] = lambda: graphs.run_fused(zs, ys)
    return steps


def export_teacher(modules: dict[str, nn.Module], out_dir: Path, noise: NoiseSpec, batch: int = 16,
                   fused: bool = True) -> dict[str, Path]:
    """The teacher as three per-mechanism ONNX graphs and (with `fused`) one fused graph, each parity-checked
    at `batch` and batch 1. Large teachers (ImageNet) skip the fused graph: it would hold all weights twice
    over in one >1 GB file while three sessions cost the same to run."""
    z, y = inputs(batch, noise)
    sizes = (batch, 1)
    paths = {}
    for m, module in modules.items():
        paths[m] = out_dir / f"teacher_{m}.onnx"
        export_graph(module, (torch.from_numpy(z), torch.from_numpy(y)), ["z", "y"], [OUTPUT_NAMES[m]], paths[m])
        check_parity(paths[m], module, {"z": z, "y": y}, [OUTPUT_NAMES[m]], sizes)
    if not fused:
        return paths
    names = [f"{kind}_{m}" for m in MECHANISMS for kind in ("z", "y")]
    values = [v for m in MECHANISMS for v in (z, y)]
    paths["fused"] = out_dir / "teacher_fused.onnx"
    fused = FusedStudents(modules).eval()
    export_graph(fused, tuple(torch.from_numpy(v) for v in values), names, list(OUTPUT_NAMES.values()), paths["fused"])
    check_parity(paths["fused"], fused, dict(zip(names, values)), list(OUTPUT_NAMES.values()), sizes)
    return paths


class TeacherGraphs:
    """The teacher's graphs from export_teacher, run with ModelRuntime's calls so both sides are timed alike.

    They have no manifest: the input and output names are the ones export_teacher gives them. Sessions come
    from core.runtime.open_session (the project's session options).
    """

    def __init__(self, paths: dict[str, Path], threads: int = 0, providers: list[str] | None = None):
        self.sessions = {m: open_session(paths[m], threads, providers) for m in MECHANISMS}
        self.fused = open_session(paths["fused"], threads, providers) if "fused" in paths else None

    def run(self, mechanism: str, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        feeds = {"z": np.ascontiguousarray(z, np.float32), "y": np.ascontiguousarray(y, np.int64)}
        return self.sessions[mechanism].run([OUTPUT_NAMES[mechanism]], feeds)[0]

    def run_separately(self, z: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {m: self.run(m, z[m], y[m]) for m in MECHANISMS}

    def run_fused(self, z: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {}
        for m in MECHANISMS:
            feeds[f"z_{m}"] = np.ascontiguousarray(z[m], np.float32)
            feeds[f"y_{m}"] = np.ascontiguousarray(y[m], np.int64)
        return dict(zip(MECHANISMS, self.fused.run([OUTPUT_NAMES[m] for m in MECHANISMS], feeds)))

    def run_all(self, z: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The fused graph when exported (large teachers skip it), three sessions otherwise."""
        return self.run_fused(z, y) if self.fused is not None else self.run_separately(z, y)


def student_modules(students: ModelRuntime, runs_dir: Path) -> tuple[dict[str, nn.Module], str]:
    """TinyGenerators from the manifest's config; trained weights from the run's checkpoints when present."""
    configs = student_configs(students.manifest)
    modules, sources = {}, set()
    for m in MECHANISMS:
        module = TinyGenerator(configs[m], m)
        checkpoint = runs_dir / students.family / students.version / f"{m}.pt"
        if checkpoint.is_file():
            module.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["student"])
            sources.add("trained weights from runs/")
        else:
            sources.add("random weights (architecture from the manifest; timing only)")
        modules[m] = module.eval()
    return modules, " and ".join(sorted(sources))


def attempt(measurement: Callable[[], float]) -> float | str:
    """The measurement, or its error: a graph that fails at some batch size is a result to report, not a crash."""
    try:
        return measurement()
    except Exception as exc:  # noqa: BLE001
        return f"error: {str(exc).splitlines()[0][:200]}"


def counterfactual_ms(run_all: Callable[[dict, dict], dict], noise: NoiseSpec, image_size: int, texture_shuffle: bool,
                      min_seconds: float) -> float | str:
    """Milliseconds for one counterfactual at batch 1: noise, three mechanisms, composition, uint8."""
    labels = {m: np.array([3], np.int64) for m in MECHANISMS}
    counter = [0]

    def step():
        noises = [draw_sample_noise(0, counter[0], noise, image_size)]
        counter[0] += 1
        outputs = run_all({m: noises[0].z[m][None] for m in MECHANISMS}, labels)
        image = compose_samples(outputs["shape"], outputs["texture"], outputs["background"], noises, texture_shuffle)[0]
        return to_uint8(image)

    return attempt(lambda: 1000.0 / images_per_second(step, 1, min_seconds))


def torch_runner(modules: dict[str, nn.Module], device: str) -> Callable[[dict, dict], dict]:
    def run_all(z: dict, y: dict) -> dict:
        with torch.no_grad():
            return {m: modules[m](torch.from_numpy(z[m]).to(device), torch.from_numpy(y[m]).to(device)).cpu().numpy()
                    for m in MECHANISMS}
    return run_all


def alternating_rounds(steps: dict[str, Callable[[], object]], batch: int, min_seconds: float,
                       rounds: int) -> dict[str, list[float]]:
    """images/s of each engine, timed in alternation `rounds` times. Why: on a shared host a burst of load during
    one engine's single pass moves the ratio by tens of percent; alternating exposes both to the same host, and
    each engine's fastest round (timeit's advice: the least disturbed) is what the target is judged on."""
    timings: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            timings[name].append(images_per_second(step, batch, min_seconds))
    return timings


def measure(steps_for_batch: Callable[[int], dict[str, Callable]], batches, min_seconds: float) -> dict:
    """{variant: {batch: images/s}}; a variant that fails records its error instead of a number."""
    table: dict[str, dict] = {}
    for batch in batches:
        for variant, step in steps_for_batch(batch).items():
            table.setdefault(variant, {})[str(batch)] = attempt(lambda: images_per_second(step, batch, min_seconds))
    return table


def run(args: argparse.Namespace) -> dict:
    students = ModelRuntime.from_repository(args.models_dir, args.family, args.version, threads=args.threads,
                                            providers=[CPU])
    noise, shuffle, size = students.noise, students.texture_shuffle, students.image_size
    teacher = load_teacher(teacher_for_family(args.family), args.teacher_path)
    teacher_mods = {m: TeacherMechanism(teacher, m).eval() for m in MECHANISMS}
    student_mods, weights = student_modules(students, Path(args.runs_dir))
    z1, y1 = (torch.from_numpy(a) for a in inputs(4, noise))
    result = {
        "family": args.family, "version": students.version, "models_dir": str(students.directory),
        "host": host.start(torch=torch.__version__, torch_threads=torch.get_num_threads()),
        "min_seconds": args.min_seconds, "batches": args.batches, "student_torch_weights": weights,
        "cost": {
            "teacher": {m: cost(teacher_mods[m], z1, y1) for m in MECHANISMS} | {"total_parameters": sum(
                p.numel() for p in teacher.parameters())},
            "student": {m: cost(student_mods[m], z1, y1) for m in MECHANISMS},
        },
        "images_per_second": {},
        "counterfactual_ms": {},
    }
    ort_devices = [("cpu", [CPU])] + ([("cuda", [CUDA, CPU])] if CUDA in execution_providers() else [])
    timings, latency = result["images_per_second"], result["counterfactual_ms"]
    with tempfile.TemporaryDirectory() as tmp:
        teacher_paths = export_teacher(teacher_mods, Path(tmp), noise)
        for device, providers in ort_devices:
            # The students were verified once above: on another device, the same files with its providers.
            student = students if device == "cpu" else ModelRuntime(
                students.directory, threads=args.threads, providers=providers, verify=False)
            engines = {"teacher": TeacherGraphs(teacher_paths, args.threads, providers), "student": student}
            for name, graphs in engines.items():
                print(f"timing {name} with onnxruntime on {device} ...", file=sys.stderr)
                timings[f"{name}/onnxruntime-{device}"] = measure(
                    lambda b: onnx_steps(graphs, b, noise), args.batches, args.min_seconds)
                latency[f"{name}/onnxruntime-{device}-fused"] = counterfactual_ms(
                    graphs.run_fused, noise, size, shuffle, args.min_seconds)
            if device == "cpu" and args.sweep_rounds:
                print("timing the fused graphs like for like ...", file=sys.stderr)
                macs = {name: sum(result["cost"][name][m]["macs_per_image"] for m in MECHANISMS) for name in engines}
                result["like_for_like"] = like_for_like(teacher_paths, students, noise, macs, args.sweep,
                                                        args.thread_counts, args.sweep_rounds, args.min_seconds)
                result["sweep"], result["sweep_rounds"] = args.sweep, args.sweep_rounds
            if device == "cpu" and args.rounds:
                print(f"timing the fused graphs in {args.rounds} alternating rounds ...", file=sys.stderr)
                fused = {name: onnx_steps(graphs, max(args.batches), noise)["fused"] for name, graphs in engines.items()}
                result["fused_rounds"] = alternating_rounds(fused, max(args.batches), args.min_seconds, args.rounds)
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for name, modules in (("teacher", teacher_mods), ("student", student_mods)):
            print(f"timing {name} with PyTorch on {device} ...", file=sys.stderr)
            moved = {m: module.to(device) for m, module in modules.items()}
            timings[f"{name}/pytorch-{device}"] = measure(lambda b: torch_steps(moved, b, noise, device),
                                                          args.batches, args.min_seconds)
            latency[f"{name}/pytorch-{device}"] = counterfactual_ms(
                torch_runner(moved, device), noise, size, shuffle, args.min_seconds)
    host.finish(result["host"])
    result["speedup_batch"] = max(args.batches)
    result["speedup"] = speedups(timings, result["speedup_batch"], result.get("fused_rounds"))
    return result


def fp32_peak_gflops(threads: int, reps: int = 5) -> float:
    """The host's FP32 peak at `threads` threads as this machine reaches it: the fastest of `reps` PEAK_SIZE² sgemms
    (FMA-bound, 2·n³ FLOPs) through PyTorch's BLAS."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(PEAK_SIZE, PEAK_SIZE), torch.randn(PEAK_SIZE, PEAK_SIZE)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(reps):
            started = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - started)
        return 2 * PEAK_SIZE ** 3 / best / 1e9
    finally:
        torch.set_num_threads(previous)


def like_for_like(teacher_paths: dict[str, Path], students: ModelRuntime, noise: NoiseSpec, macs: dict[str, int],
                  sweep: list[int], thread_counts: list[int], rounds: int, min_seconds: float) -> dict:
    """Fused teacher vs fused students, FP32, per onnxruntime thread count: both timed at every batch of `sweep` in
    `rounds` alternating rounds, each judged at its best batch (fastest round); with the GFLOPS each reaches (2·MACs
    per counterfactual × counterfactuals/s) as a share of the host's measured FP32 peak at that thread count."""
    out = {}
    for threads in thread_counts:
        engines = {"teacher": TeacherGraphs(teacher_paths, threads, [CPU]),
                   "student": ModelRuntime(students.directory, threads=threads, providers=[CPU], verify=False)}
        per_batch = {}
        for batch in sweep:
            steps = {name: onnx_steps(graphs, batch, noise)["fused"] for name, graphs in engines.items()}
            per_batch[str(batch)] = {name: max(values) for name, values in
                                     alternating_rounds(steps, batch, min_seconds, rounds).items()}
        peak = fp32_peak_gflops(threads)
        best = {}
        for name in engines:
            batch = max(per_batch, key=lambda b: per_batch[b][name])
            rate = per_batch[batch][name]
            gflops = 2 * macs[name] * rate / 1e9
            best[name] = {"batch": int(batch), "images_per_second": rate, "gflops": gflops, "peak_share": gflops / peak}
        out[str(threads)] = {"images_per_second": per_batch, "best": best, "peak_gflops": peak,
                             "ratio": best["student"]["images_per_second"] / best["teacher"]["images_per_second"]}
        print(f"{threads} thread(s): student/teacher {out[str(threads)]['ratio']:.2f}× at their best batches",
              file=sys.stderr, flush=True)
    return out


def like_for_like_markdown(result: dict) -> str:
    """The like-for-like table; the family's speed target (reporting/targets.py) is judged on its SPEED_THREADS row."""
    rows, target = [], TARGETS.get(result["family"])
    for threads, entry in result["like_for_like"].items():
        for name in ("teacher", "student"):
            best = entry["best"][name]
            judged = name == "student" and target is not None and threads == str(SPEED_THREADS)
            rows.append([threads, name, best["batch"], f"{best['images_per_second']:,.0f}", f"{best['gflops']:.1f}",
                         f"{100 * best['peak_share']:.0f} %", f"{entry['peak_gflops']:.0f}",
                         f"{entry['ratio']:.2f}×" if name == "student" else "",
                         (f"{'yes' if entry['ratio'] >= target.fused_speedup else '**no**'} "
                          f"(≥ {target.fused_speedup:g}×)") if judged else ""])
    sweep = ", ".join(map(str, result["sweep"]))
    return "\n".join([
        f"Like for like (FP32, fused graphs, each engine at its best batch among {sweep}, fastest of "
        f"{result['sweep_rounds']} alternating rounds; GFLOPS = 2 × MACs per counterfactual × counterfactuals/s, "
        "peak = the fastest 2048² sgemm at that thread count on this host):", "",
        report.table(["threads", "engine", "best batch", "counterfactuals/s", "GFLOPS", "of FP32 peak", "peak GFLOPS",
                      "student / teacher", "meets target"], rows), "", worker_layout(result)])


def worker_layout(result: dict) -> str:
    """What the figures say a CPU worker should run: one-thread sessions at the students' best one-thread batch,
    one worker process per core, unless one session with more threads beats that many one-thread sessions."""
    entries = result["like_for_like"]
    one = entries.get("1")
    if not one:
        return "Worker layout: not measured at one thread."
    best = one["best"]["student"]
    line = (f"Worker layout these figures support: `SKDCGN_ORT_THREADS=1`, `SKDCGN_BATCH_SIZE={best['batch']}` "
            f"(the students' best batch at one thread), one worker process per core")
    for threads, entry in entries.items():
        if threads == "1":
            continue
        shared = entry["best"]["student"]["images_per_second"]
        line += (f"; {threads} one-thread sessions can reach up to {int(threads) * best['images_per_second']:,.0f} "
                 f"counterfactuals/s against {shared:,.0f} from one {threads}-thread session")
    return line + "."


def speedups(timings: dict, batch: int, fused_rounds: dict | None = None) -> dict:
    """Student over teacher images/s at `batch`, both through onnxruntime on CPU, per mechanism; the fused graph
    (the one the service runs) on each engine's fastest alternating round when there are any, else on the single
    pass of the table. The family's target is judged like for like instead (`like_for_like`)."""
    teacher, student = timings.get("teacher/onnxruntime-cpu", {}), timings.get("student/onnxruntime-cpu", {})
    out = {}
    for variant in list(MECHANISMS) + ["three_sessions", "fused"]:
        t, s = teacher.get(variant, {}).get(str(batch)), student.get(variant, {}).get(str(batch))
        if isinstance(t, float) and isinstance(s, float):
            out[variant] = {"speedup": s / t}
            if variant == "fused" and fused_rounds:
                ratios = [s_i / t_i for t_i, s_i in zip(fused_rounds["teacher"], fused_rounds["student"])]
                out[variant] = {"speedup": max(fused_rounds["student"]) / max(fused_rounds["teacher"]),
                                "single_pass": s / t, "round_ratios": ratios}
    return out


def rounds_note(speedup: dict) -> str:
    """' (fastest of 9 alternating rounds each; per round 1.9–2.3×, median 2.05×; single pass 2.10×)'."""
    ratios = speedup.get("round_ratios")
    if not ratios:
        return ""
    return (f" (fastest of {len(ratios)} alternating rounds each; per round {min(ratios):.2f}–{max(ratios):.2f}×, "
            f"median {statistics.median(ratios):.2f}×; single pass {speedup['single_pass']:.2f}×)")


def markdown(result: dict, plot: str) -> str:
    cost_rows = []
    for name in ("teacher", "student"):
        for m in MECHANISMS:
            c = result["cost"][name][m]
            cost_rows.append([name, m, f"{c['parameters']:,}", f"{c['macs_per_image'] / 1e6:.2f}"])
    rows = []
    batches = result["batches"]
    for engine, variants in ordered(result["images_per_second"], engine_order):
        for variant, per_batch in ordered(variants, variant_order):
            rows.append([engine, variant] + [f"{v:,.0f}" if isinstance(v, float) else v for v in
                                             (per_batch.get(str(b), "") for b in batches)])
    speed = [[m, f"{v['speedup']:.2f}×" + rounds_note(v)]
             for m, v in ordered(result["speedup"], variant_order)]
    latency = [[engine, f"{ms:.2f}" if isinstance(ms, float) else ms]
               for engine, ms in ordered(result["counterfactual_ms"], engine_order)]
    machine = result["host"]
    return "\n".join([
        f"### Model benchmark: {result['family']}/{result['version']}",
        "",
        f"Host: {machine['cpus']} CPUs ({machine['machine']}), torch {machine['torch']} with "
        f"{machine['torch_threads']} threads; {host.describe(machine)}. Each number: at least "
        f"{result['min_seconds']:g} s of repeated calls after one "
        f"warm-up call. Student PyTorch: {result['student_torch_weights']}.",
        "",
        table_or_empty(["model", "mechanism", "parameters", "MMACs / image"], cost_rows),
        "",
        table_or_empty(["engine", "variant"] + [f"img/s @ {b}" for b in batches], rows),
        "",
        f"Students vs teacher through onnxruntime (CPU, the session's default threads) at batch "
        f"{result['speedup_batch']}:",
        "",
        table_or_empty(["mechanism", "speedup"], speed),
        "",
        *([like_for_like_markdown(result), ""] if result.get("like_for_like") else []),
        "One counterfactual at batch 1 (noise, three mechanisms, composition, uint8):",
        "",
        table_or_empty(["engine", "ms"], latency),
        "",
        f"![throughput vs batch]({plot})",
    ])


VARIANT_ORDER = (*MECHANISMS, "three_sessions", "fused", "all")


def engine_order(name: str) -> tuple:
    """The order the run measures engines in: onnxruntime then PyTorch, CPU then CUDA, teacher then student.
    Result files are written with sorted keys, so tables rendered again from them need this order."""
    who, engine = name.split("/", 1)
    kind, device = engine.split("-")[:2]
    return (kind != "onnxruntime", device != "cpu", device, who != "teacher")


def variant_order(name: str) -> tuple:
    return (VARIANT_ORDER.index(name) if name in VARIANT_ORDER else len(VARIANT_ORDER), name)


def ordered(mapping: dict, key) -> list:
    return sorted(mapping.items(), key=lambda item: key(item[0]))


def table_or_empty(headers, rows) -> str:
    return report.table(headers, rows) if rows else "(nothing measured)"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for engine, variants in result["images_per_second"].items():
        for variant in ("all", "three_sessions", "fused"):
            points = [(b, variants.get(variant, {}).get(str(b))) for b in result["batches"]]
            points = [(b, v) for b, v in points if isinstance(v, float)]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{engine} {variant}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s (three mechanisms)")
    ax.set_title(f"{result['family']}/{result['version']}: throughput vs batch")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    paths = Paths.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="double_colored_mnist")
    parser.add_argument("--models-dir", default=str(paths.models_dir))
    parser.add_argument("--version", help="default: the family's LATEST")
    parser.add_argument("--teacher-path", default=str(paths.shared_dir / "teachers" / "cgn_mnist"))
    parser.add_argument("--runs-dir", default=str(paths.runs_dir))
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: onnxruntime decides)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time each measurement at least this long")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--rounds", type=int, default=9,
                        help="alternating teacher/student timings of the fused graph at the largest batch; its "
                             "speedup is each engine's fastest round (0: the table's single pass)")
    parser.add_argument("--sweep", default=",".join(map(str, SWEEP)),
                        help="batches of the like-for-like comparison (each engine judged at its best)")
    parser.add_argument("--thread-counts", default=",".join(map(str, THREAD_COUNTS)),
                        help="onnxruntime thread counts of the like-for-like comparison")
    parser.add_argument("--sweep-rounds", type=int, default=5,
                        help="alternating rounds per batch of the like-for-like comparison, where the family's "
                             "speed target is judged (0: skip it)")
    parser.add_argument("--torch-threads", type=int, default=0, help="PyTorch intra-op threads (0: its default)")
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--results-md", default="docs/RESULTS.md")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.sweep = [int(b) for b in args.sweep.split(",")]
    args.thread_counts = [int(t) for t in args.thread_counts.split(",")]
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    result = run(args)
    report.write_json(Path(args.results_dir) / f"models_{args.family}.json", result)
    plot_path = Path(args.results_md).parent / f"throughput_{args.family}.png"
    plot(result, plot_path)
    body = markdown(result, plot_path.name) + (f"\n\n{args.note}" if args.note else "")
    report.update_section(args.results_md, f"bench-models-{args.family}", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
