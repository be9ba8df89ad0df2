"""Model repositories for tests (a helper module, not a test module): a copy of the trained repository for
the service tests, and tiny untrained students exported with the project's exporter.

Fixtures built on these live in tests/conftest.py; test modules import only the names below.
"""
from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest

from core.manifest import ManifestError, latest_version
from tests.paths import MODELS_SOURCE

FAMILY = "double_colored_mnist"


def copy_models(target: Path) -> Path:
    """A private copy of the trained model repository (MODELS_SOURCE) at `target`; fails the test without one."""
    try:
        latest_version(MODELS_SOURCE, FAMILY)
    except ManifestError as exc:
        pytest.fail(f"the service tests need a trained {FAMILY} in {MODELS_SOURCE} (or SKDCGN_MODELS_DIR): {exc}")
    shutil.copytree(MODELS_SOURCE, target)
    return target


def tiny_model_repo(root: Path, family: str = FAMILY, version: str = "tiny") -> Path:
    """Untrained narrow students exported with the project's exporter, with a manifest: a real repository layout."""
    import torch  # here, not at import time: the service tests load this module through conftest

    from core.hashing import sha256_file
    from core.manifest import SCHEMA_VERSION, set_latest, write_manifest
    from core.noise import NoiseSpec
    from core.vocabulary import MECHANISMS
    from training.export import export_students
    from training.students import StudentConfig, TinyGenerator

    torch.manual_seed(0)
    config = StudentConfig(channels=[16, 8, 8, 8], embed_dim=8)
    students = {m: TinyGenerator(config, m).eval() for m in MECHANISMS}
    directory = root / family / version
    directory.mkdir(parents=True)
    blocks = export_students(students, directory)
    manifest = {
        "schema_version": SCHEMA_VERSION, "family": family, "version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "teacher": {"name": "double_colored"}, "image_size": 32, "noise": NoiseSpec(dim=32).to_manifest(),
        "texture_shuffle": True, "labels": {"count": 10, "names": [str(i) for i in range(10)]}, **blocks,
        "training": {"student": config.to_dict()},
        "files": {p.name: sha256_file(p) for p in sorted(directory.iterdir())},
    }
    write_manifest(directory, manifest)
    set_latest(root, family, version)
    return root
