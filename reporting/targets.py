"""The students' targets per family, and how a shipped version measures against them.

Targets (on at least 2,000 held-out pairs): mask IoU ≥ 0.88 for double_colored_mnist, ≥ 0.85 for wildlife and
colored; texture and background mean L1 ≤ 0.6× the class-mean baseline and ≤ 0.08 wherever that baseline exceeds
0.01 (colored_mnist's plain backgrounds do not: their baseline is already near zero); the fused student graph at
least 5× the teacher's fused graph (wildlife 4×), like for like: FP32 onnxruntime on one CPU thread (what a worker
process runs), each engine at its best batch of the benchmark's sweep; with fewer than half the teacher's parameters
(wildlife: fewer than the teacher).

`assess(manifest, bench)` measures a version: fidelity and parameters from its manifest (`metrics`,
`student_parameters`, `teacher.parameters`), speed from a model benchmark result (benchmarks/results/
models_<family>.json, its `like_for_like` block) of the same version, or "not measured". The result goes into the
manifest as its `targets` block (beside the hand-written `tried`: what was attempted) and into docs/RESULTS.md, both
by experiments.generated, never by hand.
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_PAIRS = 2000
L1_RATIO = 0.6  # student L1 over the class-mean baseline's
L1_MAX = 0.08
BASELINE_MIN = 0.01  # the L1 targets apply where the class-mean baseline's L1 exceeds this
SPEED_THREADS = 1  # the speed target's onnxruntime threads: a worker process runs one session on one thread


@dataclass(frozen=True)
class FamilyTargets:
    mask_iou: float
    fused_speedup: float  # student fused graph over the teacher's, like for like at SPEED_THREADS threads
    parameter_share: float  # student parameters (three mechanisms) below this share of the teacher's


TARGETS = {
    "double_colored_mnist": FamilyTargets(mask_iou=0.88, fused_speedup=5.0, parameter_share=0.5),
    "colored_mnist": FamilyTargets(mask_iou=0.85, fused_speedup=5.0, parameter_share=0.5),
    "wildlife_mnist": FamilyTargets(mask_iou=0.85, fused_speedup=4.0, parameter_share=1.0),
}
HAND_WRITTEN = ("tried",)  # keys of a manifest's `targets` block that assess() keeps rather than computes


def _check(name: str, target: str, measured, met, short_by=None, **extra) -> dict:
    out = {"name": name, "target": target, "measured": measured, "met": met}
    if short_by is not None:
        out["short_by"] = short_by
    return {**out, **extra}


def speed_threads() -> str:
    """'one thread': how every text about the speed target names its thread count."""
    return "one thread" if SPEED_THREADS == 1 else f"{SPEED_THREADS} threads"


def speed_target(family: str) -> str:
    return (f"≥ {TARGETS[family].fused_speedup:g}× the teacher's fused graph (onnxruntime CPU FP32, {speed_threads()}, "
            "each at its best batch)")


def speedup_of(manifest: dict, bench: dict | None) -> float | None:
    """The like-for-like fused speedup at SPEED_THREADS from a model benchmark of this very version (else None)."""
    if not bench or bench.get("family") != manifest["family"] or bench.get("version") != manifest["version"]:
        return None
    like = (bench.get("like_for_like") or {}).get(str(SPEED_THREADS))
    return like["ratio"] if like else None


def assess(manifest: dict, bench: dict | None = None, bench_source: str | None = None,
           earlier_speed: dict | None = None) -> dict:
    """Every target of the manifest's family, measured; `missed` says each miss and by how much.

    `earlier_speed`: the fused-speed check recorded when this version was benchmarked, kept when `bench` is of
    another version (the benchmark file holds the latest version only; a newer one must not erase older figures)
    and it was judged against today's target (a figure of another measure is not evidence for this one).
    """
    family = manifest["family"]
    spec = TARGETS[family]
    metrics = manifest.get("metrics") or {}
    checks = []
    pairs = metrics.get("heldout_pairs", 0)
    checks.append(_check("held-out pairs", f"≥ {MIN_PAIRS:,}", pairs, pairs >= MIN_PAIRS,
                         None if pairs >= MIN_PAIRS else MIN_PAIRS - pairs))
    iou = metrics["shape"]["mask_iou"]
    checks.append(_check("mask IoU", f"≥ {spec.mask_iou:g}", iou, iou >= spec.mask_iou,
                         None if iou >= spec.mask_iou else spec.mask_iou - iou))
    for mechanism in ("texture", "background"):
        l1, baseline = metrics[mechanism]["l1"], metrics[mechanism]["class_mean_baseline"]["l1"]
        if baseline <= BASELINE_MIN:
            checks.append(_check(f"{mechanism} L1", f"n/a (class-mean baseline {baseline:.4f} ≤ {BASELINE_MIN:g})",
                                 l1, None))
            continue
        bound = min(L1_RATIO * baseline, L1_MAX)
        aim = f"≤ {L1_RATIO:g}× baseline ({L1_RATIO * baseline:.4f}) and ≤ {L1_MAX:g}"
        checks.append(_check(f"{mechanism} L1", aim, l1, l1 <= bound, None if l1 <= bound else l1 - bound,
                             ratio_to_baseline=l1 / baseline))
    speedup = speedup_of(manifest, bench)
    target = speed_target(family)
    if speedup is None and earlier_speed and earlier_speed["target"] == target:
        checks.append(earlier_speed)
    elif speedup is None:
        checks.append(_check("fused speed", target, None, None, source="not measured for this version"))
    else:
        met = speedup >= spec.fused_speedup
        checks.append(_check("fused speed", target, speedup, met, None if met else spec.fused_speedup - speedup,
                             source=bench_source or "model benchmark"))
    students, teacher = sum(manifest["student_parameters"].values()), manifest["teacher"]["parameters"]
    limit = spec.parameter_share * teacher
    share = "the teacher's" if spec.parameter_share == 1 else f"{spec.parameter_share:g}× the teacher's"
    checks.append(_check("parameters", f"< {share} ({limit:,.0f})", students, students < limit,
                         None if students < limit else students - limit + 1))
    return {"checks": checks, "met": all(c["met"] is not False for c in checks), "missed": missed(checks)}


def _shown(name: str, value) -> str:
    if name in ("parameters", "held-out pairs"):
        return f"{value:,.0f}"
    if name == "fused speed":
        return f"{value:.2f}×"
    return f"{value:.4f}" if "L1" in name else f"{value:.3f}"


def describe(check: dict) -> str:
    """One line for a check: what it measured against what, and by how much it fell short."""
    value, name = check["measured"], check["name"]
    if value is None:
        return f"{name}: {check.get('source', 'not measured')}"
    line = f"{name} {_shown(name, value)}, target {check['target']}"
    return line + (f": short by {_shown(name, check['short_by'])}" if check["met"] is False else "")


def missed(checks: list[dict]) -> list[str]:
    return [describe(c) for c in checks if c["met"] is False]


def targets_block(manifest: dict, bench: dict | None = None, bench_source: str | None = None) -> dict:
    """The manifest's `targets` block as it should read now: measured afresh, hand-written keys kept."""
    recorded = manifest.get("targets") or {}
    kept = {key: value for key, value in recorded.items() if key in HAND_WRITTEN}
    earlier_speed = next((check for check in recorded.get("checks", [])
                          if check["name"] == "fused speed" and check["measured"] is not None), None)
    return {**assess(manifest, bench, bench_source, earlier_speed), **kept}
