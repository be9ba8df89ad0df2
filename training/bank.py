"""The sample bank: exact (z, y, T(z, y)) triples from the teacher, stored on disk in chunks.

Each chunk is a folder of .npy files (z, y and one array per mechanism) written atomically, so an
interrupted generation resumes at the first missing chunk and training can memory-map chunks that do
not fit in memory. Masks stay in [0, 1] and images in [-1, 1], exactly as the teacher gave them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from core.atomic import atomic_directory, write_text_atomic
from core.manifest import MECHANISM_OUTPUTS

SPLIT_STREAM = {"train": 0, "heldout": 1}


class BankError(ValueError):
    pass


@dataclass
class BankSpec:
    teacher: str
    teacher_sha256: str
    mechanisms: Sequence[str]
    size: int
    heldout: int
    chunk_size: int
    seed: int
    z_dim: int
    n_classes: int
    classes: Sequence[int] | None = None
    truncation: float | None = None  # the noise truncation, for teachers that have one (ImageNet)

    def to_dict(self) -> dict:
        out = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.__dict__.items()}
        if out["truncation"] is None:  # banks written before this field existed stay valid
            del out["truncation"]
        return out


def chunk_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SPLIT_STREAM[split], index])))


def generate_bank(
    query: Callable[[str, np.ndarray, np.ndarray], np.ndarray],
    spec: BankSpec,
    bank_dir: str | os.PathLike,
    draw_z: Callable[[np.random.Generator, int], np.ndarray] | None = None,
    progress: bool = True,
) -> Path:
    """Query `query(mechanism, z, y)` chunk by chunk; existing complete chunks are kept (resume).

    A bank folder made for another teacher or settings is refused rather than silently mixed.
    """
    bank_dir = Path(bank_dir)
    meta_path = bank_dir / "bank.json"
    if meta_path.exists():
        existing = json.loads(meta_path.read_text())
        if existing != spec.to_dict():
            raise BankError(f"{bank_dir} holds a bank with other settings ({existing}); choose another folder")
    else:
        bank_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(meta_path, json.dumps(spec.to_dict(), indent=2))
    draw_z = draw_z or (lambda rng, n: rng.standard_normal((n, spec.z_dim)).astype(np.float32))
    classes = np.asarray(spec.classes if spec.classes is not None else range(spec.n_classes))
    for split, total in (("train", spec.size), ("heldout", spec.heldout)):
        n_chunks = -(-total // spec.chunk_size)
        todo = [k for k in range(n_chunks) if not (bank_dir / split / f"chunk_{k:05d}").is_dir()]
        for k in tqdm(todo, desc=f"bank {split}", unit="chunk", disable=not progress):
            rng = chunk_rng(spec.seed, split, k)
            count = min(spec.chunk_size, total - k * spec.chunk_size)
            z = draw_z(rng, count)
            y = rng.choice(classes, size=count).astype(np.int64)
            with atomic_directory(bank_dir / split / f"chunk_{k:05d}") as tmp:
                np.save(tmp / "z.npy", z)
                np.save(tmp / "y.npy", y)
                for mechanism in spec.mechanisms:
                    np.save(tmp / f"{MECHANISM_OUTPUTS[mechanism]}.npy", query(mechanism, z, y).astype(np.float32))
    return bank_dir


class Bank:
    """Read access to one split of a bank: random batches for training, everything for evaluation."""

    def __init__(self, bank_dir: str | os.PathLike, split: str = "train"):
        self.root = Path(bank_dir)
        meta = self.root / "bank.json"
        if not meta.is_file():
            raise BankError(f"no sample bank at {self.root} (missing {meta})")
        self.spec = json.loads(meta.read_text())
        self.chunks = sorted((self.root / split).glob("chunk_*"))
        if not self.chunks:
            raise BankError(f"sample bank {self.root} has no {split} chunks")
        self._arrays = [
            {path.stem: np.load(path, mmap_mode="r") for path in chunk.glob("*.npy")} for chunk in self.chunks
        ]
        self.sizes = np.array([len(arrays["y"]) for arrays in self._arrays])
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def sample(self, key: str, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A random batch (z, y, teacher output) from one chunk chosen in proportion to its size."""
        chunk = rng.choice(len(self.chunks), p=self.sizes / self.sizes.sum())
        arrays = self._arrays[chunk]
        index = np.sort(rng.choice(self.sizes[chunk], size=min(batch_size, self.sizes[chunk]), replace=False))
        return np.asarray(arrays["z"][index]), np.asarray(arrays["y"][index]), np.asarray(arrays[key][index])

    def load(self, keys: Sequence[str], limit: int | None = None) -> dict[str, np.ndarray]:
        """The first `limit` samples (all when None) of the given arrays, reading no chunk beyond them."""
        remaining = len(self) if limit is None else limit
        parts: dict[str, list] = {key: [] for key in keys}
        for arrays in self._arrays:
            take = min(remaining, len(arrays["y"]))
            for key in keys:
                parts[key].append(np.asarray(arrays[key][:take]))
            remaining -= take
            if remaining <= 0:
                break
        return {key: np.concatenate(value) for key, value in parts.items()}

    def take(self, keys: Sequence[str], indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The samples at `indices` (in that order), read from the memory-mapped chunks: 256-px banks
        are far larger than memory, so evaluation reads them a batch at a time."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample index out of range for a bank split of {len(self)} samples")
        chunk_of = np.searchsorted(self.offsets, indices, side="right") - 1
        order = np.argsort(chunk_of, kind="stable")
        chunks = np.unique(chunk_of)
        out = {}
        for key in keys:
            pieces = [np.asarray(self._arrays[c][key][indices[chunk_of == c] - self.offsets[c]]) for c in chunks]
            rows = np.concatenate(pieces) if pieces else np.asarray(self._arrays[0][key][:0])
            out[key] = rows[np.argsort(order)]
        return out
