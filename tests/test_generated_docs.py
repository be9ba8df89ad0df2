"""Figures about students are rendered, never typed: README.md's and docs/RESULTS.md's generated blocks, the
manifests' `targets` blocks and the evaluation and benchmark sections must say what the committed manifests and
result JSON say now (`python -m experiments.generated write` rewrites the blocks)."""
from __future__ import annotations

import copy
import json

import pytest

from tests.paths import REPO
from experiments import generated
from reporting.targets import assess, targets_block


def test_committed_blocks_match_the_manifests_and_results():
    found = generated.problems(REPO)
    assert not found, ("stale figures; run `python -m experiments.generated write` (and for results: "
                       "sections the evaluation or benchmark that writes them):\n" + "\n".join(found))


def test_every_shipped_manifest_states_its_targets():
    src = generated.Sources.read(REPO)
    for family, version in src.latest.items():
        block = src.manifests[family][version].get("targets")
        assert block is not None, f"{family}/{version} has no targets block"
        assert block["missed"] == [generated.describe(c) for c in block["checks"] if c["met"] is False]
        if block["missed"]:  # a miss says what was tried
            assert block.get("tried"), f"{family}/{version} misses targets and says nothing of what was tried"


def test_replace_blocks_rewrites_only_the_marked_blocks():
    text = ("intro 0.806\n<!-- generated:a -->\nold\n<!-- /generated:a -->\nmiddle\n"
            "<!-- generated:b --><!-- /generated:b -->\n")
    out = generated.replace_blocks(text, {"a": "new A", "b": "new B"}, "x.md")
    assert out == ("intro 0.806\n<!-- generated:a -->\nnew A\n<!-- /generated:a -->\nmiddle\n"
                   "<!-- generated:b -->\nnew B\n<!-- /generated:b -->\n")
    assert generated.blocks_of(out) == {"a": "\nnew A\n", "b": "\nnew B\n"}
    with pytest.raises(generated.GeneratedError, match="lacks the marked block"):
        generated.replace_blocks(text, {"a": "x", "b": "y", "c": "z"}, "x.md")
    with pytest.raises(generated.GeneratedError, match="no renderer knows"):
        generated.replace_blocks(text, {"a": "x"}, "x.md")


def shipped(family: str) -> dict:
    version = (REPO / "models" / family / "LATEST").read_text().strip()
    return json.loads((REPO / "models" / family / version / "manifest.json").read_text())


def test_assessment_says_what_is_missed_and_by_how_much():
    manifest = copy.deepcopy(shipped("colored_mnist"))
    manifest["metrics"]["shape"]["mask_iou"] = 0.80
    manifest["metrics"]["texture"]["l1"] = 0.1
    bench = {"family": "colored_mnist", "version": manifest["version"], "like_for_like": {"1": {"ratio": 4.9}}}
    result = assess(manifest, bench)
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["mask IoU"]["met"] is False and checks["mask IoU"]["short_by"] == pytest.approx(0.05)
    baseline = manifest["metrics"]["texture"]["class_mean_baseline"]["l1"]
    assert checks["texture L1"]["short_by"] == pytest.approx(0.1 - min(0.6 * baseline, 0.08))
    assert checks["background L1"]["met"] is None  # colored backgrounds: baseline ≤ 0.01, no target
    assert checks["fused speed"]["short_by"] == pytest.approx(0.1)
    assert checks["parameters"]["met"] is True
    assert not result["met"] and len(result["missed"]) == 3
    # a benchmark of another version measures nothing about this one
    other = assess(manifest, dict(bench, version="elsewhere"))
    assert next(c for c in other["checks"] if c["name"] == "fused speed")["met"] is None


def test_targets_block_keeps_what_was_tried():
    manifest = copy.deepcopy(shipped("wildlife_mnist"))
    manifest["targets"] = {"tried": ["wider texture students"], "checks": [], "met": True, "missed": []}
    block = targets_block(manifest)
    assert block["tried"] == ["wider texture students"] and block["checks"]


def test_a_superseded_version_keeps_the_speed_it_was_measured_at():
    manifest = copy.deepcopy(shipped("colored_mnist"))
    bench = {"family": "colored_mnist", "version": manifest["version"], "like_for_like": {"1": {"ratio": 5.4}}}
    manifest["targets"] = targets_block(manifest, bench, "models_colored_mnist.json")
    newer = {**bench, "version": "a-newer-one", "like_for_like": {"1": {"ratio": 1.1}}}
    kept = next(c for c in targets_block(manifest, newer)["checks"] if c["name"] == "fused speed")
    assert kept["measured"] == 5.4 and kept["met"] is True and kept["source"] == "models_colored_mnist.json"
    # a figure judged against another target (an older measure) is not kept as evidence for today's
    manifest["targets"]["checks"] = [dict(c, target="≥ 2× at batch 256") if c["name"] == "fused speed" else c
                                     for c in manifest["targets"]["checks"]]
    assert next(c for c in targets_block(manifest, newer)["checks"] if c["name"] == "fused speed")["measured"] is None
    fresh = copy.deepcopy(shipped("colored_mnist"))
    fresh.pop("targets", None)  # never benchmarked: nothing to keep
    assert next(c for c in targets_block(fresh, newer)["checks"] if c["name"] == "fused speed")["measured"] is None


def test_check_covers_the_paper_sections(tmp_path):
    """A paper section (claims, Table 1, ...) edited by hand, or left behind by its JSON, is drift."""
    import shutil

    for folder in ("models", "benchmarks/results", "docs"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    before = [p for p in generated.problems(tmp_path) if "paper-" in p]
    results = tmp_path / "docs" / "RESULTS.md"
    text = results.read_text()
    start = text.index("<!-- results:paper-claims -->")
    results.write_text(text[:start] + text[start:].replace("| yes", "| no", 1))
    after = [p for p in generated.problems(tmp_path) if "paper-" in p]
    assert before == [] and after == ["docs/RESULTS.md results:paper-claims: differs from its JSON; rerun `python -m "
                                      "experiments render` (fidelity, invariance, paper) or the benchmark that writes it"]


def test_cgn_table2_verdict_is_per_family_and_paper_scale_only():
    from experiments import paper_report

    def doc(teacher):
        return {"settings": {paper_report.ORIGINAL_PLUS_CF: {"arms": {"teacher": {
            "runs": [{"seed": 0}], "test_accuracy": {"mean": teacher, "std": 0.0}}}}}}
    _, _, verdict = paper_report.claim_original_plus_cf(
        {"double_colored_mnist": doc(84.5), "wildlife_mnist": doc(81.9)},
        {"double_colored_mnist": doc(88.8), "wildlife_mnist": None})
    assert verdict == ("double-coloured: yes (within 2 points of 89 at paper scale); "
                       "wildlife: not run at paper scale (81.9 vs 85.7 at default scale)")
    assert paper_report.students_of({"a": {"sources": {"student": "student:wildlife_mnist/v1", "teacher": "teacher:x"}}},
                                    None) == "`wildlife_mnist/v1`"
