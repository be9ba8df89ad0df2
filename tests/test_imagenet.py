"""The ImageNet CGN teacher (three BigGAN-deep-256 + U²-Net) at random initialisation on CPU.

The official cgn.pth is not available offline, so every test builds on one randomly initialised teacher,
saved once per module in the CGN layout. Tests marked `slow` run the full-size teacher (tens of seconds
each on two cores): one distillation makes a 256-px family from a tiny bank, exported, checked and then
served by a real Redis, Celery worker and gateway.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_pretrained_biggan", reason="the ImageNet teacher needs the `imagenet` extra")

from core.manifest import load_manifest, verify_files  # noqa: E402
from core.noise import NoiseSpec, draw_z  # noqa: E402
from training import distill, export  # noqa: E402
from training.bank import Bank  # noqa: E402
from training.fetch import file_digest  # noqa: E402
from training.students import HEADS, TinyGenerator, count_parameters  # noqa: E402
from training.teachers import cgn_imagenet as cgn  # noqa: E402
from training.teachers.loading import TeacherError, load_teacher_adapter  # noqa: E402

BIGGAN_PARAMETERS = 55_880_833
U2NET_PARAMETERS = 44_009_869
TEACHER_PARAMETERS = 3 * BIGGAN_PARAMETERS + U2NET_PARAMETERS


@pytest.fixture(scope="module")
def teacher() -> cgn.CGNImageNet:
    return cgn.random_teacher(seed=0)


def cgn_layout(teacher: cgn.CGNImageNet, prefix: str = "") -> OrderedDict:
    """The teacher's weights as CGN saves them: plus a `biggan_GT` generator (here sharing f_shape's tensors,
    which torch.save stores once), optionally under DataParallel's `module.`."""
    state = OrderedDict(teacher.state_dict())
    state.update(("biggan_GT." + key, value) for key, value in teacher.f_shape.state_dict().items())
    return OrderedDict((prefix + key, value) for key, value in state.items())


@pytest.fixture(scope="module")
def checkpoint(teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("cgn") / "cgn.pth"
    torch.save(cgn_layout(teacher), path)
    return path


@pytest.fixture(scope="module")
def blank() -> cgn.CGNImageNet:
    """A second teacher to load state dicts into."""
    return cgn.CGNImageNet()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)


def test_architecture_matches_the_cgn(teacher):
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert [count(g) for g in (teacher.f_shape, teacher.f_text, teacher.f_bg)] == [BIGGAN_PARAMETERS] * 3
    assert count(teacher.u2net) == U2NET_PARAMETERS
    assert count(teacher) == TEACHER_PARAMETERS
    embeddings = teacher.f_text.embeddings  # the class input: one-hot(1000) → Linear(1000 → 128, no bias)
    assert embeddings.weight.shape == (128, 1000) and embeddings.bias is None
    keys = teacher.state_dict().keys()
    assert {"f_shape.generator.gen_z.weight_orig", "f_bg.generator.layers.8.gamma", "u2net.stage1.rebnconvin.conv_s1.weight",
            "u2net.stage5d.rebnconv3d.bn_s1.running_var", "u2net.side6.bias", "u2net.outconv.weight"} <= set(keys)


def test_tinygan_256_preset_has_a_tenth_of_a_biggan_deep_256():
    config = cgn.student_config()
    for mechanism in HEADS:
        assert 5.0e6 < count_parameters(TinyGenerator(config, mechanism)) < 6.2e6
    assert BIGGAN_PARAMETERS / count_parameters(TinyGenerator(config, "texture")) >= 10


@pytest.mark.parametrize("bad", [0, -0.5, 1.01, math.nan, math.inf, "half", None])
def test_truncation_outside_zero_one_is_refused(bad, tmp_path):
    with pytest.raises(TeacherError, match=r"truncation must be"):
        cgn.validate_truncation(bad)
    with pytest.raises(TeacherError, match=r"truncation must be"):  # checked before any file is read
        cgn.load_teacher(tmp_path / "missing.pth", truncation=bad)
    assert cgn.validate_truncation(1) == 1.0 and cgn.validate_truncation("0.4") == 0.4


