"""Evaluation: fidelity plumbing and label checks with known answers, counterfactual draws, students as a
Source through core.runtime.ModelRuntime, and a tiny end-to-end invariant-classifier run on the real teacher
and exported (untrained) students."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.noise import NoiseSpec
from core.runtime import ModelRuntime
from tests.model_helpers import FAMILY
from tests.paths import SHARED, needs_shared
from experiments import evaluate
from training.data import DIGIT_PALETTE, PALETTE
from reporting import report
from experiments.classifier import SmallCNN
from core.compose import PAPER_STUDY
from experiments.counterfactuals import counterfactual_dataset, draw
from experiments.fidelity import class_means, evaluate_fidelity, label_palettes, nearest_colour
from experiments.invariance import real_splits
from experiments.sources import Source, student_source


def fake_source(offset: float = 0.0) -> Source:
    """A deterministic numpy 'generator': mask from z's sign, colours from the labels' palettes (+ offset)."""

    def run(mechanism, z, y):
        if mechanism == "shape":
            return np.broadcast_to((z[:, :1, None, None] > 0).astype(np.float32), (len(z), 1, 32, 32)).copy()
        palette = DIGIT_PALETTE if mechanism == "texture" else PALETTE
        colours = np.asarray(palette)[y] * 2 - 1 + offset
        return np.broadcast_to(colours[:, :, None, None], (len(z), 3, 32, 32)).astype(np.float32).copy()

    return Source("fake", NoiseSpec(dim=32), 32, True, run)


def test_nearest_colour_recovers_palette_indices():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 50)
    jitter = rng.normal(0, 0.01, (50, 3))
    images = (np.asarray(DIGIT_PALETTE)[labels] + jitter) * 2 - 1
    images = np.broadcast_to(images[:, :, None, None], (50, 3, 8, 8))
    assert (nearest_colour(images, np.asarray(DIGIT_PALETTE)) == labels).all()
    # Half darkgreen (0, 100, 0)/255, half black: the mean (0, 50, 0)/255 is still nearest to darkgreen.
    half = np.full((1, 3, 2, 2), -1.0)
    half[0, 1, 0] = 100 / 255 * 2 - 1
    assert nearest_colour(half, np.asarray(PALETTE))[0] == 0


def test_class_means():
    outputs = np.arange(6, dtype=np.float32).reshape(3, 2)
    means = class_means(outputs, np.array([0, 0, 2]), n_classes=3)
    np.testing.assert_allclose(means, [[1, 2], [0, 0], [4, 5]])


def test_draws_share_masks_within_groups_and_are_chunk_invariant():
    source = fake_source()
    draws = draw(source, seed=3, start=0, count=20, per_shape=10)
    z_shape = draws.z("shape")
    assert (z_shape[:10] == z_shape[0]).all() and (z_shape[10:] == z_shape[10]).all()
    assert len(set(draws.labels["shape"][:10])) == 1
    assert not (draws.z("texture")[1:10] == draws.z("texture")[0]).all()
    whole = counterfactual_dataset(source, 40, seed=3, per_shape=10, modifiers=PAPER_STUDY)
    chunked = counterfactual_dataset(source, 40, seed=3, per_shape=10, modifiers=PAPER_STUDY, chunk=20)
    np.testing.assert_array_equal(whole.images, chunked.images)
    np.testing.assert_array_equal(whole.labels[:20], draws.labels["shape"])
    np.testing.assert_array_equal(whole.fg_index[:20], draws.labels["texture"])


def test_student_source_runs_a_model_runtime_in_batches(tiny_models):
    runtime = ModelRuntime.from_repository(tiny_models, FAMILY, providers=["CPUExecutionProvider"])
    source = student_source(runtime, batch=4)
    assert (source.name, source.noise, source.image_size, source.texture_shuffle) == (
        f"student:{FAMILY}/tiny", NoiseSpec(dim=32), 32, True)
    rng = np.random.default_rng(0)
    z, y = rng.standard_normal((10, 32)).astype(np.float32), rng.integers(0, 10, 10)
    batched = source.run("texture", z, y)  # three calls: 4 + 4 + 2
    assert batched.shape == (10, 3, 32, 32)
    np.testing.assert_allclose(batched, runtime.run("texture", z, y), atol=1e-5)


def untrained_reader() -> tuple:
    """A digit reader in the shape digit_recogniser returns, untrained."""
    return SmallCNN(in_channels=1).eval(), {"trained_on": "nothing (untrained)", "epochs": 0, "accuracy_on_t10k[5000:]": 0.0}


def test_fidelity_known_answers_with_fake_sources():
    teacher = fake_source()
    reader = untrained_reader()  # the plumbing, not the recogniser, is under test
    identical = evaluate_fidelity(teacher, fake_source(), FAMILY, pairs=40, baseline_pairs=40, recogniser=reader)
    assert identical["mechanisms"]["shape"]["student"] == {"mask_iou": 1.0, "l1": 0.0}
    assert identical["mechanisms"]["texture"]["student"]["psnr"] == 100.0  # exact match, capped
    assert identical["composite"] == {"l1": 0.0, "psnr": 100.0, "mask_iou": 1.0}
    assert identical["label_match"]["texture"] == {"teacher": 100.0, "student": 100.0}
    assert identical["label_match"]["background"] == {"teacher": 100.0, "student": 100.0}
    shifted = evaluate_fidelity(teacher, fake_source(offset=0.2), FAMILY, pairs=40, baseline_pairs=40,
                                recogniser=reader)
    # A constant 0.2 offset in [-1, 1]: L1 0.2 and PSNR 10·log10(2² / 0.2²) = 20 dB.
    assert shifted["mechanisms"]["background"]["student"]["l1"] == pytest.approx(0.2, abs=1e-6)
    assert shifted["mechanisms"]["background"]["student"]["psnr"] == pytest.approx(20.0, abs=1e-4)
    assert 0 <= shifted["recognisability"]["student"] <= 100
    assert "texture wears its label" in report.fidelity_markdown(FAMILY, "fake", identical)


def test_colored_fidelity_has_no_label_colours_and_says_so():
    """colored_mnist has no label-colour recipe here: fidelity skips the palette check, and the page shows
    only the digit check rather than inventing colours."""
    reader = untrained_reader()
    result = evaluate_fidelity(fake_source(), fake_source(), "colored_mnist", pairs=20, baseline_pairs=20,
                               recogniser=reader)
    assert "label_match" not in result and result["composite"]["mask_iou"] == 1.0
    page = report.fidelity_markdown("colored_mnist", "fake", result)
    assert "mask shows its shape label" in page and "wears its label" not in page
    with pytest.raises(ValueError, match="no label colours"):
        label_palettes("mnist_of_unknown_kind")


@needs_shared
def test_real_splits_are_biased_train_and_random_test():
    train, test = real_splits(FAMILY, SHARED / "data")
    assert len(train.labels) == len(test.labels) == 5000
    assert (train.fg_index == train.labels).all() and (train.bg_index == train.labels).all()
    assert (test.fg_index == test.labels).mean() < 0.2  # colours drawn independently of the digit


def test_update_section_replaces_only_its_own_block(tmp_path):
    path = tmp_path / "RESULTS.md"
    report.update_section(path, "a", "first A")
    report.update_section(path, "b", "only B")
    report.update_section(path, "a", "second A")
    text = path.read_text()
    assert "second A" in text and "first A" not in text and "only B" in text
    assert text.index("second A") < text.index("only B")


@needs_shared
def test_tiny_invariance_and_fidelity_runs_write_results(tmp_path, tiny_models, restore_torch_threads):
    models = tiny_models
    common = ["--family", FAMILY, "--models-dir", str(models), "--results-dir", str(tmp_path / "results"), "--threads", "1",
              "--results-md", str(tmp_path / "docs" / "RESULTS.md"), "--data-dir", str(SHARED / "data"),
              "--teacher-path", str(SHARED / "teachers" / "cgn_mnist")]
    # The real arm is the same fit_and_score on 5,000 digits: left out to keep the suite fast. Arms trained in
    # separate runs with identical settings merge into one result.
    quick = ["--images", "40", "--epochs", "1", "--seeds", "0", "--mask", "unmodified"]
    assert evaluate.main(["invariance", *common, *quick, "--arms", "teacher"]) == 0
    assert evaluate.main(["invariance", *common, *quick, "--arms", "student", "--note", "tiny students"]) == 0
    result = json.loads((tmp_path / "results" / f"invariance_{FAMILY}_unmodified.json").read_text())
    assert set(result["arms"]) == {"teacher", "student"} and result["notes"]["student"] == "tiny students"
    for arm in result["arms"].values():
        assert 0 <= arm["test_accuracy"]["mean"] <= 100 and len(arm["runs"]) == 1
    assert result["config"]["images"] == 40 and result["test_images"] == 5000
    (tmp_path / "docs").mkdir(exist_ok=True)
    assert evaluate.main(["fidelity", *common, "--pairs", "30", "--baseline-pairs", "100",
                          "--recogniser-epochs", "1"]) == 0
    fidelity = json.loads((tmp_path / "results" / f"fidelity_{FAMILY}.json").read_text())
    assert fidelity["version"] == "tiny" and 0 <= fidelity["mechanisms"]["shape"]["student"]["mask_iou"] <= 1
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert f"<!-- results:invariance-{FAMILY}-unmodified -->" in text and f"<!-- results:fidelity-{FAMILY} -->" in text
    assert "tiny students" in text and "teacher counterfactuals" in text
    # With both mask settings on record, the shape study puts them side by side.
    modified = ["--images", "40", "--epochs", "1", "--seeds", "0", "--mask", "modified", "--arms", "student"]
    assert evaluate.main(["invariance", *common, *modified]) == 0
    study = (tmp_path / "docs" / "RESULTS.md").read_text().split(f"<!-- results:invariance-{FAMILY}-shape-study -->")[1]
    assert "| student counterfactuals (ONNX) |" in study and "| teacher counterfactuals |" in study
    assert "transparency 0.75" in study
