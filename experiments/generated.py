"""The figures of README.md and docs/RESULTS.md, rendered from the model repository and the result JSON.

Numbers about students (fidelity, speed, parameters, invariance) are never typed: they sit in marked blocks,
`<!-- generated:NAME -->` … `<!-- /generated:NAME -->`, rendered from `models/<family>/<version>/manifest.json`
(`metrics`, `student_parameters`, `recipe`, `targets`) and `benchmarks/results/*.json`. Each manifest of a shipped
(LATEST) version also carries a `targets` block (reporting.targets), rendered the same way; its `tried`
list is the one hand-written part.

    python -m experiments.generated write    # rewrite the blocks and the manifests' targets blocks
    python -m experiments.generated check    # exit 1 naming every block that differs (writes nothing)

`check` also re-renders the sections that evaluation and benchmarks write (`<!-- results:NAME -->`: fidelity,
invariant classifier, the SKDCGN paper's experiments and claims, model, serving, soak and ImageNet benchmarks) from
their JSON and reports any that no longer start with what their renderer produces; rerun `python -m experiments
render` or the benchmark for those.
tests/test_generated_docs.py runs `check` in `make test`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.atomic import write_text_atomic
from core.manifest import MANIFEST_NAME, latest_version, list_versions, recorded_students
from core.settings import REPO_ROOT
from reporting import report
from reporting.targets import (
    BASELINE_MIN, L1_MAX, L1_RATIO, MIN_PAIRS, SPEED_THREADS, TARGETS, describe, speed_threads, targets_block,
)

FAMILIES = ("double_colored_mnist", "wildlife_mnist", "colored_mnist")  # README order
INVARIANCE_FAMILIES = ("double_colored_mnist", "wildlife_mnist")
DEFAULT_FAMILY = "double_colored_mnist"
IMAGENET_TARGET = 10.0  # ImageNet students: ≥ 10× fewer parameters and ≥ 10× the throughput of the CGN
INVARIANCE_GAP = 2.0  # students' test accuracy within this many points of the teacher's
BLOCK = re.compile(r"<!-- generated:(?P<name>[\w.-]+) -->(?P<body>.*?)<!-- /generated:(?P=name) -->", re.S)
SECTION = re.compile(r"<!-- results:(?P<name>[\w.-]+) -->\n(?P<body>.*?)\n<!-- /results:(?P=name) -->", re.S)


class GeneratedError(RuntimeError):
    pass


# --- what the blocks are made of -------------------------------------------------------------------------------

@dataclass
class Sources:
    """Everything the blocks are rendered from, read once from a checkout."""

    root: Path
    manifests: dict[str, dict[str, dict]]  # family -> version -> manifest
    latest: dict[str, str]
    results: dict[str, dict]  # file stem -> result JSON

    @classmethod
    def read(cls, root: Path) -> "Sources":
        models = root / "models"
        manifests, latest = {}, {}
        for family in FAMILIES:
            versions = list_versions(models, family)
            if not versions:
                continue
            manifests[family] = {v: json.loads((models / family / v / MANIFEST_NAME).read_text()) for v in versions}
            latest[family] = latest_version(models, family)
        results = {path.stem: json.loads(path.read_text())
                   for path in sorted((root / "benchmarks" / "results").glob("*.json"))}
        return cls(root, manifests, latest, results)

    def shipped(self, family: str) -> dict:
        return self.manifests[family][self.latest[family]]

    def bench(self, family: str) -> dict | None:
        return self.results.get(f"models_{family}")

    def targets(self, manifest: dict) -> dict:
        family = manifest["family"]
        return targets_block(manifest, self.bench(family), f"benchmarks/results/models_{family}.json")

    def assessed_versions(self) -> list[tuple[str, str]]:
        """The versions whose manifests carry a targets block: every LATEST, and any that has one already."""
        return [(family, version) for family, versions in self.manifests.items()
                for version, manifest in versions.items()
                if version == self.latest[family] or "targets" in manifest]


def short(family: str) -> str:
    return family.removesuffix("_mnist")


SPOKEN = {"double_colored_mnist": "double-coloured", "colored_mnist": "coloured", "wildlife_mnist": "wildlife"}


def fmt_lr(lr: float) -> str:
    """5e-4 rather than 0.0005."""
    if lr >= 1e-3:
        return f"{lr:g}"
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def fmt_l1(value: float) -> str:
    return f"{value:.3f}" if value >= 0.01 else f"{value:.4f}"


def widths(manifest: dict) -> str:
    """'64-32-16-8 nearest' for students alike, else per mechanism; ' sub-pixel' marks the sub-pixel head."""
    configs = recorded_students(manifest)
    shown = {m: "-".join(map(str, c["channels"])) + f" {c.get('upsample', 'bilinear')}"
             + (" sub-pixel" if c.get("head") == "subpixel" else "") for m, c in configs.items()}
    if len(set(shown.values())) == 1:
        return next(iter(shown.values()))
    return ", ".join(f"{m} {s}" for m, s in shown.items())


def total_steps(manifest: dict) -> str:
    steps = manifest["training"]["steps"]
    return " / ".join(f"{steps[m]:,}" for m in ("shape", "texture", "background"))


def cpu_minutes(manifest: dict) -> str:
    seconds = manifest["training"].get("seconds")
    total = sum(seconds.values()) if isinstance(seconds, dict) else seconds
    return f"{total / 60:.0f} min" if total else "–"


def params(manifest: dict) -> int:
    return sum(manifest["student_parameters"].values())


def teacher_label(manifest: dict) -> str:
    try:
        from training.teachers.cgn_mnist import TEACHERS
        official = TEACHERS[manifest["teacher"]["name"]].sha256 == manifest["teacher"]["sha256"]
    except (ImportError, KeyError):
        official = False
    return f"{'official CGN' if official else 'CGN'}, {manifest['teacher']['parameters']:,} params"


def check_of(targets: dict, name: str) -> dict:
    return next(c for c in targets["checks"] if c["name"] == name)


def verdict(met, measured=None) -> str:
    if met is None and measured is not None:
        return "n/a"
    return {True: "yes", False: "**no**", None: "not measured"}[met]


def brief(check: dict) -> str:
    """A miss in a few words: 'mask IoU 0.851 < 0.88'."""
    value, name = check["measured"], check["name"]
    if name == "fused speed":
        return f"fused speed {value:.2f}× < {value + check['short_by']:.2g}×"
    if name == "parameters":
        return f"parameters {value:,} ≥ {value - check['short_by'] + 1:,.0f}"
    if "L1" in name:
        return f"{name} {value:.3f} > {value - check['short_by']:.3f}"
    if name == "mask IoU":
        return f"mask IoU {value:.3f} < {value + check['short_by']:.2f}"
    return describe(check)


def targets_summary(targets: dict) -> str:
    misses = [c for c in targets["checks"] if c["met"] is False]
    unmeasured = [c["name"] for c in targets["checks"] if c["met"] is None and c["measured"] is None]
    text = "all met" if not misses else "missed: " + "; ".join(brief(c) for c in misses)
    return text + (f" ({', '.join(unmeasured)}: not measured)" if unmeasured else "")


def arm(result: dict, name: str) -> dict:
    return result["arms"][name]["test_accuracy"]


def seeds_text(seeds: list) -> str:
    return "one seed" if len(seeds) == 1 else f"{len(seeds)} seeds"


def wrap_bullet(text: str) -> str:
    return textwrap.fill(text, width=115, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)


def wrap(text: str) -> str:
    return textwrap.fill(text, width=115, break_long_words=False, break_on_hyphens=False)


# --- README -------------------------------------------------------------------------------------------------------

def readme_families(src: Sources) -> str:
    rows = []
    for family in FAMILIES:
        if family not in src.manifests:
            continue
        m = src.shipped(family)
        metrics = m["metrics"]
        students = (f"{m['version']}: {params(m):,} params; mask IoU {metrics['shape']['mask_iou']:.3f}, texture / "
                    f"background L1 {fmt_l1(metrics['texture']['l1'])} / {fmt_l1(metrics['background']['l1'])}")
        name = f"`{family}`" + (" (default)" if family == DEFAULT_FAMILY else "")
        rows.append([name, teacher_label(m), students, f"{m['image_size']}×{m['image_size']}",
                     targets_summary(src.targets(m))])
    rows.append(["`imagenet`", "your `cgn.pth` (3× BigGAN-deep-256 + U²-Net)", "TinyGAN-256, distilled by you",
                 "256×256", "–"])
    return report.table(["family", "teacher", "students (3 mechanisms), LATEST", "served at",
                         "student targets ([details](docs/RESULTS.md#students-against-their-targets))"], rows)


def headline_invariance(src: Sources) -> str | None:
    found = {f: src.results.get(f"invariance_{f}_unmodified") for f in INVARIANCE_FAMILIES}
    if not all(found.values()):
        return None
    first = found[INVARIANCE_FAMILIES[0]]
    config = first["config"]
    parts = []
    for family, result in found.items():
        s, t = arm(result, "student"), arm(result, "teacher")
        real = result["arms"].get("real")
        parts.append((family, s, t, real["test_accuracy"]["mean"] if real else None))
    (f1, s1, t1, r1), (f2, s2, t2, r2) = parts
    v1, v2 = (student_version(found[f]) for f in (f1, f2))
    seeds2 = found[f2]["config"]["seeds"]
    if len(seeds2) != len(config["seeds"]):  # the second family's own seed count, inside its version's brackets
        v2 = f"{v2[:-1]}, {seeds_text(seeds2)})" if v2 else f" ({seeds_text(seeds2)})"
    text = (f"**Invariance, the reason CGNs exist.** A classifier trained only on {config['images']:,} counterfactuals "
            f"({config['train']['epochs']} epochs, {seeds_text(config['seeds'])}) scores on real, randomly coloured "
            f"digits {report.pm(s1)} % with the {SPOKEN.get(f1, f1)} students{v1} vs {report.pm(t1)} % with the "
            f"teacher" + (f" and {r1:.1f} % for the biased real set" if r1 is not None else "")
            + f"; {SPOKEN.get(f2, f2)}{v2} {report.pm(s2)} % vs {report.pm(t2)} %"
            + (f" vs {r2:.1f} %" if r2 is not None else "")
            + ".")
    paper = [src.results.get(f"paper_scale_invariance_{f}") for f in INVARIANCE_FAMILIES]
    if all(paper):
        p = paper[0]["config"]
        text += (f" At the paper's scale ({p['images']:,} images, {p['train']['epochs']} epochs, "
                 f"{seeds_text(p['seeds'])}): "
                 + " and ".join(f"{arm(r, 'student')['mean']:.1f}{student_version(r)} vs "
                                f"{arm(r, 'teacher')['mean']:.1f} %" for r in paper)
                 + ".")
    return text


def student_version(result: dict) -> str:
    """' (v5)': the student version an invariance result measured (from its `sources`), or '' when unnamed."""
    name = result.get("sources", {}).get("student", "")
    return f" ({name.rsplit('/', 1)[1]})" if "/" in name else ""


def student_versions(results) -> str:
    """'v5 / v4': the student versions of several invariance results, in order ('?' where one is unnamed)."""
    return " / ".join(student_version(r).strip(" ()") or "?" for r in results)


def serving_target(result: dict, prefix: str) -> dict | None:
    return next((t for t in result.get("targets", []) if t["target"].startswith(prefix)), None)


def serving_version(src: Sources, result: dict) -> str:
    """The version the serving benchmark measured, and whether that is still LATEST."""
    measured, latest = result.get("version"), src.latest.get(DEFAULT_FAMILY)
    return measured if measured == latest else f"{measured}; LATEST is {latest}, not re-measured yet"


def headline_speed(src: Sources) -> str | None:
    bench = src.bench(DEFAULT_FAMILY)
    like = bench and (bench.get("like_for_like") or {}).get(str(SPEED_THREADS))
    if not like:
        return None
    student, teacher = like["best"]["student"], like["best"]["teacher"]
    cost = bench["cost"]
    students = sum(cost["student"][m]["parameters"] for m in ("shape", "texture", "background"))
    ratio = cost["teacher"]["total_parameters"] / students
    text = (f"**Speed.** The three {SPOKEN[DEFAULT_FAMILY]} students ({bench['version']}) render "
            f"{student['images_per_second']:,.0f} counterfactuals/s in one fused FP32 onnxruntime graph on "
            f"{speed_threads()} of a CPU "
            f"(batch {student['batch']}), {like['ratio']:.1f}× the teacher exported the same way "
            f"({teacher['images_per_second']:,.0f} at its best batch, {teacher['batch']}), with {ratio:.1f}× fewer "
            f"parameters; they use {student['peak_share']:.0%} of the core's measured FP32 peak, the teacher "
            f"{teacher['peak_share']:.0%}.")
    serving = src.results.get(f"serving_{DEFAULT_FAMILY}")
    if serving:
        hit, bulk = serving_target(serving, "cache-hit p50"), serving_target(serving, "bulk job")
        distinct = serving_target(serving, "cache hits/s over")
        said = []
        if hit and hit["value"] is not None:
            said.append(f"answers a cached counterfactual in {hit['value']:.1f} ms (p50)")
        if distinct and distinct["value"] is not None:
            said.append(f"serves cache hits over {serving['distinct']['bodies']:,} distinct cached requests at "
                        f"{distinct['value']:.0%} of the rate of a minimal FastAPI + Redis GET endpoint")
        if bulk and bulk["value"] is not None:
            said.append(f"runs a bulk job at {bulk['value']:.0%} of the raw engine's throughput")
        if said:
            listed = ", ".join(said[:-1]) + " and " + said[-1] if len(said) > 1 else said[0]
            text += f" The service ({serving_version(src, serving)}) {listed}."
    return text


def headline_imagenet(src: Sources) -> str | None:
    result = src.results.get("imagenet_speed")
    if not result:
        return None
    cost = result["cost"]
    teacher, student = cost["teacher"]["counterfactual"]["parameters"], cost["student"]["counterfactual"]["parameters"]
    speed = result["speedup"]["student/onnxruntime-cpu vs teacher/onnxruntime-cpu"]["counterfactual"]
    weights = "random weights" if "random" in result.get("teacher_weights", "random") else "trained weights"
    return (f"**ImageNet ({weights}, {result['image_size']} px).** TinyGAN-256 students have {teacher / student:.1f}× "
            f"fewer parameters than the CGN ({student / 1e6:.1f} M vs {teacher / 1e6:.1f} M) and render a "
            f"counterfactual {speed:.0f}× faster (onnxruntime vs onnxruntime).")


def readme_headline(src: Sources) -> str:
    bench = src.bench(DEFAULT_FAMILY) or {}
    host = bench.get("host", {})
    where = (f"{host['cpus']}-core {host['machine']} CPU without a GPU" if host else "CPU")
    lines = [wrap(f"Headline numbers, all measured on a {where} (details, plots and sample grids in "
                  "[docs/RESULTS.md](docs/RESULTS.md)):"), ""]
    for text in (headline_invariance(src), headline_speed(src), headline_imagenet(src)):
        if text:
            lines.append(wrap_bullet("- " + text))
    return "\n".join(lines)


# --- RESULTS.md -----------------------------------------------------------------------------------------------------

def invariance_rows(src: Sources) -> list[list[str]]:
    rows = []
    for family in INVARIANCE_FAMILIES:
        result = src.results.get(f"invariance_{family}_unmodified")
        if not result:
            continue
        s, t = arm(result, "student"), arm(result, "teacher")
        modified = src.results.get(f"invariance_{family}_modified")
        extra = (f" (modified masks {arm(modified, 'student')['mean']:.1f} vs {arm(modified, 'teacher')['mean']:.1f})"
                 if modified else "")
        gap = t["mean"] - s["mean"]
        rows.append([f"invariant classifier, {short(family)}: students vs teacher", f"within {INVARIANCE_GAP:g} points",
                     f"{report.pm(s)} vs {report.pm(t)} %{extra}", "yes" if gap <= INVARIANCE_GAP else "**no**"])
    paper = {f: src.results.get(f"paper_scale_invariance_{f}") for f in INVARIANCE_FAMILIES}
    default = {f: src.results.get(f"invariance_{f}_unmodified") for f in INVARIANCE_FAMILIES}
    if all(paper.values()) and all(default.values()):
        published = {f: report.PAPER_TEST_ACCURACY[f] for f in INVARIANCE_FAMILIES}
        join = " / ".join
        first = next(iter(paper.values()))["config"]
        below = join(f"{published[f]['original + CGN counterfactuals'] - arm(paper[f], 'teacher')['mean']:.1f}"
                     for f in INVARIANCE_FAMILIES)
        rows.append([
            "teacher arm vs the paper's " + join(f"{published[f]['original + CGN counterfactuals']:.1f}"
                                                  for f in INVARIANCE_FAMILIES) + " %",
            "near",
            f"paper scale ({first['images'] // 1000}k, {first['train']['epochs']} epochs, seed "
            f"{','.join(map(str, first['seeds']))}): " + join(f"{arm(paper[f], 'teacher')['mean']:.1f}" for f in paper)
            + " %, students " + join(f"{arm(paper[f], 'student')['mean']:.1f}" for f in paper)
            + f" % ({student_versions(paper.values())}); at the default "
            f"{next(iter(default.values()))['config']['images'] // 1000}k / "
            f"{next(iter(default.values()))['config']['train']['epochs']} epochs "
            + join(f"{arm(default[f], 'teacher')['mean']:.1f}" for f in default) + " %",
            "near the counterfactuals-only reproduction ("
            + join(f"{published[f]['counterfactuals only (reproduction)']:.1f}" for f in INVARIANCE_FAMILIES)
            + f"); {below} below the paper, which adds the real set",
        ])
    return rows


def student_verdict(targets: dict) -> str:
    missed = [c["name"] for c in targets["checks"] if c["met"] is False]
    unmeasured = [c["name"] for c in targets["checks"] if c["met"] is None and c["measured"] is None]
    if missed:
        return "**no**: " + ", ".join(missed)
    return "yes" + (f" ({', '.join(unmeasured)} not measured)" if unmeasured else "")


def student_rows(src: Sources) -> list[list[str]]:
    rows = []
    for family in FAMILIES:
        if family not in src.manifests:
            continue
        m = src.shipped(family)
        targets = src.targets(m)
        spec = TARGETS[family]
        iou = check_of(targets, "mask IoU")["measured"]
        ratios = [f"{c['ratio_to_baseline']:.2f}×" for c in targets["checks"] if "ratio_to_baseline" in c]
        speed = check_of(targets, "fused speed")["measured"]
        share = "½ the teacher's" if spec.parameter_share == 0.5 else "the teacher's"
        rows.append([f"students, {short(family)} {m['version']}",
                     f"IoU ≥ {spec.mask_iou:g}; L1 ≤ {L1_RATIO:g}× baseline and ≤ {L1_MAX:g}; fused ≥ "
                     f"{spec.fused_speedup:g}× ({speed_threads()}, best batch); parameters < {share}",
                     f"IoU {iou:.3f}; L1 " + (" / ".join(ratios) + " of the baseline" if ratios else "n/a")
                     + f"; fused {'not measured' if speed is None else f'{speed:.2f}×'}; {params(m):,} parameters",
                     student_verdict(targets)])
    return rows


def serving_rows(src: Sources) -> list[list[str]]:
    serving = src.results.get(f"serving_{DEFAULT_FAMILY}")
    if not serving:
        return []
    measured = f"{short(DEFAULT_FAMILY)} {serving_version(src, serving)}"
    return [[f"serving ({measured}): {t['target']}", "", t["shown"], verdict(t["met"])]
            for t in serving.get("targets", [])]


def imagenet_rows(src: Sources) -> list[list[str]]:
    result = src.results.get("imagenet_speed")
    if not result:
        return []
    cost, keys = result["cost"], ("shape", "texture", "background")
    ratio = {k: cost["teacher"][k]["parameters"] / cost["student"][k]["parameters"] for k in (*keys, "counterfactual")}
    onnx = result["speedup"]["student/onnxruntime-cpu vs teacher/onnxruntime-cpu"]
    torch = result["speedup"].get("student/pytorch-cpu vs teacher/pytorch-cpu")
    def shown(r: dict) -> str:
        return " / ".join(f"{r[k]:.1f}×" for k in keys) + f", counterfactual {r['counterfactual']:.1f}×"
    return [
        ["ImageNet: parameters, per mechanism and counterfactual", f"≥ {IMAGENET_TARGET:g}× fewer", shown(ratio),
         "yes" if min(ratio.values()) >= IMAGENET_TARGET else "**no**"],
        ["ImageNet: throughput, onnxruntime vs onnxruntime", f"≥ {IMAGENET_TARGET:g}×",
         shown(onnx) + (f" (PyTorch vs PyTorch {shown(torch)})" if torch else ""),
         "yes" if min(onnx.values()) >= IMAGENET_TARGET else "**no**"],
    ]


def fidelity_sentence(src: Sources) -> str | None:
    result = src.results.get(f"fidelity_{DEFAULT_FAMILY}")
    if not result:
        return None
    mech, comp, rec = result["mechanisms"], result["composite"], result["recognisability"]
    ratio = lambda m: mech[m]["student"]["l1"] / mech[m]["class_mean_baseline"]["l1"]  # noqa: E731
    text = (f"Distilled students, fidelity through ONNX ({result['pairs']:,} pairs drawn with seed "
            f"{result['heldout_seed']}; the manifests' `metrics` come from the bank's held-out split at export, so "
            f"the two differ in the third decimal): {short(DEFAULT_FAMILY)} {result['version']} mask IoU "
            f"{mech['shape']['student']['mask_iou']:.3f}, texture / background L1 "
            f"{fmt_l1(mech['texture']['student']['l1'])} / {fmt_l1(mech['background']['student']['l1'])} "
            f"({ratio('texture'):.2f} / {ratio('background'):.2f} of the class-mean baseline); composed "
            f"counterfactuals L1 {comp['l1']:.3f}, PSNR {comp['psnr']:.1f} dB; masks read as their label by a digit "
            f"CNN {rec['student']:.1f} % (teacher {rec['teacher']:.1f} %)")
    match = result.get("label_match")
    if match:
        text += (f"; textures and backgrounds wear their label ({match['method']}) {match['texture']['student']:.0f} / "
                 f"{match['background']['student']:.0f} % (teacher {match['texture']['teacher']:.0f} / "
                 f"{match['background']['teacher']:.0f} %)")
    return wrap(text + ".")


def scale_sentence(src: Sources) -> str | None:
    paper = {f: src.results.get(f"paper_scale_invariance_{f}") for f in INVARIANCE_FAMILIES}
    default = {f: src.results.get(f"invariance_{f}_unmodified") for f in INVARIANCE_FAMILIES}
    if not (all(paper.values()) and all(default.values())):
        return None
    under = [arm(paper[f], "teacher")["mean"] - arm(default[f], "teacher")["mean"] for f in INVARIANCE_FAMILIES]
    gaps = [abs(arm(r, "teacher")["mean"] - arm(r, "student")["mean"]) for r in (*paper.values(), *default.values())]
    config = next(iter(default.values()))["config"]
    return wrap(f"The default scale ({config['images']:,} counterfactuals, {config['train']['epochs']} epochs) leaves "
                f"the teacher's arm {min(under):.1f}–{max(under):.1f} points under paper scale; at paper scale it "
                "reaches the public counterfactuals-only reproduction, and the paper's figures also train on the real "
                f"set. Students (paper scale {student_versions(paper.values())}, default scale "
                f"{student_versions(default.values())}) stay within {max(gaps):.1f} points of the teacher at both "
                "scales.")


def results_summary(src: Sources) -> str:
    bench = src.bench(DEFAULT_FAMILY) or {}
    host = bench.get("host")
    where = f"{host['cpus']}-core {host['machine']} CPU, no GPU" if host else "CPU"
    rows = invariance_rows(src) + student_rows(src) + serving_rows(src) + imagenet_rows(src)
    lines = [f"### Summary ({where})", "",
             wrap("Every figure in this section, the student sections below and README's family table is rendered "
                  "from `models/*/*/manifest.json` and `benchmarks/results/*.json` by `python -m "
                  "experiments.generated write`; `make test` fails when a block differs from what the JSON "
                  "says now."), "",
             report.table(["what", "target", "measured", "met"], rows)]
    for text in (fidelity_sentence(src), scale_sentence(src)):
        if text:
            lines += ["", text]
    return "\n".join(lines)


def iou_weight(weights: dict) -> str:
    """', λ_iou 0.5' where a stage used the mask's soft-IoU term (recipes before it have no such key)."""
    return f", λ_iou {weights['iou']:g}" if weights.get("iou") else ""


