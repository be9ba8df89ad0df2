"""Where the tests find ../shared (real MNIST, textures and the official CGN teachers)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SKDCGN_SHARED", REPO.parent / "shared"))
TEACHERS_DIR = SHARED / "teachers" / "cgn_mnist"
MNIST_DIR = SHARED / "data" / "mnist"
TEXTURE_DIR = SHARED / "data" / "textures"

needs_shared = pytest.mark.skipif(
    not TEACHERS_DIR.is_dir(), reason=f"shared data not found at {SHARED} (set SKDCGN_SHARED)"
)
