"""Counterfactual composition x = m·f + (1−m)·b, the texture shuffler and the mask modifiers (numpy only)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

# Each mask modifier's bounds, default and meaning: the dataclass below and the HTTP schema read this one table.
MODIFIER_FIELDS = {
    "transparency": ((0.0, 1.0), 1.0, "a: the mask is scaled by a (0.75 keeps 3/4)"),
    "rotation_deg": ((0.0, 180.0), 0.0, "r: the mask turns by an angle drawn uniformly in [-r, r]"),
    "noise_std": ((0.0, 1.0), 0.0, "σ: the mask gets N(0, σ²) noise, clipped to [0, 1]"),
}


@dataclass(frozen=True)
class MaskModifiers:
    """The shape-mechanism study of the CGN paper: transparency a, rotation within ±r degrees, mask noise σ.

    The random parts (the angle, the noise field) are drawn per sample by core.noise from the sample's seed.
    """

    transparency: float = MODIFIER_FIELDS["transparency"][1]
    rotation_deg: float = MODIFIER_FIELDS["rotation_deg"][1]
    noise_std: float = MODIFIER_FIELDS["noise_std"][1]

    def __post_init__(self):
        for item in fields(self):
            (low, high), value = MODIFIER_FIELDS[item.name][0], getattr(self, item.name)
            if not low <= value <= high:
                raise ValueError(f"mask {item.name}={value} is outside [{low:g}, {high:g}]")

    @property
    def name(self) -> str:
        return "unmodified" if self == UNMODIFIED else "modified"

    def to_dict(self) -> dict:
        return asdict(self)


UNMODIFIED = MaskModifiers()
PAPER_STUDY = MaskModifiers(transparency=0.75, rotation_deg=90.0, noise_std=0.1)  # REFERENCE.md: σ 0.1, r 90, a 0.75


def circular_shift(image: np.ndarray, offsets: tuple[int, int]) -> np.ndarray:
    """CGN's shuffler: tile the image 2×2 and crop a window at `offsets`, i.e. a circular shift.

    `image` is [..., C, H, W]; window (dy, dx) of the tiled image starts at row dy, column dx.
    """
    dy, dx = offsets
    return np.roll(image, shift=(-int(dy), -int(dx)), axis=(-2, -1))


def compose(mask: np.ndarray, foreground: np.ndarray, background: np.ndarray) -> np.ndarray:
    """x = m·f + (1−m)·b; the mask [.., 1, H, W] broadcasts over the colour channels."""
    return mask * foreground + (1.0 - mask) * background


def rotate(image: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate [..., H, W] about the image centre with bilinear sampling; outside the source reads 0."""
    if angle_deg == 0:
        return image
    height, width = image.shape[-2:]
    theta = np.deg2rad(angle_deg)
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    # Inverse map: for each output pixel, where it comes from in the source.
    src_y = np.cos(theta) * (rows - cy) - np.sin(theta) * (cols - cx) + cy
    src_x = np.sin(theta) * (rows - cy) + np.cos(theta) * (cols - cx) + cx
    y0, x0 = np.floor(src_y).astype(int), np.floor(src_x).astype(int)
    wy, wx = src_y - y0, src_x - x0
    out = np.zeros_like(image, dtype=np.float64)
    for dy, dx, weight in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx), (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
        yy, xx = y0 + dy, x0 + dx
        valid = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        sampled = image[..., np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1)]
        out += np.where(valid, weight, 0.0) * sampled
    return out.astype(image.dtype)


def modify_mask(
    mask: np.ndarray,
    transparency: float = 1.0,
    rotation_deg: float = 0.0,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """The paper's shape-mechanism study: rotate, add Gaussian noise (clipped to [0, 1]), then scale by a.

    `rotation_deg` is the angle actually applied (drawn by core.noise); `noise` is the drawn N(0, σ²) field.
    """
    out = rotate(mask, rotation_deg)
    if noise is not None:
        out = np.clip(out + noise, 0.0, 1.0)
    return (out * transparency).astype(mask.dtype)


def compose_samples(
    mask: np.ndarray,
    texture: np.ndarray,
    background: np.ndarray,
    noises: list,
    texture_shuffle: bool,
    transparency: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample post-processing and composition of a batch of mechanism outputs.

    `noises` holds one core.noise.SampleNoise per sample: its shuffle offsets (applied when the family
    shuffles textures) and its mask-modifier draws. Returns (composite, mask, texture, background) as
    actually composed, so callers can return exactly the components that made the image.
    """
    mask = mask.copy()
    texture = texture.copy()
    background = background.copy()
    for i, noise in enumerate(noises):
        if texture_shuffle:
            texture[i] = circular_shift(texture[i], noise.shift_texture)
            background[i] = circular_shift(background[i], noise.shift_background)
        if noise.rotation_deg or noise.mask_noise is not None or transparency != 1.0:
            mask[i] = modify_mask(mask[i], transparency, noise.rotation_deg, noise.mask_noise)
    return compose(mask, texture, background), mask, texture, background
