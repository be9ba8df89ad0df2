"""A shipped version beside the same version re-made from its manifest's recipe: does the recipe reproduce it?

Why this is a fair comparison: the recipe fixes the bank (seed, size, held-out pairs) and the batch order, so both
versions were scored on the same held-out pairs by the same code, and their students can be run on the same
inputs. Checkpoints are not kept in git; this is the evidence that the recipe alone re-makes a version.

    python -m training.distill --teacher wildlife --teacher-path ../shared/teachers/cgn_mnist \
        --recipe models/wildlife_mnist/v4 --out /tmp/remake/wildlife_mnist/v4
    python -m training.evaluate remake --family wildlife_mnist --version v4 --remade /tmp/remake
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.noise import draw_z
from core.runtime import ModelRuntime
from core.vocabulary import MECHANISMS
from reporting import report
from training.recipe import load_recipe

METRICS = (("shape", "mask_iou", "mask IoU"), ("shape", "l1", "mask L1"), ("texture", "l1", "texture L1"),
           ("background", "l1", "background L1"))
ONNX_FILES = tuple(f"{m}.onnx" for m in MECHANISMS) + ("fused.onnx",)


class NotARemake(ValueError):
    """The two versions were not made by the same recipe (or are of different families)."""


def fixed_inputs(runtime: ModelRuntime, batch: int, seed: int = 0) -> tuple[dict, dict]:
    """Per mechanism, the same noise (drawn as the contract draws it: the family's distribution and truncation)
    and labels for any version of the family."""
    rng = np.random.default_rng(seed)
    labels = runtime.manifest["labels"]["count"]
    z = {m: np.stack([draw_z(rng, runtime.noise) for _ in range(batch)]) for m in MECHANISMS}
    y = {m: rng.integers(0, labels, batch).astype(np.int64) for m in MECHANISMS}
    return z, y


def compare(shipped_dir: str | Path, remade_dir: str | Path, batch: int = 256) -> dict:
    """Metrics, outputs on fixed inputs, ONNX checksums and training time of both versions, side by side."""
    shipped, remade = ModelRuntime(shipped_dir), ModelRuntime(remade_dir)
    # Read as recipes, not compared as JSON: a manifest written before a field existed (the student head) means
    # that field's old default, which the re-make writes out.
    if shipped.family != remade.family or load_recipe(shipped_dir) != load_recipe(remade_dir):
        raise NotARemake(f"{remade_dir} was not made by the recipe of {shipped.name}: compare a folder that "
                         f"`training.distill --recipe {shipped_dir}` wrote")
    metrics = []
    for mechanism, key, label in METRICS:
        before = shipped.manifest["metrics"].get(mechanism, {}).get(key)
        after = remade.manifest["metrics"].get(mechanism, {}).get(key)
        if before is not None and after is not None:
            metrics.append({"metric": label, "shipped": before, "remade": after, "difference": after - before})
    z, y = fixed_inputs(shipped, batch)
    ours, theirs = shipped.run_all(z, y), remade.run_all(z, y)
    gaps = {m: np.abs(ours[m] - theirs[m]) for m in MECHANISMS}
    outputs = {m: {"max_abs_difference": float(gap.max()), "mean_abs_difference": float(gap.mean())}
               for m, gap in gaps.items()}
    return {
        "family": shipped.family, "version": shipped.version, "recipe": shipped.manifest["recipe"]["name"],
        "shipped": str(shipped.directory), "remade": str(remade.directory),
        "heldout_pairs": shipped.manifest["metrics"].get("heldout_pairs"), "metrics": metrics,
        "outputs": {"batch": batch, "per_mechanism": outputs},
        "identical_onnx": {name: shipped.manifest["files"].get(name) == remade.manifest["files"].get(name)
                           for name in ONNX_FILES if name in shipped.manifest["files"]},
        "training_seconds": {"shipped": shipped.manifest["training"].get("seconds"),
                             "remade": remade.manifest["training"].get("seconds")},
    }


def markdown(result: dict) -> str:
    rows = [[row["metric"], f"{row['shipped']:.4f}", f"{row['remade']:.4f}", f"{row['difference']:+.4f}"]
            for row in result["metrics"]]
    # In a fixed order: the result JSON is written with sorted keys, and the section must render the same from it.
    per_mechanism = result["outputs"]["per_mechanism"]
    outputs = [[m, f"{per_mechanism[m]['max_abs_difference']:.2g}", f"{per_mechanism[m]['mean_abs_difference']:.2g}"]
               for m in MECHANISMS if m in per_mechanism]
    identical = [name for name, same in result["identical_onnx"].items() if same]
    minutes = {who: sum(result["training_seconds"][who].values()) / 60 for who in ("shipped", "remade")
               if result["training_seconds"].get(who)}
    why_not = "" if len(identical) == len(result["identical_onnx"]) else (
        " (same batches, but another CPU or thread count adds floating-point sums in another order, and adversarial "
        "training carries those differences into other weights: the held-out metrics are what a re-make must reach)")
    return "\n".join([
        f"### {result['family']}/{result['version']} re-made from its manifest's recipe (`{result['recipe']}`)",
        "",
        f"`python -m training.distill --recipe models/{result['family']}/{result['version']}` in a fresh work "
        f"folder, no checkpoint carried over; both scored on the same {result['heldout_pairs']:,} held-out pairs.",
        "",
        report.table(["metric", "shipped", "re-made", "difference"], rows),
        "",
        f"Outputs on the same {result['outputs']['batch']} noise and label draws:",
        "",
        report.table(["mechanism", "max abs difference", "mean abs difference"], outputs),
        "",
        f"Byte-identical ONNX files: {', '.join(identical) or 'none'}{why_not}. Training time (all mechanisms, CPU): "
        + ", ".join(f"{who} {value:.0f} min" for who, value in minutes.items()) + ".",
    ])


def section_name(result: dict) -> str:
    return f"remake-{result['family']}-{result['version']}"
