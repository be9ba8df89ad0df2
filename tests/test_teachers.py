"""The official MNIST CGN teachers load strictly and reproduce the reference outputs."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from training.fetch import ChecksumError
from training.teachers import TEACHERS, TeacherError, load_teacher
from training.teachers.__main__ import main as teacher_cli
from tests.paths import TEACHERS_DIR, needs_shared

pytestmark = needs_shared
KEYS = {"shape": "mask", "texture": "texture", "background": "background"}


@pytest.fixture(scope="module")
def reference():
    return np.load(TEACHERS_DIR / "reference_outputs.npz")


@pytest.mark.parametrize("variant", sorted(TEACHERS))
def test_teacher_reproduces_reference_outputs(variant, reference):
    teacher = load_teacher(variant, TEACHERS_DIR)
    assert not teacher.training and sum(p.numel() for p in teacher.parameters()) == 659_992
    u = torch.from_numpy(reference["u"]).float()
    y = torch.from_numpy(reference["y"]).long()
    with torch.no_grad():
        for mechanism, key in KEYS.items():
            out = teacher.mechanism(mechanism)(u, y).numpy()
            np.testing.assert_allclose(out, reference[f"{variant}/{key}"], atol=1e-5, rtol=0)
            low, high = (1e-4, 0.9999) if mechanism == "shape" else (-1.0, 1.0)
            assert out.min() >= low and out.max() <= high
            assert out.shape == ((16, 1, 32, 32) if mechanism == "shape" else (16, 3, 32, 32))


def test_checksum_mismatch_is_refused_unless_allowed(tmp_path):
    # The colored checkpoint is a valid CGN but not the double-colored one: a real mismatch.
    impostor = tmp_path / "double_colored.pth"
    shutil.copy(TEACHERS_DIR / "colored.pth", impostor)
    with pytest.raises(ChecksumError, match="not the official double_colored") as info:
        load_teacher("double_colored", impostor)
    assert "allow_unknown" in str(info.value)
    teacher = load_teacher("double_colored", impostor, allow_unknown=True)
    assert teacher.sha256 == TEACHERS["colored"].sha256


def test_missing_path_and_unknown_teacher_errors(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(TeacherError, match=str(missing)):
        load_teacher("wildlife", missing)
    with pytest.raises(TeacherError, match="choose one of colored, double_colored, wildlife"):
        load_teacher("imagenette", TEACHERS_DIR)


def test_not_a_state_dict_is_a_clear_error(tmp_path):
    bogus = tmp_path / "wildlife.pth"
    torch.save({"weight": torch.zeros(1)}, bogus)
    with pytest.raises(TeacherError, match="not a CGN MNIST state dict"):
        load_teacher("wildlife", bogus, allow_unknown=True)


def test_sample_command_renders_a_seeded_grid(tmp_path):
    from PIL import Image

    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for out in (first, second):
        assert teacher_cli(["sample", "--teacher", "double_colored", "--teacher-path", str(TEACHERS_DIR),
                            "--labels", "0,1,2,3,4,5", "--seed", "3", "--out", str(out)]) == 0
    assert first.read_bytes() == second.read_bytes()
    width, height = Image.open(first).size
    assert width > height > 0  # six columns, four rows (mask, texture, background, composite)
