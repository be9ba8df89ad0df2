"""The model-repository contract: `models/<family>/<version>/manifest.json` and `models/<family>/LATEST`.

The manifest names every file with its sha256, the ONNX input and output names, shapes and value
ranges, the labels, the noise block and the version. Workers trust nothing that does not check out.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from core.atomic import write_text_atomic
from core.hashing import sha256_file

MANIFEST_NAME = "manifest.json"
LATEST_NAME = "LATEST"
SCHEMA_VERSION = 1
REQUIRED_KEYS = (
    "schema_version", "family", "version", "created", "teacher", "image_size", "noise",
    "texture_shuffle", "labels", "mechanisms", "files",
)
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The one table of what each mechanism outputs: its tensor name and value range (masks in [0, 1], images in [-1, 1]).
MECHANISM_OUTPUTS = {"shape": "mask", "texture": "texture", "background": "background"}
VALUE_RANGES = {"mask": (0.0, 1.0), "texture": (-1.0, 1.0), "background": (-1.0, 1.0)}


def value_range(mechanism: str) -> tuple[float, float]:
    """The value range of `mechanism`'s output."""
    return VALUE_RANGES[MECHANISM_OUTPUTS[mechanism]]


def recorded_students(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each mechanism's student config as the manifest's `training` block records it: per mechanism
    (`students`), or one config shared by all (`student`, versions written before per-mechanism students)."""
    training = manifest["training"]
    return training.get("students") or {m: training["student"] for m in manifest["mechanisms"]}


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not match the files beside it."""


class VersionNotFound(LookupError):
    def __init__(self, family: str, version: str, available: list[str]):
        self.family, self.version, self.available = family, version, available
        super().__init__(f"model {family!r} has no version {version!r}; available: {', '.join(available) or 'none'}")


def validate_version_name(version: str) -> str:
    if not VERSION_PATTERN.match(version):
        raise ManifestError(f"invalid version name {version!r}: use letters, digits, '.', '_' or '-' (max 64)")
    return version


def load_manifest(version_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(version_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"missing manifest: {path}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from exc
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ManifestError(f"manifest {path} lacks keys: {', '.join(missing)}")
    return manifest


def manifest_sha256(version_dir: str | os.PathLike) -> str:
    return sha256_file(Path(version_dir) / MANIFEST_NAME)


def verify_files(version_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Raise ManifestError naming the first file that is missing or whose sha256 differs from the manifest."""
    version_dir = Path(version_dir)
    for name, expected in manifest["files"].items():
        path = version_dir / name
        if not path.is_file():
            raise ManifestError(f"model file missing: {path}")
        actual = sha256_file(path)
        if actual != expected:
            raise ManifestError(f"model file {path} fails its sha256 check: manifest {expected}, file {actual}")


def write_manifest(version_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = Path(version_dir) / MANIFEST_NAME
    write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def list_versions(models_root: str | os.PathLike, family: str) -> list[str]:
    family_dir = Path(models_root) / family
    if not family_dir.is_dir():
        return []
    return sorted(
        entry.name for entry in family_dir.iterdir()
        if entry.is_dir() and not entry.name.startswith(".") and (entry / MANIFEST_NAME).is_file()
    )


def list_families(models_root: str | os.PathLike) -> list[str]:
    root = Path(models_root)
    if not root.is_dir():
        return []
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and list_versions(root, entry.name))


def latest_version(models_root: str | os.PathLike, family: str) -> str:
    path = Path(models_root) / family / LATEST_NAME
    if not path.is_file():
        raise ManifestError(f"model family {family!r} has no {LATEST_NAME} file at {path}")
    return path.read_text().strip()


def resolve_version(models_root: str | os.PathLike, family: str, version: str | None = None) -> tuple[str, Path]:
    """The version directory for `version`, or for LATEST when version is None."""
    chosen = version or latest_version(models_root, family)
    available = list_versions(models_root, family)
    if chosen not in available:
        raise VersionNotFound(family, chosen, available)
    return chosen, Path(models_root) / family / chosen


def set_latest(models_root: str | os.PathLike, family: str, version: str) -> None:
    """Point LATEST at `version` (atomically); the version must exist with a manifest."""
    available = list_versions(models_root, family)
    if version not in available:
        raise VersionNotFound(family, version, available)
    write_text_atomic(Path(models_root) / family / LATEST_NAME, version + "\n")