def test_truncation_is_imagenet_only_and_the_checkpoint_is_required(tmp_path):
    with pytest.raises(TeacherError, match="takes no truncation"):
        load_teacher_adapter("double_colored", tmp_path, truncation=0.5)
    with pytest.raises(TeacherError, match="--teacher-path"):
        cgn.load_teacher(None)
    with pytest.raises(TeacherError, match="not found: .*cgn.pth"):
        cgn.load_teacher(tmp_path)


def test_class_names():
    names = cgn.class_names()
    assert len(names) == len(set(names)) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[207] == "Golden Retriever"


@pytest.mark.slow
def test_forward_shapes_and_ranges(teacher):
    spec = NoiseSpec(cgn.LATENT_DIM, "truncated_normal", 0.5, True)
    u = torch.from_numpy(draw_z(np.random.default_rng(0), spec))[None]
    y = torch.tensor([207])
    with torch.no_grad():
        mask, texture, background = (teacher.mechanism(m)(u, y) for m in HEADS)
    assert mask.shape == (1, 1, 256, 256) and texture.shape == background.shape == (1, 3, 256, 256)
    assert mask.min() >= 1e-4 and mask.max() <= 0.9999
    for image in (texture, background):
        assert torch.isfinite(image).all() and image.min() >= -1 and image.max() <= 1 and image.std() > 0


@pytest.mark.slow
def test_checkpoint_loads_back_strictly(teacher, checkpoint):
    loaded = cgn.load_teacher(checkpoint, truncation=0.7)
    assert_same_weights(loaded, teacher)
    assert loaded.sha256 == file_digest(checkpoint, "sha256") and loaded.truncation == 0.7
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_module_prefix_is_accepted(teacher, blank):
    cgn.load_state(blank, cgn_layout(teacher, prefix="module."), "in-memory")
    assert_same_weights(blank, teacher)


def test_key_mismatch_names_the_keys(teacher, blank):
    state = cgn_layout(teacher)
    del state["u2net.outconv.bias"]
    state["f_text.generator.extra.weight"] = torch.zeros(1)
    with pytest.raises(TeacherError) as info:
        cgn.load_state(blank, state, "bad.pth")
    message = str(info.value)
    assert "1 missing keys (u2net.outconv.bias)" in message
    assert "1 unexpected keys (f_text.generator.extra.weight)" in message and "bad.pth" in message

    state = cgn_layout(teacher)
    state["f_bg.embeddings.weight"] = torch.zeros(128, 10)
    with pytest.raises(TeacherError, match=r"(?s)does not fit the ImageNet CGN.*f_bg.embeddings.weight"):
        cgn.load_state(blank, state, "bad.pth")
    with pytest.raises(TeacherError, match="not a state dict"):
        cgn.load_state(blank, [torch.zeros(1)], "list.pth")


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "cgn.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="cannot read .*cgn.pth"):
        cgn.load_teacher(path)


@pytest.fixture(scope="module")
def distilled(checkpoint, tmp_path_factory):
    """A 256-px family from a tiny bank of two classes: a few steps, exported and promoted."""
    root = tmp_path_factory.mktemp("distill")
    out = root / "models" / "imagenet" / "t1"
    args = [
        "--teacher", "imagenet", "--teacher-path", str(checkpoint), "--out", str(out), "--promote",
        "--bank-size", "4", "--heldout", "1", "--chunk-size", "3", "--classes", "1,207",
        "--bank-dir", str(root / "bank"), "--work-dir", str(root / "work"),
        "--steps", "2", "--batch-size", "2", "--checkpoint-every", "2", "--log-every", "1",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "PARITY_BATCH", 2)  # 16 × 256 px through four graphs, twice, is minutes on CPU
        assert distill.main(args) == 0
    return out