def recipe_lines(manifest: dict) -> list[str]:
    recipe = manifest.get("recipe")
    if not recipe:
        return []
    stages = recipe["stages"]
    weights = [s["weights"] for s in stages]
    w = weights[0]
    same = all(x == w for x in weights)
    shown_w = (f"λ_pix {w['pix']:g} (decay {w['pix_decay']:g}/epoch), λ_kl {w['kl']:g}, λ_adv {w['adv']:g}, "
               f"λ_feat {w['feat']:g}" + iou_weight(w))
    parts = []
    for s in stages:
        steps = ", ".join(f"{m} {s['steps'][m]:,}" for m in ("shape", "texture", "background") if s["steps"].get(m))
        extra = "" if same else (f", λ_pix {s['weights']['pix']:g}, λ_kl {s['weights']['kl']:g}, "
                                 f"λ_adv {s['weights']['adv']:g}, λ_feat {s['weights']['feat']:g}"
                                 + iou_weight(s["weights"]))
        schedule = "" if s.get("lr_schedule", "constant") == "constant" else f" {s['lr_schedule']}"
        parts.append(f"{s['name']} (lr {fmt_lr(s['lr'])}{schedule}, batch {s['batch_size']}{extra}: {steps})")
    return [wrap(f"{short(manifest['family'])} {manifest['version']}, recipe `{recipe['name']}`"
                 + (f", {shown_w} in every stage" if same else "") + ": " + "; ".join(parts) + ".")]


