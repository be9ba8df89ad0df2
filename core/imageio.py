"""Image encoding: model outputs in [-1, 1] or masks in [0, 1] to uint8 HWC, grids and PNG/JPEG bytes."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """[..., C, H, W] floats in `value_range` to [..., H, W, C] uint8 (a 1-channel mask becomes grey RGB)."""
    low, high = value_range
    scaled = np.clip((np.asarray(images, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    out = np.rint(scaled * 255.0).astype(np.uint8)
    out = np.moveaxis(out, -3, -1)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out


def grid(images: np.ndarray, columns: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 [N, H, W, C] images into one [H', W', C] picture, row by row."""
    count, height, width, channels = images.shape
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    canvas = np.full(
        (rows * height + (rows + 1) * pad, columns * width + (columns + 1) * pad, channels), pad_value, np.uint8
    )
    for index in range(count):
        r, c = divmod(index, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        canvas[top : top + height, left : left + width] = images[index]
    return canvas


def encode(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """uint8 [H, W, C] to PNG or JPEG bytes."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt.lower() in ("jpg", "jpeg"):
        pil.save(buffer, format="JPEG", quality=quality)
    else:
        pil.save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def labelled_rows(rows: Sequence[np.ndarray], columns: int, scale: int = 1, pad: int = 2) -> np.ndarray:
    """Stack several rows of uint8 [N, H, W, C] images (each row `columns` wide) into one grid, upscaled."""
    stacked = np.concatenate([np.asarray(row) for row in rows], axis=0)
    if scale > 1:
        stacked = stacked.repeat(scale, axis=1).repeat(scale, axis=2)
    return grid(stacked, columns=columns, pad=pad)
