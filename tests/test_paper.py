"""The SKDCGN paper's experiments, tiny: each subcommand of experiments/evaluate.py end to end on the real teacher and
untrained students (a few dozen images, one epoch, a few GAN steps), checking the plumbing, not the numbers;
run reuse across experiments; the §4.2 baseline's losses, resume and placement of the RESULTS.md sections."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.compose import UNMODIFIED
from tests.model_helpers import FAMILY
from tests.paths import SHARED, needs_shared
from experiments import baseline_cgn, evaluate, paper, paper_report
from reporting import report
from experiments.classifier import SmallCNN


def write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def block(config, mask, sources, runs, training_set=None):
    out = {"family": FAMILY, "mask": {"setting": "x", **mask}, "config": config, "sources": sources,
           "arms": {arm: {"runs": r} for arm, r in runs.items()}}
    if training_set:
        out["training_set"] = training_set
    return out


def test_find_runs_matches_the_whole_protocol(tmp_path):
    config = {"images": 20, "per_shape": 10, "seeds": [0], "train": {"epochs": 1}}
    unmodified = {"transparency": 1.0, "rotation_deg": 0.0, "noise_std": 0.0}
    run = {"seed": 0, "train_accuracy": 90.0, "test_accuracy": 80.0}
    write(tmp_path / "a.json", block(config, unmodified, {"teacher": "teacher:x"}, {"teacher": [run], "real": [run]}))
    write(tmp_path / "b.json", {"nested": [block(config, {**unmodified, "transparency": 0.75}, {"student": "student:x/v2"},
                                                 {"student": [{**run, "seed": 1}]})]})
    write(tmp_path / "c.json", block(config, unmodified, {"teacher": "teacher:x"}, {"teacher": [{**run, "seed": 5}]},
                                     training_set=paper.ORIGINAL_PLUS_CF))
    found = paper.find_runs(tmp_path, FAMILY, config, UNMODIFIED, "teacher:x")
    assert set(found) == {0} and found[0]["reused_from"] == "a.json"
    assert paper.find_runs(tmp_path, FAMILY, config, paper.TRANSPARENCY, "student:x/v2")[1]["test_accuracy"] == 80.0
    assert paper.find_runs(tmp_path, FAMILY, config, paper.TRANSPARENCY, "student:x/v3") == {}  # another version
    assert paper.find_runs(tmp_path, FAMILY, {**config, "images": 40}, UNMODIFIED, "teacher:x") == {}
    assert set(paper.find_runs(tmp_path, FAMILY, config, UNMODIFIED, "teacher:x",
                               training_set=paper.ORIGINAL_PLUS_CF)) == {5}
    assert set(paper.find_runs(tmp_path, FAMILY, {**config, "images": 999}, UNMODIFIED, "real")) == {0}


def test_baseline_losses():
    mask = torch.tensor([0.0, 1.0, 0.5])
    assert baseline_cgn.binary_entropy(mask[:2]) < 1e-2 and baseline_cgn.binary_entropy(mask[2:]) == pytest.approx(1.0)
    features = [torch.rand(2, 4, 3, 3), torch.rand(2, 6, 2, 2)]
    assert float(baseline_cgn.style_loss(features, features, (0.05, 0.05))) == 0.0
    assert float(baseline_cgn.style_loss([f * 2 for f in features], features, (0.05, 0.05))) == pytest.approx(
        0.05 * 9 * 2, rel=1e-4)  # Grams scale by 4: (4 − 1)² relative to 1, per layer
    style = baseline_cgn.ChannelwiseStyleFeatures(SmallCNN(in_channels=1))
    out = style(torch.rand(2, 3, 32, 32))
    assert [tuple(o.shape) for o in out] == [(2, 96, 16, 16), (2, 192, 8, 8)]
    style.train()
    assert not style.training and not any(p.requires_grad for p in style.parameters())


def test_baseline_training_resumes(tmp_path):
    real = np.random.default_rng(0).uniform(-1, 1, (16, 3, 32, 32)).astype(np.float32)
    labels = np.arange(16) % 10
    style = baseline_cgn.ChannelwiseStyleFeatures(SmallCNN(in_channels=1))
    small = {"channels": [16, 8, 8, 8], "embed_dim": 8}
    config = baseline_cgn.BaselineConfig(steps=2, batch_size=4, ndf=16, log_every=1, student={
        **baseline_cgn.BaselineConfig().student, **small})
    first = baseline_cgn.train_baseline(config, real, labels, style, tmp_path, log=lambda _: None)
    assert first["steps_done"] == 2 and first["finished"] and len(first["history"]) == 2
    longer = baseline_cgn.BaselineConfig(**{**config.__dict__, "steps": 3})
    second = baseline_cgn.train_baseline(longer, real, labels, style, tmp_path, log=lambda _: None)
    assert second["steps_done"] == 3 and [h["step"] for h in second["history"]] == [1, 2, 3]
    with pytest.raises(ValueError, match="other settings"):
        baseline_cgn.train_baseline(baseline_cgn.BaselineConfig(**{**longer.__dict__, "lr": 1e-3}), real, labels, style,
                                    tmp_path, log=lambda _: None)
    generators = baseline_cgn.load_generators(tmp_path)
    source = baseline_cgn.baseline_source(generators, "baseline:test")
    mask = source.run("shape", np.zeros((3, 32), np.float32), np.array([0, 1, 2]))
    assert mask.shape == (3, 1, 32, 32) and 0 <= mask.min() and mask.max() <= 1


def test_sections_are_placed_once(tmp_path):
    page = tmp_path / "RESULTS.md"
    page.write_text("# Results\n\nintro\n\n<!-- generated:summary -->\nS\n<!-- /generated:summary -->\n\n## Fidelity\n\n"
                    "## Speed: teacher vs students (MNIST)\n\nfast\n")
    paper_report.render_all(tmp_path / "none", page)
    paper_report.render_all(tmp_path / "none", page)
    text = page.read_text()
    for name in paper_report.SECTIONS:
        assert text.count(f"<!-- results:{name} -->") == 1
    assert text.index("### Paper claims") < text.index("<!-- generated:summary -->")
    assert text.index(paper_report.CHAPTER) < text.index("### Table 1") < text.index("## Speed")
    assert text.count(paper_report.CHAPTER) == 1 and "Not run yet" in text


@pytest.fixture
def cli(tmp_path, tiny_models, restore_torch_threads):
    results, page = tmp_path / "results", tmp_path / "docs" / "RESULTS.md"
    common = ["--family", FAMILY, "--models-dir", str(tiny_models), "--results-dir", str(results), "--threads", "1",
              "--results-md", str(page), "--data-dir", str(SHARED / "data"),
              "--teacher-path", str(SHARED / "teachers" / "cgn_mnist"), "--images", "40", "--epochs", "1",
              "--seeds", "0", "--detector-images", "30"]
    return results, page, lambda *args: evaluate.main([*args, *common])


@needs_shared
def test_tiny_table1_then_transparency_reuses_its_runs(cli):
    results, page, run = cli
    assert run("table1") == 0
    doc = json.loads((results / f"paper_table1_{FAMILY}.json").read_text())
    assert set(doc["columns"]) == set(paper.COLUMNS)
    for column in doc["columns"].values():
        for part in ("detector", "digit"):
            assert set(column[part]["arms"]) == {"teacher", "student"}
            assert 0 <= column[part]["arms"]["student"]["test_accuracy"]["mean"] <= 100
    assert doc["columns"]["noise"]["digit"]["mask"]["noise_std"] == 1.0
    assert doc["columns"]["rotation"]["detector"]["config"]["images_per_class"] == 30
    assert (page.parent / doc["grid"]).is_file()
    assert run("transparency") == 0
    transparency = json.loads((results / f"paper_transparency_{FAMILY}.json").read_text())
    for setting in ("unmodified", "transparency"):
        for arm in ("teacher", "student"):
            assert transparency["settings"][setting]["arms"][arm]["runs"][0]["reused_from"] == f"paper_table1_{FAMILY}.json"
    text = page.read_text()
    assert "### Table 1 reproduced" in text and "### Transparency" in text and "### Paper claims" in text
    assert "| paper (SKDCGN Table 1): test % | modified CGN | – | 14.96 | 13.51 | 58.86 |" in text
    assert "Not run (CPU budget): wildlife, default scale; double-coloured, paper scale" in text


@needs_shared
def test_tiny_original_plus_counterfactuals(cli):
    results, page, run = cli
    assert run("original-plus-cf") == 0
    doc = json.loads((results / f"paper_original_plus_cf_{FAMILY}.json").read_text())
    plus, only = doc["settings"][paper.ORIGINAL_PLUS_CF], doc["settings"][paper.CF_ONLY]
    assert plus["training_set"] == paper.ORIGINAL_PLUS_CF and plus["real_images"] == 5000
    assert only["real_images"] == 0 and set(plus["arms"]) == set(only["arms"]) == {"teacher", "student"}
    assert doc["settings"]["real"]["arms"]["real"]["runs"][0]["seed"] == 0
    assert "### Original + counterfactuals" in page.read_text()


@needs_shared
def test_tiny_baseline(cli, tmp_path):
    results, page, run = cli
    assert run("baseline", "--gan-steps", "3", "--gan-batch", "8", "--recogniser-epochs", "0", "--pairs", "50",
               "--work-dir", str(tmp_path / "gan")) == 0
    doc = json.loads((results / f"paper_baseline_{FAMILY}.json").read_text())
    assert doc["training"]["steps_done"] == 3 and doc["sources"]["baseline"] == "baseline:tinygan-cgn/3-steps"
    for arm in ("teacher", "student", "baseline"):
        assert 0 <= doc["checks"][arm]["mask_recognised"] <= 100
        assert set(doc["digit"]["arms"][arm]) >= {"runs", "test_accuracy"}
        assert doc["detector"]["arms"][arm]["runs"][0]["seed"] == 0
    assert (page.parent / doc["grid"]).is_file()
    # Evaluating the saved generators again reuses every run.
    assert run("baseline", "--skip-training", "--recogniser-epochs", "0", "--pairs", "50",
               "--work-dir", str(tmp_path / "gan")) == 0
    again = json.loads((results / f"paper_baseline_{FAMILY}.json").read_text())
    assert again["digit"]["arms"]["baseline"]["runs"][0]["reused_from"] == f"paper_baseline_{FAMILY}.json"
    text = page.read_text()
    assert "### Baseline without distillation" in text and "§4.2: distillation beats" in text
    claims = text.split("<!-- results:paper-claims -->")[1].split("<!-- /results:paper-claims -->")[0]
    assert claims.count("\n| ") >= 6 and report.RESULTS_HEADER.splitlines()[0] in text