def results_students(src: Sources) -> str:
    lines = ["### Students against their targets", "",
             wrap(f"Targets on ≥ {MIN_PAIRS:,} held-out pairs: mask IoU ≥ "
                  + ", ".join(f"{t.mask_iou:g} ({short(f)})" for f, t in TARGETS.items())
                  + f"; texture and background mean L1 ≤ {L1_RATIO:g}× the class-mean baseline and ≤ {L1_MAX:g} "
                  f"wherever that baseline exceeds {BASELINE_MIN:g}; the fused student graph ≥ "
                  + ", ".join(f"{t.fused_speedup:g}× ({short(f)})" for f, t in TARGETS.items())
                  + f" the teacher's fused graph, like for like (FP32 onnxruntime CPU on {speed_threads()}, each "
                  "at its best batch: the model benchmark's `like_for_like` below); "
                  "student parameters (three mechanisms) below half the teacher's (wildlife: below the teacher's). "
                  "Fidelity: each manifest's `metrics`, measured at export on the bank's held-out split; each LATEST "
                  "manifest carries the same assessment as its `targets` block."), ""]
    rows = []
    for family in FAMILIES:
        if family not in src.manifests:
            continue
        m = src.shipped(family)
        metrics, targets = m["metrics"], src.targets(m)
        speed = check_of(targets, "fused speed")["measured"]
        rows.append([f"{family} {m['version']}", widths(m), f"{params(m):,} ({m['teacher']['parameters']:,})",
                     f"{metrics['shape']['mask_iou']:.3f} ({metrics['shape']['class_mean_baseline']['mask_iou']:.3f})",
                     *(f"{metrics[k]['l1']:.4f} ({metrics[k]['class_mean_baseline']['l1']:.4f})"
                       for k in ("texture", "background")),
                     total_steps(m), cpu_minutes(m), "–" if speed is None else f"{speed:.2f}×"])
    lines += [report.table(["family (LATEST)", "students", "parameters (teacher)", "mask IoU (baseline)",
                            "texture L1 (baseline)", "background L1 (baseline)", "steps shape / texture / background",
                            "CPU time", "fused speedup"], rows), ""]
    target_rows = []
    for family in FAMILIES:
        if family not in src.manifests:
            continue
        m = src.shipped(family)
        for c in src.targets(m)["checks"]:
            target_rows.append([f"{short(family)} {m['version']}", c["name"], c["target"],
                                "–" if c["measured"] is None
                                else describe(c).split(", target")[0].removeprefix(c["name"]).strip(),
                                verdict(c["met"], c["measured"]),
                                describe(c).split("short by ")[1] if c["met"] is False else ""])
    lines += [report.table(["students", "target", "aim", "measured", "met", "short by"], target_rows)]
    tried = []
    for family in FAMILIES:
        if family not in src.manifests:
            continue
        m = src.shipped(family)
        for entry in (m.get("targets") or {}).get("tried", []):
            tried.append(wrap_bullet(f"- {short(family)} {m['version']}: {entry}"))
    if tried:
        lines += ["", "What was tried (each LATEST manifest's `targets.tried`):", "", *tried]
    recipes = [line for family in FAMILIES if family in src.manifests for line in recipe_lines(src.shipped(family))]
    if recipes:
        lines += ["", wrap("Recipes of the shipped students (each manifest's `recipe`, all stages; train one again "
                           "with `python training/distill.py ... --recipe models/<family>/<version>`):"), ""]
        lines += [wrap_bullet("- " + line) for line in recipes]
    history = []
    for family in FAMILIES:
        for version, m in src.manifests.get(family, {}).items():
            metrics = m["metrics"]
            history.append([f"{family} {version}" + (" (LATEST)" if version == src.latest[family] else ""),
                            widths(m), f"{params(m):,}", f"{metrics['shape']['mask_iou']:.3f}",
                            f"{metrics['texture']['l1']:.4f}", f"{metrics['background']['l1']:.4f}", total_steps(m),
                            m["created"][:10]])
    lines += ["", "Every version in the model repository:", "",
              report.table(["version", "students", "parameters", "mask IoU", "texture L1", "background L1",
                            "steps shape / texture / background", "created"], history)]
    return "\n".join(lines)


