"""The words every part of SKDCGN shares, spelt once: mechanism names, job states, result formats, and what the
labels of each MNIST family's texture and background mechanisms mean.

The gateway's request and response schemas, the workers, the client and its CLI, training and the playground (through
GET /models) all take them from here. Standard library only: `pip install .[client]` brings core/ with the client,
and nothing here may need more than the client installs.
"""
from __future__ import annotations

# The three mechanisms of a CGN, in the order every tensor, label triple and noise draw uses.
MECHANISMS = ("shape", "texture", "background")

# Dataset jobs: a job is queued, then running, then ends exactly once as succeeded, failed or cancelled.
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
JOB_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ACTIVE_STATES = (QUEUED, RUNNING)
ENDED_STATES = (SUCCEEDED, FAILED, CANCELLED)

# Result formats of a dataset job; the tar formats come in shards of `shard_size` samples.
FORMATS = ("npz", "png", "webdataset")
TAR_FORMATS = ("png", "webdataset")

# --- what the labels mean --------------------------------------------------------------------------------------------
# A shape label is a digit class (the manifest's `labels.names`); a texture or background label of an MNIST family is
# a colour or a texture. These tables name them, per family, for people (the playground's label menus). The manifests
# keep the class names they shipped with: their sha256 is part of every cache key.

# Double-coloured MNIST, the CGN repository's `colors1`: background label k wears DOUBLE_COLORED_PALETTE[k], the digit
# (texture label k) DOUBLE_COLORED_PALETTE[(k + DIGIT_COLOUR_SHIFT) % 10]. (name, colour): the colour is what
# training.data paints; the name is CSS's, except "maroon", which is X11's #b03060 (CSS's maroon is #800000).
DOUBLE_COLORED_PALETTE = (
    ("darkgreen", "#006400"), ("darkblue", "#00008b"), ("maroon", "#b03060"), ("orangered", "#ff4500"),
    ("yellow", "#ffff00"), ("burlywood", "#deb887"), ("lime", "#00ff00"), ("aqua", "#00ffff"),
    ("fuchsia", "#ff00ff"), ("cornflowerblue", "#6495ed"),
)
DIGIT_COLOUR_SHIFT = 4

# Colored MNIST ("Learning Not to Learn"; its data set is not shipped): the digit colour of each class, named from the
# official teacher's texture output averaged over 64 draws per label (#cd1e53, #18767c, #e3d622, #125dc6, #e18433,
# #9232b1, #3edfb5, #f3d2d5, #d5e44b, #a5261d). Its background is black whatever the label.
COLORED_DIGIT_COLOURS = (
    "crimson", "teal", "yellow", "blue", "orange", "purple", "turquoise", "pink", "yellow-green", "brown",
)

# Wildlife MNIST: label k's texture is `textures/object/<k>_<file>.jpg` (striped, from the Describable Textures
# Dataset) and its background `textures/background/<k>_<file>.jpg` (veined). (name, file): the name says what the
# picture shows.
WILDLIFE_TEXTURES = (
    ("brown rings", "striped_0001"), ("yellow stripes", "striped_0091"), ("tiger", "striped_0008"),
    ("pink zebra", "striped_0043"), ("blue-green stripes", "striped_0092"), ("zebra", "striped_0028"),
    ("tiger fur", "striped_0097"), ("orange-white bands", "striped_0004"), ("pale red stripes", "striped_0125"),
    ("yellow-black fur", "striped_0033"),
)
WILDLIFE_BACKGROUNDS = (
    ("green leaf", "veined_0066"), ("maroon swirls", "veined_0067"), ("sage leaves", "veined_0073"),
    ("red-veined leaves", "veined_0180"), ("orange leaf", "veined_0131"), ("dragonfly wing", "veined_0157"),
    ("iris petal", "veined_0158"), ("dark sorrel", "veined_0104"), ("turquoise leaf", "veined_0188"),
    ("striped leaves", "veined_0189"),
)

LABEL_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "colored_mnist": {"texture": COLORED_DIGIT_COLOURS, "background": ("black",) * len(COLORED_DIGIT_COLOURS)},
    "double_colored_mnist": {
        "texture": tuple(name for name, _ in DOUBLE_COLORED_PALETTE[DIGIT_COLOUR_SHIFT:]
                         + DOUBLE_COLORED_PALETTE[:DIGIT_COLOUR_SHIFT]),
        "background": tuple(name for name, _ in DOUBLE_COLORED_PALETTE),
    },
    "wildlife_mnist": {"texture": tuple(name for name, _ in WILDLIFE_TEXTURES),
                       "background": tuple(name for name, _ in WILDLIFE_BACKGROUNDS)},
}


def label_names(family: str, mechanism: str, count: int) -> list[str] | None:
    """The colour or texture names of the `count` labels of `mechanism` in `family`; None where its labels are
    classes, named by a manifest's `labels.names` (digits for shape; ImageNet's classes for every mechanism), or
    where the table does not name exactly `count` labels."""
    table = LABEL_NAMES.get(family, {}).get(mechanism)
    return list(table) if table is not None and len(table) == count else None
