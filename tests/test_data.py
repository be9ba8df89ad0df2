"""MNIST loading (checksums, formats, download, errors) and the double-colored / wildlife recipes, on real data."""
from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.paths import MNIST_DIR, REPO, SHARED, TEXTURE_DIR
from training import data
from training.fetch import ChecksumError

TEST_FILES = [f"{name}.gz" for name in data.MNIST_FILES["test"]]

needs_mnist = pytest.mark.skipif(
    not all((MNIST_DIR / name).is_file() for name in TEST_FILES),
    reason=f"shared MNIST test files not found in {MNIST_DIR} (set SKDCGN_SHARED)",
)
needs_textures = pytest.mark.skipif(
    not (TEXTURE_DIR / "object").is_dir(), reason=f"shared textures not found in {TEXTURE_DIR} (set SKDCGN_SHARED)"
)


@pytest.fixture(scope="module")
def mnist():
    return data.load_mnist("test", data_dir=SHARED / "data")


@pytest.fixture(scope="module")
def digits(mnist):
    images, labels = mnist
    return images[:2000], labels[:2000]


def copy_mnist(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in TEST_FILES:
        shutil.copyfile(MNIST_DIR / name, folder / name)
    return folder


# ------------------------------------------------------------------------------------------ loading


@needs_mnist
def test_load_mnist_test_split(mnist):
    images, labels = mnist
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10))
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert images.max() == 255 and images.min() == 0


@needs_mnist
def test_data_dir_may_be_the_mnist_folder_or_come_from_the_env(mnist, monkeypatch):
    monkeypatch.delenv("SKDCGN_DATA_DIR", raising=False)
    direct = data.load_mnist("test", data_dir=MNIST_DIR)
    monkeypatch.setenv(data.MNIST_DIR_ENV, str(SHARED / "data"))
    assert data.MNIST_DIR_ENV == "SKDCGN_MNIST_DIR"
    from_env = data.load_mnist("test")
    for images, labels in (direct, from_env):
        np.testing.assert_array_equal(images, mnist[0])
        np.testing.assert_array_equal(labels, mnist[1])


@needs_mnist
def test_the_old_data_dir_variable_still_works_with_a_warning(mnist, monkeypatch):
    monkeypatch.delenv(data.MNIST_DIR_ENV, raising=False)
    monkeypatch.setenv("SKDCGN_DATA_DIR", str(SHARED / "data"))
    with pytest.warns(FutureWarning, match="SKDCGN_DATA_DIR is deprecated.*SKDCGN_MNIST_DIR"):
        images, labels = data.load_mnist("test")
    np.testing.assert_array_equal(images, mnist[0])
    np.testing.assert_array_equal(labels, mnist[1])
    monkeypatch.setenv(data.MNIST_DIR_ENV, str(MNIST_DIR))  # the new variable wins over the old one
    with pytest.warns(FutureWarning):
        assert data.resolve_data_dir() == MNIST_DIR


@needs_mnist
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_gzip_is_refused_by_md5(tmp_path, damage):
    path = copy_mnist(tmp_path / "mnist") / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError) as info:
        data.load_mnist("test", data_dir=tmp_path)
    message = str(info.value)
    assert str(path) in message and "md5" in message
    assert data.MNIST_MD5[path.name] in message and "training.data download" in message


def test_missing_files_name_every_path_and_the_fix(tmp_path):
    with pytest.raises(data.DataError) as info:
        data.load_mnist("test", data_dir=tmp_path)
    message = str(info.value)
    for name in data.MNIST_FILES["test"]:
        assert str(tmp_path / "mnist" / f"{name}.gz") in message
        assert str(tmp_path / name) in message
    assert f"python -m training.data download --data-dir {tmp_path}" in message


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        data.load_mnist("validation")


@needs_mnist
def test_uncompressed_idx_reads_the_same(tmp_path, mnist):
    for name in TEST_FILES:
        (tmp_path / name.removesuffix(".gz")).write_bytes(gzip.decompress((MNIST_DIR / name).read_bytes()))
    images, labels = data.load_mnist("test", data_dir=tmp_path)
    np.testing.assert_array_equal(images, mnist[0])
    np.testing.assert_array_equal(labels, mnist[1])