def results_paper_scale(src: Sources) -> str:
    paper = {f: src.results.get(f"paper_scale_invariance_{f}") for f in INVARIANCE_FAMILIES}
    paper = {f: r for f, r in paper.items() if r}
    if not paper:
        return "### Invariant classifier at paper scale\n\n(not measured)"
    config = next(iter(paper.values()))["config"]
    minutes = [run["seconds"] / 60 for r in paper.values() for a in r["arms"].values() for run in a["runs"]]
    rows = []
    for family, result in paper.items():
        published = report.PAPER_TEST_ACCURACY.get(family, {})
        students = result["sources"].get("student", "").rsplit("/", 1)[-1]
        rows.append([f"{family} (students {students})", f"{arm(result, 'teacher')['mean']:.1f}",
                     f"{arm(result, 'student')['mean']:.1f}",
                     f"{published.get('counterfactuals only (reproduction)', float('nan')):.1f}",
                     f"{published.get('original + CGN counterfactuals', float('nan')):.1f}"])
    gaps = [abs(arm(r, "teacher")["mean"] - arm(r, "student")["mean"]) for r in paper.values()]
    reproduction = {f: report.PAPER_TEST_ACCURACY[f]["counterfactuals only (reproduction)"] for f in paper}
    vs = ", ".join(f"{arm(r, 'teacher')['mean']:.1f} vs {reproduction[f]:.1f}" for f, r in paper.items())
    seeds = ",".join(map(str, config["seeds"]))
    return "\n".join([
        f"### Invariant classifier at paper scale ({config['images']:,} counterfactuals, "
        f"{config['train']['epochs']} epochs, seed {seeds})",
        "",
        wrap(f"{seeds_text(config['seeds']).capitalize()} per arm "
             f"({min(minutes):.0f}–{max(minutes):.0f} minutes per run); otherwise the settings of the sections below, "
             "unmodified masks. JSON: `benchmarks/results/paper_scale_invariance_<family>.json` (`python -m "
             "experiments invariance --family F --paper-scale --mask unmodified --arms teacher,student "
             f"--seeds {seeds}`)."),
        "",
        report.table(["family", "teacher counterfactuals", "student counterfactuals (ONNX)",
                      "public counterfactuals-only reproduction", "paper: original + counterfactuals"], rows),
        "",
        wrap(f"At paper scale the teacher matches the counterfactuals-only reproduction ({vs}) and the students stay "
             f"within {max(gaps):.1f} points of it. The remaining gap to the paper is its training set: the paper adds "
             "the real (biased) digits to the counterfactuals; this project's arms are counterfactuals only."),
    ])


