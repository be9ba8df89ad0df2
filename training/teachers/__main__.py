"""`python -m training.teachers sample`: a seeded PNG grid of teacher samples (mask, texture, background, composite)."""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from core.atomic import write_bytes_atomic
from core.compose import compose_samples
from core.imageio import encode, labelled_rows, to_uint8
from core.noise import NoiseSpec, draw_sample_noise
from training.teachers.cgn_mnist import IMAGE_SIZE, LATENT_DIM, N_CLASSES, TEACHERS, load_teacher


def parse_labels(text: str | None, count: int, rng: np.random.Generator) -> np.ndarray:
    if text is None:
        return rng.integers(0, N_CLASSES, size=count)
    labels = np.array([int(part) for part in text.split(",")], dtype=np.int64)
    if labels.min() < 0 or labels.max() >= N_CLASSES:
        raise SystemExit(f"labels must be in 0..{N_CLASSES - 1}, got {text}")
    return labels


def render_teacher_grid(teacher, shape_labels, texture_labels, background_labels, seed: int, scale: int = 3) -> np.ndarray:
    """Rows: mask, texture, background (each before the shuffler), composite; one column per sample."""
    spec = NoiseSpec(dim=LATENT_DIM)
    noises = [draw_sample_noise(seed, i, spec, IMAGE_SIZE) for i in range(len(shape_labels))]
    outputs = {}
    with torch.no_grad():
        for name, labels in (("shape", shape_labels), ("texture", texture_labels), ("background", background_labels)):
            z = torch.from_numpy(np.stack([noise.z[name] for noise in noises]))
            outputs[name] = teacher.mechanism(name)(z, torch.as_tensor(labels, dtype=torch.long)).numpy()
    composite, *_ = compose_samples(outputs["shape"], outputs["texture"], outputs["background"], noises, True)
    rows = [to_uint8(outputs["shape"], (0.0, 1.0)), to_uint8(outputs["texture"]), to_uint8(outputs["background"]),
            to_uint8(composite)]
    return labelled_rows(rows, columns=len(shape_labels), scale=scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.teachers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="render a PNG grid of teacher samples")
    sample.add_argument("--teacher", choices=sorted(TEACHERS), default="double_colored")
    sample.add_argument("--teacher-path", help="checkpoint file or folder holding <teacher>.pth (default: cache or download)")
    sample.add_argument("--labels", help="comma-separated shape labels, one column each (default: random)")
    sample.add_argument("--texture-labels", help="texture labels (default: same as --labels)")
    sample.add_argument("--background-labels", help="background labels (default: same as --labels)")
    sample.add_argument("--columns", type=int, default=10, help="number of columns when labels are random")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    shape_labels = parse_labels(args.labels, args.columns, rng)
    texture_labels = parse_labels(args.texture_labels, len(shape_labels), rng) if args.texture_labels else shape_labels
    background_labels = (
        parse_labels(args.background_labels, len(shape_labels), rng) if args.background_labels else shape_labels
    )
    if not len(shape_labels) == len(texture_labels) == len(background_labels):
        raise SystemExit("--labels, --texture-labels and --background-labels must have the same length")
    teacher = load_teacher(args.teacher, args.teacher_path)
    picture = render_teacher_grid(teacher, shape_labels, texture_labels, background_labels, args.seed)
    write_bytes_atomic(args.out, encode(picture))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
