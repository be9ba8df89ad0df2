"""Students, the four loss terms, the sample bank, recipes and `training/distill.py` end to end on CPU."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from core.manifest import load_manifest, verify_files
from training import distill, evaluate, export, losses, students
from training.evaluation import remake
from training.bank import Bank
from training.package import student_configs
from training.recipe import (
    DEFAULT_PRESET, Recipe, RecipeChanges, RecipeError, StudentPreset, load_preset, load_recipe, preset_names,
)
from training.students import HEADS, ProjectionDiscriminator, StudentConfig, TinyGenerator, count_parameters
from training.teachers.loading import MNIST_STUDENTS
from tests.paths import REPO, TEACHERS_DIR, needs_shared

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


def test_soft_iou_loss_is_the_binarised_metric_made_differentiable():
    teacher = (torch.rand(3, 1, 8, 8) > 0.5).float() * 0.4 + 0.3  # 0.3 / 0.7: binarised at 0.5 to 0 / 1
    binary = (teacher > 0.5).float()
    assert losses.soft_iou_loss(binary, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.soft_iou_loss(1 - binary, teacher).item() == pytest.approx(1.0, abs=1e-5)
    half = torch.zeros(1, 1, 2, 2)
    half[..., 0, :] = 1.0  # two of the four pixels, against a full mask: IoU 0.5
    assert losses.soft_iou_loss(half, torch.ones(1, 1, 2, 2)).item() == pytest.approx(0.5, abs=1e-5)
    student = torch.full((3, 1, 8, 8), 0.5, requires_grad=True)
    losses.soft_iou_loss(student, teacher).backward()
    assert (student.grad[binary.bool()] < 0).all() and (student.grad[~binary.bool()] > 0).all()


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
@pytest.mark.parametrize("mechanism", list(HEADS))
def test_student_shapes_and_ranges(mechanism, upsample):
    student = TinyGenerator(StudentConfig(channels=[128, 64, 32, 16], upsample=upsample), mechanism).eval()
    out = student(torch.randn(5, 32) * 3, torch.randint(0, 10, (5,)))
    channels = HEADS[mechanism][1]
    assert out.shape == (5, channels, 32, 32)
    low, high = (0.0, 1.0) if mechanism == "shape" else (-1.0, 1.0)
    assert out.min() >= low and out.max() <= high


@pytest.mark.parametrize("mechanism", list(HEADS))
def test_subpixel_head_makes_full_size_outputs_from_half_size_tensors(mechanism):
    """The sub-pixel head's last ×2 is depth-to-space: no hidden tensor (only the output) reaches 32×32."""
    student = TinyGenerator(StudentConfig(channels=[96, 64, 32], upsample="nearest", head="subpixel"), mechanism).eval()
    sizes = []
    hooks = [module.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
             for module in student.modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    out = student(torch.randn(5, 32) * 3, torch.randint(0, 10, (5,)))
    for hook in hooks:
        hook.remove()
    assert out.shape == (5, HEADS[mechanism][1], 32, 32) and max(sizes) == 16
    low, high = (0.0, 1.0) if mechanism == "shape" else (-1.0, 1.0)
    assert out.min() >= low and out.max() <= high


def test_mnist_shape_preset_is_wider_and_still_within_the_parameter_limit():
    students_of = {m: TinyGenerator(StudentConfig(**preset), m) for m, preset in MNIST_STUDENTS.items()}
    assert MNIST_STUDENTS["shape"]["head"] == "subpixel"
    assert count_parameters(students_of["shape"]) > count_parameters(students_of["texture"])
    assert sum(count_parameters(s) for s in students_of.values()) < TEACHER_PARAMETERS / 2


def test_students_are_lighter_than_the_teacher():
    config = StudentConfig(channels=[128, 64, 32, 16])
    total = sum(count_parameters(TinyGenerator(config, m)) for m in HEADS)
    assert total < TEACHER_PARAMETERS


def test_bad_student_config_is_explained():
    with pytest.raises(ValueError, match="channel widths"):
        TinyGenerator(StudentConfig(channels=[64, 32]), "shape")
    with pytest.raises(ValueError, match="subpixel head needs 3 channel widths .*one per ×2 but the last"):
        TinyGenerator(StudentConfig(channels=[64, 32, 16, 8], head="subpixel"), "shape")
    with pytest.raises(ValueError, match="head must be one of"):
        TinyGenerator(StudentConfig(channels=[64, 32, 16, 8], head="pixelshuffle"), "shape")
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


class FixedMasks:
    """The two calls train_student makes of a Bank, over 32 random masks."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.z = rng.standard_normal((32, 32)).astype(np.float32)
        self.y = rng.integers(0, 10, 32)
        self.mask = (rng.random((32, 1, 32, 32)) > 0.5).astype(np.float32)

    def __len__(self):
        return 32

    def sample(self, key, batch_size, rng):
        index = rng.choice(32, batch_size, replace=False)
        return self.z[index], self.y[index], self.mask[index]


@pytest.mark.parametrize("adv,feat,trained", [(0.0, 0.0, False), (0.01, 0.0, True), (0.0, 1.0, True)])
def test_stages_that_do_not_read_the_discriminator_do_not_train_it(tmp_path, adv, feat, trained):
    from training.trainer import train_student

    weights = {**TOY_WEIGHTS, "adv": adv, "feat": feat}
    recipe = Recipe.from_dict({"name": "d", "discriminator_channels": [8, 8, 16, 16, 16], "seed": 5, "stages": [
        {"name": "s", "steps": {"shape": 3}, "lr": 1e-3, "batch_size": 8, "weights": weights}]})
    config = StudentConfig(channels=[16, 8, 8, 8], embed_dim=8)
    torch.manual_seed(recipe.seed)  # as train_student starts: the same initial student and discriminator
    TinyGenerator(config, "shape")
    initial = ProjectionDiscriminator(1, 10, recipe.discriminator_channels).state_dict()
    _, log, _ = train_student("shape", FixedMasks(), config, recipe, torch.device("cpu"), tmp_path / "shape.pt")
    state = torch.load(tmp_path / "shape.pt", weights_only=False)
    unchanged = all(torch.equal(initial[name], state["discriminator"][name]) for name in initial)
    assert unchanged is not trained
    assert (log[0]["loss_d"] is None) is not trained and log[0]["pix"] > 0 and "iou" in log[0]


def test_parity_check_catches_a_frozen_batch_axis(tmp_path):
    class FrozenBatch(torch.nn.Module):
        """view(len(z), ...) traces the batch size as a constant: the exported graph only takes batch 16."""

        def forward(self, z, y):
            return torch.sigmoid(z.view(len(z), 1, 4, 8) + y.view(len(y), 1, 1, 1).float())

    module = FrozenBatch()
    feeds = {"z": np.zeros((export.PARITY_BATCH, 32), np.float32), "y": np.zeros(export.PARITY_BATCH, np.int64)}
    path = tmp_path / "frozen.onnx"
    export.export_graph(module, tuple(torch.from_numpy(v) for v in feeds.values()), ["z", "y"], ["mask"], path)
    with pytest.raises(export.ParityError, match=f"fails at batch {export.PARITY_SECOND_BATCH}"):
        export.check_parity(path, module, feeds, ["mask"])


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


TOY_WEIGHTS = {"pix": 1.0, "pix_decay": 0.0, "adv": 0.01, "feat": 1.0, "kl": 1.0,
               "feature_layers": [0.1, 0.1, 0.2, 0.3, 1.0]}


@pytest.fixture
def toy_recipe(tmp_path):
    """A two-stage recipe small enough to run end to end in seconds: a narrow shape student beside wider texture
    and background students (background's upsampling left to the teacher's preset), a cosine second stage."""
    recipe = {
        "name": "toy", "notes": "two tiny stages",
        "students": {"shape": {"channels": [16, 8, 8, 8], "embed_dim": 8, "upsample": "nearest"},
                     "texture": {"channels": [32, 16, 16, 8], "embed_dim": 8, "upsample": "bilinear"},
                     "background": {"channels": [32, 16, 16, 8], "embed_dim": 8}},
        "discriminator_channels": [8, 8, 16, 16, 16], "seed": 3, "bank_size": 96, "heldout": 32,
        "stages": [
            {"name": "fast", "steps": {"shape": 3, "texture": 2, "background": 2}, "lr": "5e-4", "batch_size": 16,
             "weights": TOY_WEIGHTS},
            {"name": "slow", "steps": {"shape": 2, "texture": 1}, "lr": 1e-4, "lr_schedule": "cosine", "batch_size": 8,
             "weights": TOY_WEIGHTS},
        ],
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def recipe_args(tmp_path, out, work="work", *extra):
    return [
        "--teacher", "double_colored", "--teacher-path", str(TEACHERS_DIR), "--out", str(out), "--chunk-size", "48",
        "--bank-dir", str(tmp_path / "bank"), "--work-dir", str(tmp_path / work), "--checkpoint-every", "2",
        "--log-every", "1", *extra,
    ]


def test_presets_re_make_the_recipes_double_colored_shipped_with():
    """The default recipe (any teacher's presets) is v5's; `codesign` is LATEST's (v6 and on: co-designed blocks)."""
    family = REPO / "models" / "double_colored_mnist"
    default = load_preset(DEFAULT_PRESET)
    assert all(preset == StudentPreset() for preset in default.students.values())  # any teacher's presets
    v5 = load_recipe(family / "v5")
    assert default.resolve(MNIST_STUDENTS, 50000) == v5
    assert v5.students["shape"].head == "subpixel" and v5.students["texture"].head == "conv"
    latest = load_recipe(family / (family / "LATEST").read_text().strip())
    assert load_preset("codesign").resolve(MNIST_STUDENTS, 50000) == latest and latest.fold_labels
    assert all(s.head == "subpixel" and s.conditioned_up_to == 8 for s in latest.students.values())
    for version in ("v2", "v3"):  # older recipe files pin the students they were trained with
        assert load_preset(f"double_colored_mnist_{version}").resolve(MNIST_STUDENTS, 50000) == load_recipe(
            REPO / "models" / "double_colored_mnist" / version)
    tinygan = load_preset("tinygan").stages
    assert len(tinygan) == 1 and (tinygan[0].lr, tinygan[0].weights.pix, tinygan[0].weights.kl) == (2e-4, 0.2, 0.1)
    assert set(preset_names()) >= {DEFAULT_PRESET, "tinygan"}


def test_widths_without_a_head_mean_the_conv_head():
    """Every recipe and manifest written before the sub-pixel head names widths and no head: they stay conv
    students whatever head the teacher's preset has, and so do --channels edits."""
    old = StudentPreset.from_dict({"channels": [64, 32, 16, 8], "embed_dim": 32})
    assert old.head == "conv" and old.filled(MNIST_STUDENTS["shape"]).head == "conv"
    assert StudentPreset().filled(MNIST_STUDENTS["shape"]) == StudentPreset(**MNIST_STUDENTS["shape"])
    edited = RecipeChanges(student=StudentPreset(channels=[32, 16, 16, 8])).apply(load_preset(DEFAULT_PRESET), False,
                                                                                   False)
    assert {p.head for p in edited.students.values()} == {"conv"}
    narrow = StudentConfig(channels=[64, 32, 16, 8]).to_dict()
    del narrow["head"]  # a checkpoint saved before the field existed
    assert StudentConfig(**narrow) == StudentConfig(channels=[64, 32, 16, 8], head="conv")


@pytest.mark.parametrize("manifest", sorted((REPO / "models").glob("*/v*/manifest.json")), ids=lambda p: p.parent.name)
def test_every_shipped_version_records_a_recipe_matching_its_training(manifest):
    recorded = json.loads(manifest.read_text())
    recipe = load_recipe(manifest.parent)
    recipe.validate()
    assert recipe.notes and {m: recipe.total_steps(m) for m in HEADS} == recorded["training"]["steps"]
    configs = student_configs(recorded)
    assert all(preset.channels == configs[m].channels for m, preset in recipe.students.items())


def test_recipe_files_round_trip_and_refuse_typos(tmp_path, toy_recipe):
    recipe = load_recipe(toy_recipe)
    assert recipe.stages[0].lr == 5e-4  # YAML reads 5e-4 as a string; the recipe reads it as a number
    assert recipe.students["background"].upsample is None  # left to the teacher
    (tmp_path / "toy.json").write_text(json.dumps(recipe.to_dict()))
    assert load_recipe(tmp_path / "toy.json") == recipe == Recipe.from_dict(recipe.to_dict())
    with pytest.raises(RecipeError, match="unknown key.*lamda_kl"):
        Recipe.from_dict({"name": "typo", "stages": [{"name": "a", "steps": {"shape": 1}, "weights": {"lamda_kl": 1}}]})
    with pytest.raises(RecipeError, match="one weight per discriminator layer"):
        Recipe.from_dict({**recipe.to_dict(), "discriminator_channels": [8, 8]}).validate()


def test_command_line_edits_build_one_stage_or_add_a_stage_on_resume(tmp_path):
    default = load_preset(DEFAULT_PRESET)
    quick = RecipeChanges(steps={"shape": 4}, lr=1e-3).apply(default, resuming=False, replaceable=True)
    assert len(quick.stages) == 1 and quick.stages[0].lr == 1e-3 and quick.stages[0].weights.kl == 1.0
    assert quick.stages[0].steps == {"shape": 4, "texture": 4, "background": 4} and "command line" in quick.notes
    with pytest.raises(RecipeError, match="ambiguous for the 5 stages"):
        RecipeChanges(lr=1e-3).apply(default, resuming=False, replaceable=False)
    wider = RecipeChanges(student=StudentPreset(channels=[32, 16, 16, 8])).apply(default, False, False)
    assert len(wider.stages) == 5 and all(p.channels == [32, 16, 16, 8] for p in wider.students.values())

    started = quick.resolve(MNIST_STUDENTS, 96)  # as saved beside checkpoints at step 4
    longer = RecipeChanges(steps={"shape": 6}).apply(started, resuming=True, replaceable=False)
    assert len(longer.stages) == 1 and longer.stages[0].steps == {"shape": 6, "texture": 4, "background": 4}
    annealed = RecipeChanges(steps={"shape": 9}, lr=1e-4).apply(started, resuming=True, replaceable=False)
    assert [(s.lr, s.steps) for s in annealed.stages] == [(1e-3, started.stages[0].steps), (1e-4, {"shape": 5})]
    annealed.check_continues(started, {"shape": 4}, tmp_path)
    with pytest.raises(RecipeError, match="first 4 shape steps"):
        RecipeChanges(lr=5e-4).apply(started, False, False).check_continues(started, {"shape": 4}, tmp_path)
    with pytest.raises(RecipeError, match="give --steps"):
        RecipeChanges(lr=1e-4).apply(started, resuming=True, replaceable=False)


@needs_shared
def test_two_stage_recipe_runs_records_both_stages_and_loads_back(tmp_path, toy_recipe):
    out = tmp_path / "models" / "double_colored_mnist" / "t1"
    assert distill.main(recipe_args(tmp_path, out, "work", "--recipe", str(toy_recipe))) == 0
    manifest = load_manifest(out)
    recorded = manifest["recipe"]
    stages = [(s["name"], s["lr"], s["batch_size"]) for s in recorded["stages"]]
    assert stages == [("fast", 5e-4, 16), ("slow", 1e-4, 8)]
    assert recorded["students"]["background"] == {"channels": [32, 16, 16, 8], "embed_dim": 8, "upsample": "nearest",
                                                  "head": "conv", "conditioned_up_to": None}
    assert recorded["bank_size"] == 96 and recorded["notes"] == "two tiny stages"
    assert json.loads((tmp_path / "work" / "recipe.json").read_text()) == recorded
    assert manifest["training"]["steps"] == {"shape": 5, "texture": 3, "background": 2}
    configs = student_configs(manifest)
    assert configs["shape"].channels == [16, 8, 8, 8] and configs["texture"].upsample == "bilinear"
    assert "student" not in manifest["training"]  # no one config for all: per mechanism under `students`
    assert manifest["student_parameters"]["shape"] < manifest["student_parameters"]["texture"]
    with open(out / "losses.csv") as handle:
        shape_rows = [row for row in csv.DictReader(handle) if row["mechanism"] == "shape"]
    assert [(row["stage"], int(row["step"])) for row in shape_rows] == [
        ("fast", 0), ("fast", 1), ("fast", 2), ("slow", 3), ("slow", 4)]
    assert [float(row["lr"]) for row in shape_rows[2:]] == pytest.approx([5e-4, 1e-4, 5e-5])  # cosine in "slow"
    assert torch.load(tmp_path / "work" / "texture.pt", weights_only=False)["step"] == 3

    # --recipe <version folder> reads the manifest's recipe back; on the same checkpoints nothing is left to train.
    again = tmp_path / "models" / "double_colored_mnist" / "t2"
    assert distill.parse_args(recipe_args(tmp_path, again, "work", "--recipe", str(out))).recipe.to_dict() == recorded
    assert distill.main(recipe_args(tmp_path, again, "work", "--recipe", str(out), "--resume")) == 0
    rerun = load_manifest(again)
    assert rerun["recipe"] == recorded and rerun["metrics"] == manifest["metrics"]


@needs_shared
def test_a_version_re_made_from_its_manifest_matches_it(tmp_path, toy_recipe):
    """No checkpoint carried over: `--recipe <version folder>` in a fresh work folder re-makes the same students."""
    shipped = tmp_path / "models" / "double_colored_mnist" / "t1"
    assert distill.main(recipe_args(tmp_path, shipped, "work", "--recipe", str(toy_recipe))) == 0
    again = tmp_path / "remade" / "double_colored_mnist" / "t1"
    assert distill.main(recipe_args(tmp_path, again, "fresh-work", "--recipe", str(shipped))) == 0

    results, page = tmp_path / "results", tmp_path / "RESULTS.md"
    assert evaluate.main(["remake", "--family", "double_colored_mnist", "--version", "t1", "--models-dir",
                          str(tmp_path / "models"), "--remade", str(tmp_path / "remade"), "--results-dir", str(results),
                          "--results-md", str(page)]) == 0
    result = json.loads((results / "remake_double_colored_mnist_t1.json").read_text())
    assert [row["metric"] for row in result["metrics"]] == ["mask IoU", "mask L1", "texture L1", "background L1"]
    assert all(row["difference"] == pytest.approx(0, abs=1e-6) for row in result["metrics"])
    assert all(v["max_abs_difference"] < 1e-5 for v in result["outputs"]["per_mechanism"].values())
    assert set(result["identical_onnx"]) == {"shape.onnx", "texture.onnx", "background.onnx", "fused.onnx"}
    assert "re-made from its manifest's recipe (`toy`)" in page.read_text()

    manifest = json.loads((again / "manifest.json").read_text())
    manifest["recipe"]["stages"][0]["lr"] = 1e-3  # another recipe: not a re-make of t1
    (again / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(remake.NotARemake, match="was not made by the recipe of double_colored_mnist/t1"):
        remake.compare(shipped, again)


@needs_shared
def test_interrupted_recipe_resumes_at_its_stage_and_step(tmp_path, toy_recipe, monkeypatch):
    only_shape = ["--recipe", str(toy_recipe), "--mechanisms", "shape"]
    assert distill.main(recipe_args(tmp_path, tmp_path / "a" / "t1", "whole", *only_shape)) == 0

    pixel_l1, calls = losses.pixel_l1, []

    def interrupted(*tensors):
        calls.append(1)
        if len(calls) == 5:  # shape's step 4: the second step of stage "slow"
            raise KeyboardInterrupt
        return pixel_l1(*tensors)

    monkeypatch.setattr(losses, "pixel_l1", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill.main(recipe_args(tmp_path, tmp_path / "a" / "t2", "cut", *only_shape, "--checkpoint-every", "1"))
    monkeypatch.setattr(losses, "pixel_l1", pixel_l1)
    assert torch.load(tmp_path / "cut" / "shape.pt", weights_only=False)["step"] == 4
    # No --recipe: the run goes on by the recipe.json beside its checkpoints.
    assert distill.main(recipe_args(tmp_path, tmp_path / "a" / "t2", "cut", "--resume")) == 0

    whole, cut = (torch.load(tmp_path / work / "shape.pt", weights_only=False) for work in ("whole", "cut"))
    assert cut["step"] == 5
    trail = lambda log: [(row["stage"], row["step"], row["lr"]) for row in log]  # noqa: E731
    assert trail(cut["log"]) == trail(whole["log"])
    for name, tensor in whole["student"].items():
        assert torch.equal(tensor, cut["student"][name]), name


def test_folding_the_label_lookups_of_a_shipped_graph_keeps_its_function(tmp_path):
    """training.fold_labels on shipped fused students exported unfolded (v5): far fewer nodes, no Gemm on the label
    path, and the same outputs (to float rounding) for every class; folding a folded graph again changes nothing
    it computes."""
    import onnx
    import onnxruntime as ort

    from training.fold_labels import fold_labels

    source = REPO / "models" / "double_colored_mnist" / "v5" / "fused.onnx"
    original = onnx.load(str(source))
    folded = fold_labels(original, 10)
    onnx.checker.check_model(folded)
    assert len(folded.graph.node) < 0.7 * len(original.graph.node)
    assert sum(node.op_type == "BatchNormalization" for node in folded.graph.node) < \
        sum(node.op_type == "BatchNormalization" for node in original.graph.node)
    again = fold_labels(folded, 10)
    onnx.checker.check_model(again)
    assert len(again.graph.node) == len(folded.graph.node)
    paths = [tmp_path / "folded.onnx", tmp_path / "folded_again.onnx"]
    for model, path in zip((folded, again), paths):
        onnx.save(model, str(path))
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (source, *paths)]
    rng = np.random.default_rng(0)
    feeds = {item.name: (np.arange(40) % 10).astype(np.int64) if "int64" in item.type
             else rng.standard_normal((40, item.shape[1])).astype(np.float32) for item in sessions[0].get_inputs()}
    expected, *others = (session.run(None, feeds) for session in sessions)
    for outputs in others:
        for a, b in zip(expected, outputs):
            assert np.abs(a - b).max() < 1e-4


def test_codesign_students_condition_only_their_first_block_and_export_folded(tmp_path):
    """The `codesign` preset: sub-pixel heads, label-conditioned BatchNorm up to 8×8 only, label lookups folded at
    export; the export's parity check holds for the folded graphs, and labels still change the output."""
    recipe = load_preset("codesign")
    assert recipe.fold_labels and {p.conditioned_up_to for p in recipe.students.values()} == {8}
    configs = {m: StudentConfig(**{k: v for k, v in vars(recipe.students[m]).items()}) for m in HEADS}
    modules = {m: TinyGenerator(configs[m], m).eval() for m in HEADS}
    for module in modules.values():
        kinds = [(type(block.norm1).__name__, type(block.norm2).__name__) for block in module.blocks]
        assert kinds[0] == ("ConditionalBatchNorm", "ConditionalBatchNorm")
        assert all(kind == ("PlainBatchNorm", "PlainBatchNorm") for kind in kinds[1:])
    blocks = export.export_students(modules, tmp_path, fold=True)
    assert blocks["fused"]["parity_max_abs_diff"] <= export.PARITY_TOLERANCE
    import onnx

    fused = onnx.load(str(tmp_path / "fused.onnx"))
    assert not any(node.op_type == "Gemm" and "norm" in node.name for node in fused.graph.node)
    z = torch.randn(2, 32).repeat(2, 1)
    y = torch.tensor([1, 1, 7, 7])
    with torch.no_grad():
        out = modules["texture"](z, y)
    assert not torch.allclose(out[0], out[2])  # the first block's conditioning carries the label through
    assert Recipe.from_dict(recipe.to_dict()) == recipe