# --- the files and their blocks ---------------------------------------------------------------------------------

RENDERERS: dict[str, dict[str, Callable[[Sources], str]]] = {
    "README.md": {"families": readme_families, "headline": readme_headline},
    "docs/RESULTS.md": {"summary": results_summary, "students": results_students, "paper-scale": results_paper_scale},
}


def render(src: Sources) -> dict[str, dict[str, str]]:
    return {path: {name: fn(src) for name, fn in blocks.items()} for path, blocks in RENDERERS.items()}


def replace_blocks(text: str, bodies: dict[str, str], where: str) -> str:
    found = {m.group("name") for m in BLOCK.finditer(text)}
    missing = sorted(set(bodies) - found)
    if missing:
        raise GeneratedError(f"{where} lacks the marked block(s) {', '.join(missing)} "
                             "(<!-- generated:NAME --> … <!-- /generated:NAME -->)")
    unknown = sorted(found - set(bodies))
    if unknown:
        raise GeneratedError(f"{where} has generated block(s) no renderer knows: {', '.join(unknown)}")
    return BLOCK.sub(lambda m: f"<!-- generated:{m.group('name')} -->\n{bodies[m.group('name')].strip()}\n"
                               f"<!-- /generated:{m.group('name')} -->", text)


def blocks_of(text: str) -> dict[str, str]:
    return {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}