@needs_mnist
def test_uncompressed_idx_with_bad_header_or_size_is_refused(tmp_path):
    raw = gzip.decompress((MNIST_DIR / TEST_FILES[0]).read_bytes())
    shutil.copyfile(MNIST_DIR / TEST_FILES[1], tmp_path / TEST_FILES[1])
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(raw[:-100])
    with pytest.raises(data.DataError, match="truncated") as info:
        data.load_mnist("test", data_dir=tmp_path)
    assert str(images) in str(info.value)
    images.write_bytes(b"\x00\x00\x08\x01" + raw[4:])
    with pytest.raises(data.DataError, match="magic number"):
        data.load_mnist("test", data_dir=tmp_path)
    images.write_bytes(raw[:6])
    with pytest.raises(data.DataError, match="header"):
        data.load_mnist("test", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------- download


@needs_mnist
def test_download_from_a_file_mirror_verifies_and_caches(tmp_path, monkeypatch, mnist):
    dead = (tmp_path / "dead").as_uri() + "/"
    good = MNIST_DIR.as_uri() + "/"
    monkeypatch.setattr(data, "MIRRORS", (dead, good))
    cache = tmp_path / "cache"
    images, labels = data.load_mnist("test", data_dir=cache, download=True)
    np.testing.assert_array_equal(images, mnist[0])
    np.testing.assert_array_equal(labels, mnist[1])
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(TEST_FILES)
    # Intact cached files are kept: a second download needs no reachable mirror.
    assert data.download_mnist(cache, ["test"], mirrors=[dead]) == [cache / "mnist" / n for n in TEST_FILES]


@needs_mnist
def test_corrupt_mirror_is_rejected_and_leaves_nothing(tmp_path):
    mirror = copy_mnist(tmp_path / "mirror")
    for name in TEST_FILES:
        raw = (mirror / name).read_bytes()
        (mirror / name).write_bytes(raw[:-10])
    cache = tmp_path / "cache"
    with pytest.raises(OSError) as info:
        data.download_mnist(cache, ["test"], mirrors=[mirror.as_uri() + "/"])
    assert "md5" in str(info.value)
    assert not (cache / "mnist").exists() or not any((cache / "mnist").iterdir())


@needs_mnist
def test_cli_check_and_download(tmp_path, capsys):
    assert data.main(["check", "--data-dir", str(SHARED / "data"), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "test: 10000 images 28x28" in out and "textures: 10 object + 10 background" in out
    assert data.main(["check", "--data-dir", str(tmp_path), "--split", "test"]) == 1
    assert "training.data download" in capsys.readouterr().err
    # No network in tests: a download with every mirror unreachable fails cleanly, without a traceback.
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from training import data; data.MIRRORS = ('file:///nonexistent/',);"
         " sys.exit(data.main(sys.argv[1:]))", "download", "--data-dir", str(tmp_path), "--split", "test"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1 and "could not download" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------- double-colored


@needs_mnist
def test_binarise_matches_pillow_nearest_resize(digits):
    images = digits[0][:300]
    mask = data.binarise_digits(images)
    assert mask.shape == (300, 1, 32, 32) and mask.dtype == np.float32
    assert set(np.unique(mask)) == {0.0, 1.0}
    pillow = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.NEAREST)) for im in images])
    np.testing.assert_array_equal(mask[:, 0], (pillow / 255 > 0.1).astype(np.float32))


