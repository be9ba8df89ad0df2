"""Where the tests find things: the checkout (REPO, defined here and nowhere else in tests/), the model
repository the service tests copy, and ../shared (real MNIST, textures and the official CGN teachers).

Folders come from core.settings.Paths, so SKDCGN_SHARED and SKDCGN_MODELS_DIR move them as they move the
project's own defaults (a relative models folder is taken relative to the checkout).
"""
from __future__ import annotations

import pytest

from core.settings import REPO_ROOT, Paths

REPO = REPO_ROOT
_PATHS = Paths.from_env()
SHARED = _PATHS.shared_dir
MODELS_SOURCE = REPO / _PATHS.models_dir  # the trained repository the service tests copy
TEACHERS_DIR = SHARED / "teachers" / "cgn_mnist"
MNIST_DIR = SHARED / "data" / "mnist"
TEXTURE_DIR = SHARED / "data" / "textures"

needs_shared = pytest.mark.skipif(
    not TEACHERS_DIR.is_dir(), reason=f"shared data not found at {SHARED} (set SKDCGN_SHARED)"
)