# The sections evaluation and benchmarks write, re-rendered from their JSON: the committed section must start with
# what the renderer makes of the committed JSON (a note may follow).
def expected_sections(src: Sources) -> dict[str, Callable[[], str]]:
    out: dict[str, Callable[[], str]] = {}
    results = src.results
    for family in FAMILIES:
        if f"fidelity_{family}" in results:
            r = results[f"fidelity_{family}"]
            out[f"fidelity-{family}"] = lambda r=r: report.fidelity_markdown(r["family"], r["version"], r)
        for setting in ("unmodified", "modified"):
            if f"invariance_{family}_{setting}" in results:
                r = results[f"invariance_{family}_{setting}"]
                out[f"invariance-{family}-{setting}"] = lambda r=r: report.invariance_markdown(r)
        both = [results.get(f"invariance_{family}_{s}") for s in ("unmodified", "modified")]
        if all(both):
            out[f"invariance-{family}-shape-study"] = lambda b=both: report.shape_study_markdown(*b)
        if f"models_{family}" in results:
            r = results[f"models_{family}"]

            def models(r=r, family=family):
                from benchmarks import models as bench_models
                return bench_models.markdown(r, f"throughput_{family}.png")
            out[f"bench-models-{family}"] = models
        if f"serving_{family}" in results:
            r = results[f"serving_{family}"]

            def serving(r=r):
                from benchmarks import serving as bench_serving
                return bench_serving.markdown(r, bench_serving.PLOT_NAME)
            out[f"bench-serving-{family}"] = serving
        for stem, section in ((f"soak_{family}", f"bench-soak-{family}"),
                              (f"soak_faults_{family}", f"bench-soak-faults-{family}")):
            if stem in results:
                def soak(r=results[stem]):
                    from benchmarks import soak as bench_soak
                    return bench_soak.markdown(r)
                out[section] = soak
    remade = [r for name, r in results.items() if name.startswith("remake_")]
    if remade:
        from training.evaluation import remake  # imported here: it brings onnxruntime
        for r in remade:
            out[remake.section_name(r)] = lambda r=r: remake.markdown(r)
    if "imagenet_speed" in results:
        def imagenet(r=results["imagenet_speed"]):
            from benchmarks import imagenet_speed
            return imagenet_speed.markdown(r)
        out["bench-imagenet-speed"] = imagenet
    # The SKDCGN paper's sections (claims, Table 1, transparency, original + counterfactuals, baseline), rendered
    # together from benchmarks/results/paper_*.json (and the paper-scale invariance files they name).
    paper_bodies: dict[str, str] = {}

    def paper_section(name: str) -> str:
        if not paper_bodies:
            from experiments import paper_report  # imported here: it brings torch (experiments.paper)
            paper_bodies.update(paper_report.section_bodies(src.root / "benchmarks" / "results"))
        return paper_bodies[name]
    for name in ("paper-claims", "paper-table1", "paper-transparency", "paper-original-plus-cf", "paper-baseline"):
        out[name] = lambda name=name: paper_section(name)
    return out


