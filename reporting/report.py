"""Results as JSON files and as marked sections of docs/RESULTS.md that each run rewrites in place.

Evaluation and benchmarks each own their sections (`<!-- results:NAME -->` … `<!-- /results:NAME -->`), so
rerunning one never clobbers another's tables.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

from core.atomic import write_text_atomic

RESULTS_HEADER = "# Results\n\nMeasured numbers; each section says exactly what was run. Regenerate with `make eval` / `make bench`.\n"


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def update_section(markdown_path: str | os.PathLike, name: str, body: str) -> None:
    """Replace section `name` of the results file (append it when new); the file is created if missing."""
    path = Path(markdown_path)
    text = path.read_text() if path.is_file() else RESULTS_HEADER
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(path, text)


def publish(result: dict, json_path: str | os.PathLike, markdown_path: str | os.PathLike, section: str,
            body: str) -> None:
    """What every benchmark ends with: its result as JSON, its section of the results file, the section printed."""
    write_json(json_path, result)
    update_section(markdown_path, section, body)
    print(body)


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def pm(summary: dict, digits: int = 1) -> str:
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def fidelity_markdown(family: str, version: str, result: dict) -> str:
    """The fidelity section; the result's `grid` and `loss_curves` (picture files beside the page) when present."""
    mech = result["mechanisms"]
    rows = []
    for m, metric, fmt in (("shape", "mask_iou", ".3f"), ("shape", "l1", ".4f"), ("texture", "l1", ".4f"),
                           ("texture", "psnr", ".1f"), ("background", "l1", ".4f"), ("background", "psnr", ".1f")):
        student, baseline = mech[m]["student"][metric], mech[m]["class_mean_baseline"][metric]
        ratio = f"{student / baseline:.2f}" if metric == "l1" else ""
        rows.append([m, metric, format(student, fmt), format(baseline, fmt), ratio])
    comp = result["composite"]
    rec, match = result["recognisability"], result.get("label_match")
    label_rows = [["mask shows its shape label (digit CNN)", f"{rec['teacher']:.1f}", f"{rec['student']:.1f}"]]
    for m in ("texture", "background") if match else ():
        label_rows.append([f"{m} wears its label ({match['method']})", f"{match[m]['teacher']:.1f}",
                           f"{match[m]['student']:.1f}"])
    recogniser = rec["recogniser"]
    lines = [
        f"### Fidelity: {family}/{version} vs its teacher",
        "",
        f"{result['pairs']:,} held-out (z, y) pairs (seed {result['heldout_seed']}); class-mean baseline from "
        f"{result['baseline_pairs']:,} other teacher samples.",
        "",
        table(["mechanism", "metric", "student", "class-mean baseline", "L1 ratio (aim ≤ 0.6)"], rows),
        "",
        f"Composed counterfactuals (identical noise, shuffles, labels): L1 {comp['l1']:.4f}, "
        f"PSNR {comp['psnr']:.1f} dB, mask IoU {comp['mask_iou']:.3f}.",
        "",
        table(["label check", "teacher %", "student %"], label_rows),
        "",
        f"Digit CNN: trained on {recogniser['trained_on']} ({recogniser['epochs']} epochs), "
        f"{recogniser['accuracy_on_t10k[5000:]']:.1f} % on real t10k[5000:].",
    ]
    if result.get("grid"):
        lines += ["", "Teacher (upper) vs student (lower) rows per mechanism, one column per label: "
                  f"![{family}]({result['grid']})"]
    if result.get("loss_curves"):
        lines += ["", f"Distillation losses per mechanism: ![{family} losses]({result['loss_curves']})"]
    return "\n".join(lines)


# REFERENCE.md: CGN Table 2 test accuracy (original; original + counterfactuals) and a public reproduction trained
# on counterfactuals only, for the same test protocol at paper scale.
PAPER_TEST_ACCURACY = {
    "double_colored_mnist": {"original": 10.3, "original + CGN counterfactuals": 89.0, "counterfactuals only (reproduction)": 86.5},
    "wildlife_mnist": {"original": 10.1, "original + CGN counterfactuals": 85.7, "counterfactuals only (reproduction)": 81.4},
}

ARM_TITLES = {"real": "real digits, biased (t10k[:5000], label colours)", "teacher": "teacher counterfactuals",
              "student": "student counterfactuals (ONNX)"}


def invariance_markdown(result: dict, note: str = "") -> str:
    config, mask = result["config"], result["mask"]
    order = sorted(result["arms"], key=lambda name: list(ARM_TITLES).index(name) if name in ARM_TITLES else len(ARM_TITLES))
    rows = [[ARM_TITLES.get(name, name), pm(result["arms"][name]["train_accuracy"]),
             pm(result["arms"][name]["test_accuracy"]), len(result["arms"][name]["runs"])] for name in order]
    setting = ("unmodified masks" if mask["setting"] == "unmodified" else
               f"modified masks (noise σ {mask['noise_std']:g}, rotation ±{mask['rotation_deg']:g}°, "
               f"transparency {mask['transparency']:g})")
    train = config["train"]
    lines = [
        f"### Invariant classifier: {result['family']}, {setting}",
        "",
        f"Run: {config['images']:,} counterfactuals per arm ({config['per_shape']} per mask), seeds "
        f"{config['seeds']}, SmallCNN (67,064 parameters), Adadelta lr {train['lr']:g}, StepLR γ {train['gamma']:g}, "
        f"batch {train['batch_size']}, {train['epochs']} epochs. Test: {result['test_images']:,} t10k[5000:] digits "
        "with random colours/textures. Accuracy % as mean ± std (ddof 1) over seeds.",
        "",
        table(["training data", "train %", "test %", "runs"], rows),
        "",
        "Generators: " + ", ".join(f"{arm} = `{name}`" for arm, name in result["sources"].items()) + ".",
    ]
    paper = PAPER_TEST_ACCURACY.get(result["family"])
    if paper:
        lines += ["", "For scale, published test % at paper scale (100k counterfactuals, 10 epochs): "
                  + "; ".join(f"{k} {v}" for k, v in paper.items()) + "."]
    if note:
        lines += ["", note]
    return "\n".join(lines)


def shape_study_markdown(unmodified: dict, modified: dict) -> str:
    """The paper's shape-mechanism study: each counterfactual arm's test accuracy with unmodified and
    modified masks side by side (the biased real arm, mask-free, for reference)."""
    mask = modified["mask"]
    rows = []
    for name in ARM_TITLES:
        before, after = unmodified["arms"].get(name), modified["arms"].get(name)
        if before is None and after is None:
            continue
        change = (f"{after['test_accuracy']['mean'] - before['test_accuracy']['mean']:+.1f}"
                  if before is not None and after is not None else "")
        rows.append([ARM_TITLES[name], pm(before["test_accuracy"]) if before else "",
                     pm(after["test_accuracy"]) if after else ("(no mask)" if name == "real" else ""), change])
    return "\n".join([
        f"### Shape-mechanism study: {modified['family']}",
        "",
        f"Test % (mean ± std over seeds) of the same classifier trained on counterfactuals whose masks were "
        f"used as generated, or modified (noise σ {mask['noise_std']:g}, rotation ±{mask['rotation_deg']:g}°, "
        f"transparency {mask['transparency']:g}); settings as in the two sections below.",
        "",
        table(["training data", "unmodified masks", "modified masks", "change (points)"], rows),
    ])
