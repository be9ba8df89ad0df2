"""Composition, shuffler, mask modifiers, noise contract, image encoding, manifest and atomic writes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core import atomic, compose, imageio, manifest, noise
from core.fidelity import mask_iou, mean_l1, psnr
from core.vocabulary import MECHANISMS


def test_compose_known_values():
    mask = np.array([[[[1.0, 0.0], [0.25, 0.5]]]], dtype=np.float32)
    fg = np.full((1, 3, 2, 2), 0.8, np.float32)
    bg = np.full((1, 3, 2, 2), -0.4, np.float32)
    out = compose.compose(mask, fg, bg)
    expected = np.array([[0.8, -0.4], [0.25 * 0.8 + 0.75 * -0.4, 0.5 * 0.8 + 0.5 * -0.4]], np.float32)
    assert out.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(out[0, 1], expected, atol=1e-7)


def test_circular_shift_is_window_of_tiled_image():
    image = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    tiled = np.tile(image, (1, 2, 2))
    for dy, dx in [(0, 0), (1, 3), (3, 2)]:
        np.testing.assert_array_equal(compose.circular_shift(image, (dy, dx)), tiled[:, dy:dy + 4, dx:dx + 4])


def test_mask_modifiers():
    mask = np.zeros((1, 9, 9), np.float32)
    mask[0, 4, :] = 1.0  # a horizontal bar
    rotated = compose.modify_mask(mask, rotation_deg=90.0)
    np.testing.assert_allclose(rotated[0, :, 4], 1.0, atol=1e-6)  # became vertical
    np.testing.assert_allclose(compose.modify_mask(mask, transparency=0.75), 0.75 * mask)
    noisy = compose.modify_mask(mask, noise=np.full_like(mask, 0.3))
    assert noisy.min() == pytest.approx(0.3) and noisy.max() == 1.0  # clipped to [0, 1]
    assert compose.modify_mask(mask) is not mask and np.array_equal(compose.modify_mask(mask), mask)


def test_sample_noise_is_per_index_and_ordered():
    spec = noise.NoiseSpec(dim=32)
    a = noise.draw_sample_noise(7, 3, spec, 32)
    b = noise.draw_sample_noise(7, 3, spec, 32)
    c = noise.draw_sample_noise(7, 4, spec, 32)
    for name in MECHANISMS:
        np.testing.assert_array_equal(a.z[name], b.z[name])
        assert not np.array_equal(a.z[name], c.z[name])
    assert not np.array_equal(a.z["shape"], a.z["texture"])  # fresh noise per mechanism on MNIST
    # The contract's order: z for shape, texture, background, then the offsets.
    rng = noise.sample_stream(7, 3)
    expected = [rng.standard_normal(32).astype(np.float32) for _ in range(3)]
    for name, values in zip(MECHANISMS, expected):
        np.testing.assert_array_equal(a.z[name], values)
    assert tuple(rng.integers(0, 32, size=4)) == a.shift_texture + a.shift_background
    # Modifier draws come last, so asking for them leaves z and offsets unchanged.
    d = noise.draw_sample_noise(7, 3, spec, 32, rotation_deg=90, noise_std=0.1)
    np.testing.assert_array_equal(d.z["shape"], a.z["shape"])
    assert d.shift_background == a.shift_background and -90 <= d.rotation_deg <= 90
    assert d.mask_noise.shape == (1, 32, 32)


def test_explicit_z_overrides_only_z():
    spec = noise.NoiseSpec(dim=4)
    z = [0.5, -1.0, 2.0, 0.0]
    drawn = noise.draw_sample_noise(1, 0, spec, 8)
    given = noise.draw_sample_noise(1, 0, spec, 8, z_override={"texture": z})
    np.testing.assert_array_equal(given.z["texture"], np.float32(z))
    np.testing.assert_array_equal(given.z["shape"], drawn.z["shape"])
    assert given.shift_texture == drawn.shift_texture


def test_truncated_normal_and_shared_noise():
    spec = noise.NoiseSpec(dim=1000, distribution="truncated_normal", truncation=0.5, shared_across_mechanisms=True)
    sample = noise.draw_sample_noise(0, 0, spec, 256)
    assert np.abs(sample.z["shape"]).max() <= 1.0
    assert sample.z["shape"] is sample.z["background"]
    with pytest.raises(ValueError, match="distribution"):
        noise.draw_z(np.random.default_rng(0), noise.NoiseSpec(dim=2, distribution="uniform"))


def test_draw_labels_respects_choices_and_is_deterministic():
    choices = {"shape": [0, 1], "texture": list(range(10)), "background": [5]}
    labels = [noise.draw_labels(3, i, choices) for i in range(200)]
    assert {l["shape"] for l in labels} == {0, 1} and {l["background"] for l in labels} == {5}
    assert labels == [noise.draw_labels(3, i, choices) for i in range(200)]


def test_draw_labels_keeps_the_seed_rule():
    """The values Generator.choice over each mechanism's labels draws from the sample's label stream: the rule
    every job's provenance names, so a dataset re-rendered later has the same labels."""
    choices = {"shape": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], "texture": [3, 7, 8], "background": [4]}
    for seed, index in ((0, 0), (3, 17), (20261205, 999_999)):
        for i in range(index, index + 50):
            stream = noise.label_stream(seed, i)
            expected = {m: int(stream.choice(np.asarray(choices[m]))) for m in ("shape", "texture", "background")}
            assert noise.draw_labels(seed, i, choices) == expected