def section_problems(src: Sources, path: str = "docs/RESULTS.md") -> list[str]:
    text = (src.root / path).read_text()
    sections = {m.group("name"): m.group("body") for m in SECTION.finditer(text)}
    problems = []
    for name, make in expected_sections(src).items():
        if name not in sections:
            continue  # a result without its section is not a stale figure
        try:
            expected = make().strip()
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            problems.append(f"{path} results:{name}: its JSON cannot be rendered by the current code "
                            f"({type(exc).__name__}: {exc}); rerun the evaluation or benchmark that writes it")
            continue
        if not sections[name].strip().startswith(expected):
            problems.append(f"{path} results:{name}: differs from its JSON; rerun `python -m experiments render` "
                            "(fidelity, invariance, paper) or the benchmark that writes it")
    return problems


def problems(root: Path = REPO_ROOT, sections: bool = True) -> list[str]:
    """Every block, manifest targets block and (with `sections`) results section that differs from what the JSON
    says now. Reads only."""
    src = Sources.read(root)
    found = []
    for path, bodies in render(src).items():
        committed = blocks_of((root / path).read_text())
        for name, body in bodies.items():
            if name not in committed:
                found.append(f"{path}: no block generated:{name}")
            elif committed[name].strip() != body.strip():
                found.append(f"{path} generated:{name}: differs from what the JSON and manifests say now")
    for family, version in src.assessed_versions():
        manifest = src.manifests[family][version]
        if manifest.get("targets") != src.targets(manifest):
            found.append(f"models/{family}/{version}/{MANIFEST_NAME}: `targets` block differs from the assessment")
    if sections:
        found += section_problems(src)
    return found


def write(root: Path = REPO_ROOT) -> list[str]:
    """Rewrite the manifests' targets blocks, then every generated block; returns what changed."""
    changed = []
    src = Sources.read(root)
    for family, version in src.assessed_versions():
        manifest = src.manifests[family][version]
        block = src.targets(manifest)
        if manifest.get("targets") != block:
            manifest["targets"] = block
            path = root / "models" / family / version / MANIFEST_NAME
            write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            changed.append(str(path.relative_to(root)))
    src = Sources.read(root)
    for path, bodies in render(src).items():
        text = (root / path).read_text()
        new = replace_blocks(text, bodies, path)
        if new != text:
            write_text_atomic(root / path, new)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["write", "check"])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="the checkout (default: this one)")
    args = parser.parse_args(argv)
    if args.command == "write":
        changed = write(args.root)
        print("\n".join(f"rewrote {path}" for path in changed) or "nothing to change")
        stale = section_problems(Sources.read(args.root))
        for line in stale:
            print(f"stale: {line}", file=sys.stderr)
        return 0
    found = problems(args.root)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