def per_image_colours(result: data.DigitImages, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Digit and background colour of each image in [0, 1], after checking each part is one flat colour."""
    x = (result.images.astype(np.float64) + 1) / 2
    m = mask[:, 0].astype(bool)
    digit = np.stack([im[:, mk].mean(axis=1) for im, mk in zip(x, m)])
    background = np.stack([im[:, ~mk].mean(axis=1) for im, mk in zip(x, m)])
    expected = np.where(m[:, None], digit[:, :, None, None], background[:, :, None, None])
    np.testing.assert_allclose(x, expected, atol=1e-6)  # binarised: every pixel is digit or background colour
    return digit, background


def assert_recipe_output(result: data.DigitImages, n: int) -> None:
    assert result.images.shape == (n, 3, 32, 32) and result.images.dtype == np.float32
    assert result.images.min() >= -1 and result.images.max() <= 1
    for field in (result.labels, result.fg_index, result.bg_index):
        assert field.shape == (n,) and field.dtype == np.int64


def test_palette():
    assert data.PALETTE.shape == (10, 3) and data.PALETTE.dtype == np.float32
    np.testing.assert_allclose(data.PALETTE[3], [1.0, 69 / 255, 0.0])  # orangered
    np.testing.assert_array_equal(data.DIGIT_PALETTE, np.roll(data.PALETTE, -4, axis=0))
    with pytest.raises(ValueError):
        data.PALETTE[0, 0] = 0.5


def test_the_colours_the_playground_names_are_the_colours_painted():
    """core.vocabulary names double-coloured label k's digit and background colour: the names are the colours."""
    from PIL import ImageColor

    from core.vocabulary import LABEL_NAMES

    names = LABEL_NAMES["double_colored_mnist"]
    for mechanism, palette in (("texture", data.DIGIT_PALETTE), ("background", data.PALETTE)):
        for k, name in enumerate(names[mechanism]):
            colour = "#b03060" if name == "maroon" else name  # X11's maroon; CSS's is #800000
            np.testing.assert_array_equal(np.float32(ImageColor.getrgb(colour)) / np.float32(255), palette[k])


@needs_mnist
def test_double_colored_train_colours_follow_the_label(digits):
    images, labels = digits[0][:1000], digits[1][:1000]
    result = data.build_double_colored(images, labels, style="train", seed=0)
    assert_recipe_output(result, 1000)
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_array_equal(result.fg_index, labels)
    np.testing.assert_array_equal(result.bg_index, labels)
    digit, background = per_image_colours(result, data.binarise_digits(images))
    assert np.abs(background - data.PALETTE[labels]).max() < 0.05  # 5σ of the 0.01 jitter
    assert np.abs(digit - data.PALETTE[(labels + 4) % 10]).max() < 0.05
    assert np.abs(background - data.PALETTE[labels]).max() > 0.005  # the jitter is really there
    assert 0.007 < np.std(background - data.PALETTE[labels]) < 0.013


@needs_mnist
def test_double_colored_test_colours_are_independent_of_the_label(digits):
    images, labels = digits
    result = data.build_double_colored(images, labels, style="test", seed=1)
    assert_recipe_output(result, len(labels))
    np.testing.assert_array_equal(result.labels, labels)
    assert abs(np.mean(result.bg_index == labels) - 0.1) < 0.03
    assert abs(np.mean(result.fg_index == labels) - 0.1) < 0.03
    # χ² of the 10×10 table bg_index × fg_index: 81 degrees of freedom, mean 81, sd ≈ 12.7.
    table = np.zeros((10, 10))
    np.add.at(table, (result.bg_index, result.fg_index), 1)
    expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
    assert ((table - expected) ** 2 / expected).sum() < 150
    # The indices returned are the ones drawn: nearest palette colour recovers them.
    digit, background = per_image_colours(result, data.binarise_digits(images))
    nearest = lambda colours, palette: np.argmin(((colours[:, None] - palette[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest(background, data.PALETTE), result.bg_index)
    np.testing.assert_array_equal(nearest(digit, data.DIGIT_PALETTE), result.fg_index)


@needs_mnist
@pytest.mark.parametrize("style", ["train", "test"])
def test_double_colored_is_deterministic_per_seed(digits, style):
    images, labels = digits[0][:300], digits[1][:300]
    first = data.build_double_colored(images, labels, style=style, seed=7)
    again = data.build_double_colored(images, labels, style=style, seed=7)
    other = data.build_double_colored(images, labels, style=style, seed=8)
    for field in ("images", "fg_index", "bg_index"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    assert not np.array_equal(first.images, other.images)


def test_recipe_arguments_are_checked():
    images = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(ValueError, match="style"):
        data.build_double_colored(images, [0, 1], style="val")
    with pytest.raises(ValueError, match="labels"):
        data.build_double_colored(images, [0, 1, 2])
    with pytest.raises(ValueError, match="labels"):
        data.build_double_colored(images, [0, 10])


# ----------------------------------------------------------------------------------------- wildlife


@pytest.fixture(scope="module")
def textures():
    return data.load_textures(TEXTURE_DIR)


def padded(texture: np.ndarray) -> np.ndarray:
    return np.pad(texture, ((3, 3), (3, 3), (0, 0)), mode="reflect")


def crop_found_in(crop: np.ndarray, mask: np.ndarray, texture: np.ndarray) -> bool:
    """Whether the masked pixels of `crop` [32, 32, 3] equal some 32×32 window of the reflect-padded texture."""
    windows = np.lib.stride_tricks.sliding_window_view(padded(texture), (32, 32), axis=(0, 1))  # [.., 3, 32, 32]
    target = crop.transpose(2, 0, 1)
    return any(
        np.abs(windows[oy] - target)[:, :, mask].max(axis=(1, 2)).min() < 1e-5 for oy in range(windows.shape[0])
    )


@needs_textures
def test_textures_load(textures):
    for kind in ("object", "background"):
        assert textures[kind].shape == (10, 150, 150, 3) and textures[kind].dtype == np.float32
        assert 0 <= textures[kind].min() and textures[kind].max() <= 1
    with Image.open(next((TEXTURE_DIR / "object").glob("4_*.jpg"))) as image:
        expected = np.asarray(image.convert("RGB").resize((150, 150), Image.NEAREST)) / 255
    np.testing.assert_allclose(textures["object"][4], expected, atol=1e-6)


@needs_textures
def test_each_texture_the_playground_names_is_the_file_of_its_label():
    from core.vocabulary import WILDLIFE_BACKGROUNDS, WILDLIFE_TEXTURES

    for kind, table in (("object", WILDLIFE_TEXTURES), ("background", WILDLIFE_BACKGROUNDS)):
        files = sorted(path.stem for path in (TEXTURE_DIR / kind).glob("*.jpg"))
        assert files == [f"{k}_{stem}" for k, (_, stem) in enumerate(table)]


def test_missing_textures_name_the_path(tmp_path):
    (tmp_path / "object").mkdir()
    with pytest.raises(data.DataError) as info:
        data.build_wildlife(np.zeros((1, 28, 28), np.uint8), [0], texture_dir=tmp_path)
    assert str(tmp_path / "object" / "0_*.jpg") in str(info.value)


@needs_mnist
@needs_textures
@pytest.mark.parametrize("style", ["train", "test"])
def test_wildlife_crops_come_from_the_right_textures(digits, textures, style):
    images, labels = digits[0][:400], digits[1][:400]
    result = data.build_wildlife(images, labels, style=style, seed=3, texture_dir=TEXTURE_DIR)
    assert_recipe_output(result, 400)
    np.testing.assert_array_equal(result.labels, labels)
    if style == "train":
        np.testing.assert_array_equal(result.fg_index, labels)
        np.testing.assert_array_equal(result.bg_index, labels)
    else:
        assert 0.05 < np.mean(result.bg_index == labels) < 0.16
        assert 0.05 < np.mean(result.fg_index == labels) < 0.16
    mask = data.binarise_digits(images)[:, 0].astype(bool)
    x = ((result.images + 1) / 2).transpose(0, 2, 3, 1)
    # Per drawn index, the mean colour of the background pixels is nearest that background texture's mean
    # (single crops of similar textures can be confused; the class averages cannot).
    texture_means = textures["background"].mean(axis=(1, 2))
    bg_means = np.stack([im[~mk].mean(axis=0) for im, mk in zip(x, mask)])
    for k in range(10):
        class_mean = bg_means[result.bg_index == k].mean(axis=0)
        assert np.argmin(((texture_means - class_mean) ** 2).sum(-1)) == k
    # Exactly: the pixels of a few images are a window of their textures, reflect-padded by 3.
    for i in range(4):
        assert crop_found_in(x[i], ~mask[i], textures["background"][result.bg_index[i]])
        assert crop_found_in(x[i], mask[i], textures["object"][result.fg_index[i]])


@needs_mnist
@needs_textures
def test_wildlife_is_deterministic_per_seed(digits):
    images, labels = digits[0][:200], digits[1][:200]
    first = data.build_wildlife(images, labels, style="test", seed=5, texture_dir=TEXTURE_DIR)
    again = data.build_wildlife(images, labels, style="test", seed=5, texture_dir=TEXTURE_DIR)
    other = data.build_wildlife(images, labels, style="test", seed=6, texture_dir=TEXTURE_DIR)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.bg_index, again.bg_index)
    assert not np.array_equal(first.images, other.images)
    train = data.build_wildlife(images, labels, style="train", seed=5, texture_dir=TEXTURE_DIR)
    assert not np.array_equal(train.images, data.build_wildlife(images, labels, "train", 6, TEXTURE_DIR).images)