def test_compose_samples_applies_shifts_and_modifiers():
    spec = noise.NoiseSpec(dim=2)
    rng = np.random.default_rng(0)
    mask = rng.uniform(size=(2, 1, 8, 8)).astype(np.float32)
    texture = rng.uniform(-1, 1, size=(2, 3, 8, 8)).astype(np.float32)
    background = rng.uniform(-1, 1, size=(2, 3, 8, 8)).astype(np.float32)
    noises = [noise.draw_sample_noise(5, i, spec, 8) for i in range(2)]
    image, m, t, b = compose.compose_samples(mask, texture, background, noises, True, transparency=0.5)
    np.testing.assert_allclose(m, 0.5 * mask, rtol=1e-6)
    np.testing.assert_array_equal(t[1], compose.circular_shift(texture[1], noises[1].shift_texture))
    np.testing.assert_allclose(image, m * t + (1 - m) * b, rtol=1e-6)
    unshuffled = compose.compose_samples(mask, texture, background, noises, False)[2]
    np.testing.assert_array_equal(unshuffled, texture)


def test_image_encoding_roundtrip_and_grid():
    images = np.linspace(-1, 1, 2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    as_uint8 = imageio.to_uint8(images)
    assert as_uint8.shape == (2, 4, 4, 3) and as_uint8.dtype == np.uint8
    assert as_uint8.min() == 0 and as_uint8.max() == 255
    np.testing.assert_array_equal(imageio.decode(imageio.encode(as_uint8[0])), as_uint8[0])
    mask = imageio.to_uint8(np.ones((1, 1, 4, 4)), (0.0, 1.0))
    assert mask.shape == (1, 4, 4, 3) and (mask == 255).all()
    picture = imageio.grid(as_uint8, columns=2, pad=1)
    assert picture.shape == (6, 11, 3)


def test_metrics_known_answers():
    a = np.zeros((2, 1, 2, 2)); b = np.zeros((2, 1, 2, 2))
    a[0, 0, 0, :] = 1; b[0, 0, :, 0] = 1  # overlap 1 of union 3
    np.testing.assert_allclose(mask_iou(a, b), [1 / 3, 1.0])
    np.testing.assert_allclose(mean_l1(np.ones((1, 4)), np.zeros((1, 4))), [1.0])
    np.testing.assert_allclose(psnr(np.zeros((1, 4)), np.full((1, 4), 0.2)), [10 * np.log10(4 / 0.04)])


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "v1"
    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "half.onnx").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic.atomic_directory(target) as tmp:
        (tmp / "done").write_text("ok")
    assert (target / "done").read_text() == "ok"
    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic.atomic_directory(target):
            pass


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """Temp files are private (0600/0700); what lands in place must have the modes of an ordinary write."""
    (tmp_path / "plain").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    atomic.write_text_atomic(tmp_path / "file", "x")
    with atomic.atomic_directory(tmp_path / "dir") as tmp:
        (tmp / "inner").write_text("x")
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("file") == mode("plain") == atomic.FILE_MODE
    assert mode("dir") == mode("plain_dir") == atomic.DIRECTORY_MODE


def _version(root, family, version, content=b"onnx"):
    directory = root / family / version
    directory.mkdir(parents=True)
    (directory / "shape.onnx").write_bytes(content)
    body = {key: None for key in manifest.REQUIRED_KEYS}
    body.update(family=family, version=version, files={"shape.onnx": __import__("hashlib").sha256(content).hexdigest()})
    manifest.write_manifest(directory, body)
    return directory


def test_manifest_resolution_and_verification(tmp_path):
    directory = _version(tmp_path, "fam", "v1")
    _version(tmp_path, "fam", "v2")
    manifest.set_latest(tmp_path, "fam", "v1")
    assert manifest.resolve_version(tmp_path, "fam") == ("v1", directory)
    assert manifest.list_families(tmp_path) == ["fam"]
    with pytest.raises(manifest.VersionNotFound, match="v1, v2"):
        manifest.resolve_version(tmp_path, "fam", "v9")
    loaded = manifest.load_manifest(directory)
    manifest.verify_files(directory, loaded)
    (directory / "shape.onnx").write_bytes(b"tampered")
    with pytest.raises(manifest.ManifestError, match="sha256"):
        manifest.verify_files(directory, loaded)
    (directory / "manifest.json").write_text(json.dumps({"family": "fam"}))
    with pytest.raises(manifest.ManifestError, match="lacks keys"):
        manifest.load_manifest(directory)
    with pytest.raises(manifest.ManifestError, match="invalid version"):
        manifest.validate_version_name("../escape")