@pytest.mark.slow
def test_short_distillation_exports_a_256px_family(distilled, teacher, checkpoint):
    from core.runtime import ModelRuntime

    out = distilled
    manifest = load_manifest(out)
    verify_files(out, manifest)
    assert (out.parent / "LATEST").read_text().strip() == "t1"
    assert manifest["family"] == "imagenet" and manifest["image_size"] == 256
    assert manifest["noise"] == {"dim": 128, "distribution": "truncated_normal", "truncation": 0.5,
                                 "shared_across_mechanisms": True}
    assert manifest["texture_shuffle"] is False
    assert manifest["labels"]["count"] == 1000 and manifest["labels"]["names"][207] == "Golden Retriever"
    assert manifest["teacher"] == {"name": "imagenet", "sha256": file_digest(checkpoint, "sha256"),
                                   "parameters": TEACHER_PARAMETERS}
    assert manifest["training"]["classes"] == [1, 207] and manifest["training"]["student"]["embed_dim"] == 128
    for mechanism, block in manifest["mechanisms"].items():
        assert block["outputs"][HEADS[mechanism][0]]["shape"] == [None, HEADS[mechanism][1], 256, 256]
        # The preset, unchanged by the distillation defaults: ≥ 10× fewer parameters than a BigGAN-deep-256.
        assert manifest["student_parameters"][mechanism] == count_parameters(TinyGenerator(cgn.student_config(), mechanism))
    assert manifest["training"]["student"] == cgn.student_config().to_dict()
    for block in list(manifest["mechanisms"].values()) + [manifest["fused"]]:
        assert block["parity_max_abs_diff"] <= export.PARITY_TOLERANCE
    assert manifest["metrics"]["heldout_pairs"] == 1 and "class_mean_baseline" in manifest["metrics"]["background"]

    # The bank holds exact (u, y, T(u, y)) triples: truncated noise, only the chosen classes.
    bank_dir = out.parents[2] / "bank"
    assert json.loads((bank_dir / "bank.json").read_text())["truncation"] == 0.5
    data = Bank(bank_dir, "heldout").load(["z", "y", "texture"])
    assert set(data["y"]) <= {1, 207} and np.abs(data["z"]).max() <= 1.0
    with torch.no_grad():
        expected = teacher.texture(torch.from_numpy(data["z"][:1]), torch.from_numpy(data["y"][:1])).numpy()
    np.testing.assert_allclose(data["texture"][:1], expected, atol=1e-5)

    # The graphs take any batch size, not only the one they were traced with (run as the workers run them).
    runtime = ModelRuntime(out, providers=["CPUExecutionProvider"])
    z, y = data["z"][:1], data["y"][:1]
    outputs = runtime.run_fused({m: z for m in HEADS}, {m: y for m in HEADS})
    mask, texture, background = outputs["shape"], outputs["texture"], outputs["background"]
    assert mask.shape == (1, 1, 256, 256) and texture.shape == background.shape == (1, 3, 256, 256)


@pytest.mark.slow
def test_the_256px_family_is_served(distilled, tmp_path):
    """Redis, a Celery worker and the gateway serve the exported family: class names and 256-px images."""
    import httpx

    from tests.service_stack import ServiceStack
    from tests.service_helpers import images_of

    with ServiceStack(tmp_path, distilled.parents[1], default_model="imagenet") as stack:
        with httpx.Client(base_url=stack.url, timeout=60) as client:
            (family,) = client.get("/models").json()["models"]
            (version,) = family["versions"]
            assert (family["name"], version["version"], version["image_size"]) == ("imagenet", "t1", 256)
            assert version["labels"]["count"] == 1000 and version["labels"]["names"][1] == "goldfish"
            answer = client.post("/counterfactual", json={"shape": 1, "texture": 207, "background": 1, "n": 2,
                                                          "seed": 5, "return_components": True})
            assert answer.status_code == 200, answer.text
            payload = answer.json()
            assert images_of(payload).shape == (2, 256, 256, 3)
            assert images_of(payload["components"], "mask").shape == (2, 256, 256, 3)
