"""Students, the four loss terms, the sample bank and `training/distill.py` end to end on CPU."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from core.manifest import load_manifest, verify_files
from training import distill, export, losses, students
from training.bank import Bank
from training.students import HEADS, ProjectionDiscriminator, StudentConfig, TinyGenerator, count_parameters
from tests.paths import TEACHERS_DIR, needs_shared

TEACHER_PARAMETERS = 659_992


def test_hinge_losses_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> 0.8333; relu(1 + fake) = [0, 1, 2] -> 1.0
    assert losses.hinge_discriminator(real, fake).item() == pytest.approx(2.5 / 3 + 1.0)
    assert losses.hinge_generator(fake).item() == pytest.approx(1 / 3)


def test_pixel_l1_known_value():
    assert losses.pixel_l1(torch.zeros(2, 3), torch.full((2, 3), 0.5)).item() == pytest.approx(0.5)


def test_feature_l1_weights_each_layer():
    student = [torch.zeros(2, 4), torch.zeros(2, 4)]
    teacher = [torch.ones(2, 4), torch.full((2, 4), 2.0)]
    assert losses.feature_l1(student, teacher, [0.5, 0.25]).item() == pytest.approx(0.5 * 1 + 0.25 * 2)
    with pytest.raises(ValueError, match="one weight per feature layer"):
        losses.feature_l1(student, teacher, [1.0])


def test_kl_is_zero_for_identical_and_positive_otherwise():
    teacher = torch.rand(4, 1, 8, 8)
    assert losses.bernoulli_kl(teacher, teacher, (0.0, 1.0)).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.bernoulli_kl(teacher.flip(0), teacher, (0.0, 1.0)).item() > 0
    image = torch.rand(2, 3, 4, 4) * 2 - 1
    assert losses.bernoulli_kl(image, image, (-1.0, 1.0)).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.bernoulli_kl(-image, image, (-1.0, 1.0)).item() > 0


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
@pytest.mark.parametrize("mechanism", list(HEADS))
def test_student_shapes_and_ranges(mechanism, upsample):
    student = TinyGenerator(StudentConfig(channels=[128, 64, 32, 16], upsample=upsample), mechanism).eval()
    out = student(torch.randn(5, 32) * 3, torch.randint(0, 10, (5,)))
    channels = HEADS[mechanism][1]
    assert out.shape == (5, channels, 32, 32)
    low, high = (0.0, 1.0) if mechanism == "shape" else (-1.0, 1.0)
    assert out.min() >= low and out.max() <= high


def test_students_are_lighter_than_the_teacher():
    config = StudentConfig(channels=[128, 64, 32, 16])
    total = sum(count_parameters(TinyGenerator(config, m)) for m in HEADS)
    assert total < TEACHER_PARAMETERS


def test_bad_student_config_is_explained():
    with pytest.raises(ValueError, match="channel widths"):
        TinyGenerator(StudentConfig(channels=[64, 32]), "shape")
    with pytest.raises(ValueError, match="upsample must be one of .*nearest.*bilinear"):
        TinyGenerator(StudentConfig(channels=[64, 32, 16, 8], upsample="bicubic"), "shape")


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
def test_shortcut_before_upsampling_is_the_same_function(upsample):
    """The residual shortcut runs its 1×1 conv before upsampling (cheaper); v1 checkpoints trained with the
    opposite order must give the same outputs."""
    torch.manual_seed(0)
    block = students.ResBlockUp(16, 8, 4, upsample)
    x = torch.randn(3, 16, 8, 8)
    after = block.shortcut(students.upsample2x(x, upsample))
    assert torch.allclose(students.upsample2x(block.shortcut(x), upsample), after, atol=1e-6)


def test_discriminator_returns_five_features():
    disc = ProjectionDiscriminator(3, 10)
    score, features = disc(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert score.shape == (2,) and len(features) == 5 and features[-1].shape[-1] == 1


def test_student_overfits_a_fixed_batch():
    torch.manual_seed(0)
    student = TinyGenerator(StudentConfig(channels=[32, 16, 16, 8]), "texture")
    z, y = torch.randn(8, 32), torch.randint(0, 10, (8,))
    # A smooth target, like a teacher's texture: random 4×4 colours upsampled to 32×32.
    target = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4) * 1.6 - 0.8, size=32, mode="bilinear")
    optimiser = torch.optim.Adam(student.parameters(), lr=5e-3)
    history = []
    for _ in range(100):
        loss = losses.pixel_l1(student(z, y), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    assert history[-1] < 0.4 * history[0]


def test_parity_check_catches_a_frozen_batch_axis(tmp_path):
    class FrozenBatch(torch.nn.Module):
        """view(len(z), ...) traces the batch size as a constant: the exported graph only takes batch 16."""

        def forward(self, z, y):
            return torch.sigmoid(z.view(len(z), 1, 4, 8) + y.view(len(y), 1, 1, 1).float())

    module = FrozenBatch()
    feeds = {"z": np.zeros((export.PARITY_BATCH, 32), np.float32), "y": np.zeros(export.PARITY_BATCH, np.int64)}
    path = tmp_path / "frozen.onnx"
    export._export(module, tuple(torch.from_numpy(v) for v in feeds.values()), ["z", "y"], ["mask"], path)
    with pytest.raises(export.ParityError, match=f"fails at batch {export.PARITY_SECOND_BATCH}"):
        export._parity(path, module, feeds, ["mask"])


def tiny_args(tmp_path, out, *extra):
    return [
        "--teacher", "double_colored", "--teacher-path", str(TEACHERS_DIR), "--out", str(out),
        "--bank-size", "96", "--heldout", "32", "--chunk-size", "48", "--bank-dir", str(tmp_path / "bank"),
        "--work-dir", str(tmp_path / "work"), "--batch-size", "16", "--channels", "32,16,16,8",
        "--checkpoint-every", "2", "--log-every", "1", *extra,
    ]


@needs_shared
def test_distill_end_to_end_exports_a_checked_model(tmp_path):
    import onnxruntime as ort

    out = tmp_path / "models" / "double_colored_mnist" / "t1"
    assert distill.main(tiny_args(tmp_path, out, "--steps", "4", "--promote")) == 0
    manifest = load_manifest(out)
    verify_files(out, manifest)
    assert (out.parent / "LATEST").read_text().strip() == "t1"
    assert manifest["family"] == "double_colored_mnist" and manifest["noise"]["dim"] == 32
    assert manifest["teacher"]["sha256"].startswith("7aa06c90")
    assert set(manifest["mechanisms"]) == set(HEADS) and manifest["fused"]["file"] == "fused.onnx"
    for block in list(manifest["mechanisms"].values()) + [manifest["fused"]]:
        assert block["parity_max_abs_diff"] <= export.PARITY_TOLERANCE
    assert manifest["metrics"]["heldout_pairs"] == 32
    assert 0 <= manifest["metrics"]["shape"]["mask_iou"] <= 1
    assert "class_mean_baseline" in manifest["metrics"]["texture"]
    for name in ("losses.csv", "loss_curves.png", "teacher_vs_student.png"):
        assert (out / name).is_file()

    # The fused graph agrees with the per-mechanism graphs on a batch larger than one.
    rng = np.random.default_rng(1)
    z = rng.standard_normal((5, 32)).astype(np.float32)
    y = rng.integers(0, 10, 5).astype(np.int64)
    fused = ort.InferenceSession(str(out / "fused.onnx"), providers=["CPUExecutionProvider"])
    feeds = {f"{part}_{m}": value for m in HEADS for part, value in (("z", z), ("y", y))}
    mask, texture, background = fused.run(["mask", "texture", "background"], feeds)
    single = ort.InferenceSession(str(out / "shape.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(single.run(["mask"], {"z": z, "y": y})[0], mask, atol=1e-6)
    assert mask.shape == (5, 1, 32, 32) and texture.shape == background.shape == (5, 3, 32, 32)

    # The bank pairs each z with the teacher's output for exactly that z.
    bank = Bank(tmp_path / "bank", "heldout")
    data = bank.load(["z", "y", "mask"])
    from training.teachers import load_teacher

    teacher = load_teacher("double_colored", TEACHERS_DIR)
    with torch.no_grad():
        expected = teacher.shape(torch.from_numpy(data["z"][:4]), torch.from_numpy(data["y"][:4])).numpy()
    np.testing.assert_allclose(data["mask"][:4], expected, atol=1e-6)
    assert bank.spec["teacher_sha256"] == manifest["teacher"]["sha256"]


@needs_shared
def test_distill_resumes_from_checkpoint(tmp_path):
    assert distill.main(tiny_args(tmp_path, tmp_path / "a" / "v1", "--steps", "2", "--mechanisms", "shape")) == 0
    first = torch.load(tmp_path / "work" / "shape.pt", weights_only=False)
    assert first["step"] == 2
    # Without --resume an earlier run's checkpoints are not silently reused.
    assert distill.main(tiny_args(tmp_path, tmp_path / "a" / "v2", "--steps", "4", "--mechanisms", "shape")) == 2
    assert distill.main(tiny_args(tmp_path, tmp_path / "a" / "v2", "--steps", "4", "--mechanisms", "shape",
                                  "--resume")) == 0
    resumed = torch.load(tmp_path / "work" / "shape.pt", weights_only=False)
    assert resumed["step"] == 4
    with open(tmp_path / "a" / "v2" / "losses.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == [0, 1, 2, 3]  # steps 0-1 from the first run, 2-3 after the resume


@needs_shared
def test_bad_inputs_give_clear_messages_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "models" / "double_colored_mnist" / "v1"
    args = tiny_args(tmp_path, out, "--steps", "1", "--mechanisms", "texture")
    assert distill.main(["--teacher", "mnist_rainbow", *args[2:]]) == 2
    assert "unknown teacher 'mnist_rainbow'" in capsys.readouterr().err

    impostor = tmp_path / "double_colored.pth"
    shutil.copy(TEACHERS_DIR / "wildlife.pth", impostor)
    wrong = list(args)
    wrong[wrong.index("--teacher-path") + 1] = str(impostor)
    assert distill.main(wrong) == 2
    assert "sha256" in capsys.readouterr().err

    out.mkdir(parents=True)
    assert distill.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    out.rmdir()


@needs_shared
def test_failed_parity_check_refuses_to_finish(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)
    out = tmp_path / "models" / "double_colored_mnist" / "v1"
    assert distill.main(tiny_args(tmp_path, out, "--steps", "1", "--mechanisms", "shape", "--promote")) == 2
    assert "differs from PyTorch" in capsys.readouterr().err
    assert not out.exists() and not (out.parent / "LATEST").exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())
