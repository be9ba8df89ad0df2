"""Real MNIST and the biased Colored-MNIST recipes (double-colored, wildlife) the CGN teachers were trained on.

Torch-free (numpy + Pillow) so evaluation, workers and tests can build the same images. MNIST comes from
local IDX files (gzipped ones are MD5-checked against the official values) or, on request, from public
mirrors via training.fetch. Every recipe returns float32 [N, 3, 32, 32] in [-1, 1], the teachers' range,
and is a pure function of its inputs and `seed` (numpy PCG64), so a data set can be rebuilt exactly.

CLI: `python -m training.data download --data-dir DIR` and `python -m training.data check --data-dir DIR`.
"""
from __future__ import annotations

import argparse
import gzip
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageColor

from core.compose import compose
from core.settings import PREFIX, Paths
from core.vocabulary import DIGIT_COLOUR_SHIFT, DOUBLE_COLORED_PALETTE
from training import fetch
from training.fetch import ChecksumError

MNIST_DIR_ENV = PREFIX + "MNIST_DIR"  # read by core.settings.Paths (the old SKDCGN_DATA_DIR still works, with a warning)
DEFAULT_DATA_DIR = Paths.mnist_dir
SPLITS = ("train", "test")
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# Tried in order; yann.lecun.com is last because it often refuses scripted downloads.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension

NUM_CLASSES = 10
IMAGE_SIZE = 32
BINARISE_THRESHOLD = 0.1
COLOR_JITTER_STD = 0.01


def _palette(names: Sequence[str]) -> np.ndarray:
    """CSS colours (#rrggbb or names) → read-only float32 [len, 3] in [0, 1] (read-only: shared module constants)."""
    palette = np.array([ImageColor.getrgb(name) for name in names], dtype=np.float32) / np.float32(255)
    palette.flags.writeable = False
    return palette


# Double-colored background colour of class k is PALETTE[k]; its digit colour is DIGIT_PALETTE[k], i.e.
# PALETTE[(k + 4) % 10] (core.vocabulary's table, which names them too). Nearest-row matching against these
# recovers bg_index / fg_index from an image.
PALETTE_COLOURS = tuple(colour for _, colour in DOUBLE_COLORED_PALETTE)
PALETTE = _palette(PALETTE_COLOURS)
DIGIT_PALETTE = _palette(PALETTE_COLOURS[DIGIT_COLOUR_SHIFT:] + PALETTE_COLOURS[:DIGIT_COLOUR_SHIFT])

TEXTURE_SIZE = 150
TEXTURE_PAD = 3
TEXTURE_KINDS = ("object", "background")


class DataError(ValueError):
    """A data file or folder is missing or malformed; the message says which and how to fix it."""


# ----------------------------------------------------------------------------------------------- MNIST


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: the argument, else core.settings.Paths.mnist_dir ($SKDCGN_MNIST_DIR, else
    ~/.cache/skdcgn/data)."""
    if data_dir is None:
        return Paths.from_env().mnist_dir
    return Path(data_dir).expanduser()


def _candidates(root: Path, name: str) -> list[Path]:
    """Where `name` may live: `<root>/mnist/` or `<root>` itself; the gzipped (MD5-checkable) copy first."""
    return [folder / f"{name}{suffix}" for folder in (root / "mnist", root) for suffix in (".gz", "")]


def _parse_idx(data: bytes, path: Path, magic: int) -> np.ndarray:
    """Decode an IDX array of unsigned bytes, checking the magic number and the size the header implies."""
    ndim = magic & 0xFF
    header_size = 4 * (1 + ndim)
    if len(data) < header_size:
        raise DataError(f"{path}: {len(data)} bytes is too short for an IDX header; the file is truncated")
    header = np.frombuffer(data, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise DataError(
            f"{path}: bad IDX header, magic number {int(header[0]):#010x}, expected {magic:#010x}; "
            "this is not the MNIST file its name says"
        )
    shape = tuple(int(d) for d in header[1:])
    expected = header_size + math.prod(shape)
    if len(data) != expected:
        raise DataError(
            f"{path}: the IDX header promises an array of shape {shape} ({expected} bytes in all) "
            f"but the file holds {len(data)} bytes; it is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file; a gzipped one must match the official MD5 before it is even decompressed."""
    if path.suffix != ".gz":
        return _parse_idx(path.read_bytes(), path, magic)
    fetch.verify(path, MNIST_MD5[path.name], "md5")
    with gzip.open(path, "rb") as handle:
        return _parse_idx(handle.read(), path, magic)


def download_mnist(
    data_dir: str | os.PathLike | None = None,
    splits: Sequence[str] = SPLITS,
    mirrors: Sequence[str] | None = None,
) -> list[Path]:
    """Fetch the gzipped MNIST files into `<data_dir>/mnist/`, keeping those already there and intact.

    Each file is tried mirror by mirror (default MIRRORS) and must match its official MD5; nothing
    unverified is ever left in the cache. Raises OSError naming every mirror's failure.
    """
    folder = resolve_data_dir(data_dir) / "mnist"
    urls = MIRRORS if mirrors is None else mirrors
    paths = []
    for split in splits:
        for name in MNIST_FILES[split]:
            target = folder / f"{name}.gz"
            expected = MNIST_MD5[target.name]
            if not (target.is_file() and fetch.file_digest(target, "md5") == expected):
                fetch.download([url + target.name for url in urls], target, expected, "md5")
            paths.append(target)
    return paths


def load_mnist(
    split: str = "test",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST `split` as (images uint8 [N, 28, 28], labels int64 [N]).

    Files are looked for in `<data_dir>/mnist/` and in `data_dir` itself, gzipped (MD5-checked) or plain.
    `download=True` first makes `<data_dir>/mnist/` hold intact gzipped files, fetching from MIRRORS
    whatever is missing or corrupt there.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"unknown MNIST split {split!r}; expected one of {SPLITS}")
    root = resolve_data_dir(data_dir)
    if download:
        download_mnist(root, [split])
    fix = f"`python -m training.data download --data-dir {root}` (or load_mnist(download=True))"
    names = MNIST_FILES[split]
    found = {name: next((p for p in _candidates(root, name) if p.is_file()), None) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        looked = "\n  ".join(str(p) for name in missing for p in _candidates(root, name))
        raise DataError(
            f"MNIST {split} files not found; looked for:\n  {looked}\n"
            f"Fetch them with {fix}, or point data_dir / ${MNIST_DIR_ENV} at a folder holding them."
        )
    try:
        images = _read_idx(found[names[0]], IDX_IMAGES_MAGIC)
        labels = _read_idx(found[names[1]], IDX_LABELS_MAGIC).astype(np.int64)
    except ChecksumError as exc:
        raise ChecksumError(f"{exc}; fetch an intact copy with {fix}") from exc
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(
            f"MNIST {split}: images {images.shape} and labels {labels.shape} do not pair up as N×28×28 and N"
        )
    return images, labels


# ------------------------------------------------------------------------------------------------ recipes


@dataclass(frozen=True, eq=False)
class DigitImages:
    """Composed digits plus the class indices of the colours/textures each image wears.

    Evaluation needs the indices to tell shape from colour/texture: fg_index k means the digit wears
    class k's digit colour (DIGIT_PALETTE[k]) or object texture; bg_index k, class k's background.
    """

    images: np.ndarray  # float32 [N, 3, 32, 32] in [-1, 1]
    labels: np.ndarray  # int64 [N], the digit's class
    fg_index: np.ndarray  # int64 [N]
    bg_index: np.ndarray  # int64 [N]


def binarise_digits(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] digits → float32 mask [N, 1, 32, 32] of 0/1: nearest resize to 32, then > 0.1.

    Index arithmetic reproduces Pillow's nearest-neighbour resize (source pixel floor((i + 0.5)·28/32)).
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected digits [N, H, W], got shape {images.shape}")
    rows = ((np.arange(IMAGE_SIZE) + 0.5) * images.shape[1] / IMAGE_SIZE).astype(np.intp)
    cols = ((np.arange(IMAGE_SIZE) + 0.5) * images.shape[2] / IMAGE_SIZE).astype(np.intp)
    resized = images[:, rows[:, None], cols[None, :]].astype(np.float32) / 255
    return (resized > BINARISE_THRESHOLD).astype(np.float32)[:, None]


def _style_indices(labels: np.ndarray, style: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(fg_index, bg_index): the label's own for "train" (the bias), uniform and independent for "test"."""
    if style == "train":
        return labels.copy(), labels.copy()
    if style == "test":
        fg_index = rng.integers(0, NUM_CLASSES, size=len(labels), dtype=np.int64)
        bg_index = rng.integers(0, NUM_CLASSES, size=len(labels), dtype=np.int64)
        return fg_index, bg_index
    raise ValueError(f"unknown style {style!r}; expected 'train' (biased) or 'test' (random colours/textures)")


def _checked_labels(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"labels {labels.shape} do not match {len(images)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}")
    return labels


def _to_signed(images01: np.ndarray) -> np.ndarray:
    return (images01 * 2 - 1).astype(np.float32)


def build_double_colored(images: np.ndarray, labels: np.ndarray, style: str = "train", seed: int = 0) -> DigitImages:
    """Double-colored MNIST: a coloured digit on a coloured background, both colours jittered per image.

    Random draws, in order: fg_index, bg_index (test style only), then the N(0, 0.01²) jitter [N, 2, 3]
    (digit, background) that is constant over each image and clipped to [0, 1].
    """
    labels = _checked_labels(images, labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    fg_index, bg_index = _style_indices(labels, style, rng)
    jitter = rng.normal(0.0, COLOR_JITTER_STD, size=(len(labels), 2, 3)).astype(np.float32)
    digit = np.clip(DIGIT_PALETTE[fg_index] + jitter[:, 0], 0, 1)[:, :, None, None]
    background = np.clip(PALETTE[bg_index] + jitter[:, 1], 0, 1)[:, :, None, None]
    composed = compose(binarise_digits(images), digit, background)
    return DigitImages(_to_signed(composed), labels, fg_index, bg_index)


def resolve_texture_dir(
    texture_dir: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None
) -> Path:
    """The texture root holding object/ and background/: the argument, else `<data_dir>/textures`."""
    return Path(texture_dir).expanduser() if texture_dir is not None else resolve_data_dir(data_dir) / "textures"


def load_textures(
    texture_dir: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """{"object", "background"} → float32 [10, 150, 150, 3] in [0, 1]; class K reads `<kind>/K_*.jpg`."""
    root = resolve_texture_dir(texture_dir, data_dir)
    textures = {}
    for kind in TEXTURE_KINDS:
        per_class = []
        for k in range(NUM_CLASSES):
            matches = sorted((root / kind).glob(f"{k}_*.jpg"))
            if len(matches) != 1:
                problem = "no file matches" if not matches else f"{len(matches)} files match"
                raise DataError(
                    f"{problem} {root / kind / f'{k}_*.jpg'} (need exactly one {kind} texture for class {k}); "
                    "copy mnists/data/textures from the CGN repository and pass texture_dir, "
                    f"or put them under <data_dir>/textures"
                )
            with Image.open(matches[0]) as image:
                resized = image.convert("RGB").resize((TEXTURE_SIZE, TEXTURE_SIZE), Image.NEAREST)
            per_class.append(np.asarray(resized, dtype=np.float32) / 255)
        textures[kind] = np.stack(per_class)
    return textures


def _random_crops(textures: np.ndarray, index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """torchvision's RandomCrop(32, padding=3, reflect) of textures[index] → [N, 3, 32, 32]."""
    pad = TEXTURE_PAD
    padded = np.pad(textures, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    offsets = rng.integers(0, padded.shape[1] - IMAGE_SIZE + 1, size=(len(index), 2))
    window = np.arange(IMAGE_SIZE)
    rows = (offsets[:, 0, None] + window)[:, :, None]
    cols = (offsets[:, 1, None] + window)[:, None, :]
    crops = padded[index[:, None, None], rows, cols]  # [N, 32, 32, 3]
    return crops.transpose(0, 3, 1, 2)


def build_wildlife(
    images: np.ndarray,
    labels: np.ndarray,
    style: str = "train",
    seed: int = 0,
    texture_dir: str | os.PathLike | None = None,
) -> DigitImages:
    """Wildlife MNIST: the digit cut from a striped object texture over a veined background texture.

    Random draws, in order: fg_index, bg_index (test style only), then the object crops' offsets and the
    background crops' offsets, each crop independent.
    """
    labels = _checked_labels(images, labels)
    textures = load_textures(texture_dir)
    rng = np.random.Generator(np.random.PCG64(seed))
    fg_index, bg_index = _style_indices(labels, style, rng)
    digit = _random_crops(textures["object"], fg_index, rng)
    background = _random_crops(textures["background"], bg_index, rng)
    composed = compose(binarise_digits(images), digit, background)
    return DigitImages(_to_signed(composed), labels, fg_index, bg_index)


# ---------------------------------------------------------------------------------------------------- CLI


def _check(data_dir: Path | None, splits: Sequence[str]) -> int:
    status = 0
    for split in splits:
        try:
            images, labels = load_mnist(split, data_dir)
        except (DataError, ChecksumError) as exc:
            print(f"{split}: {exc}", file=sys.stderr)
            status = 1
            continue
        counts = " ".join(f"{k}:{n}" for k, n in enumerate(np.bincount(labels, minlength=NUM_CLASSES)))
        print(f"{split}: {len(images)} images {images.shape[1]}x{images.shape[2]}, per label {counts}")
    try:
        textures = load_textures(data_dir=data_dir)
    except DataError as exc:
        print(f"textures: {exc}", file=sys.stderr)
        return 1
    sizes = " + ".join(f"{len(textures[kind])} {kind}" for kind in TEXTURE_KINDS)
    print(f"textures: {sizes} in {resolve_texture_dir(data_dir=data_dir)}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data", description="Fetch or check MNIST data.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command, text in (
        ("download", "fetch the MNIST files from public mirrors (MD5-verified) into DATA_DIR/mnist"),
        ("check", "load MNIST (and the Wildlife textures) and print counts; exit 1 if anything is missing"),
    ):
        sub = commands.add_parser(command, help=text, description=text)
        sub.add_argument(
            "--data-dir", type=Path, default=None,
            help=f"data root (default ${MNIST_DIR_ENV}, else {DEFAULT_DATA_DIR})",
        )
        sub.add_argument("--split", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits (default both)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args.data_dir, args.split)
    try:
        for path in download_mnist(args.data_dir, args.split):
            print(f"ok {path}")
    except OSError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
