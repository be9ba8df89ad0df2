"""The gateway's view of the model repository: which families and versions exist, and what LATEST names now.

A request's version is resolved here, when it is accepted, and travels with the task: a worker that has
meanwhile seen a newer LATEST still renders the version the request started with. Reads files only. Its errors
echo at most a short prefix of the family and version names asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from core.manifest import (
    LATEST_NAME, MANIFEST_NAME, ManifestError, VersionNotFound, latest_version, list_families, list_versions,
    load_manifest, manifest_sha256, resolve_version,
)
from core.vocabulary import MECHANISMS, label_names
from service.errors import clip


class UnknownModel(LookupError):
    """No family of that name in the model repository."""


@dataclass(frozen=True)
class ResolvedModel:
    family: str
    version: str
    manifest: dict
    manifest_sha256: str

    @property
    def label_count(self) -> int:
        return int(self.manifest["labels"]["count"])

    @property
    def mechanisms(self) -> list[str]:
        return list(self.manifest["mechanisms"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def noise_dim(self) -> int:
        return int(self.manifest["noise"]["dim"])


def names_by_mechanism(family: str, manifest: dict) -> dict[str, list[str]]:
    """The names of the labels of each mechanism whose labels are colours or textures rather than the classes of
    `labels.names` (MNIST families: texture and background), from core.vocabulary. The manifests keep the names they
    shipped with: their checksum is part of every cache key."""
    count = int(manifest["labels"]["count"])
    named = {mechanism: label_names(family, mechanism, count) for mechanism in MECHANISMS
             if mechanism in manifest["mechanisms"]}
    return {mechanism: names for mechanism, names in named.items() if names is not None}


def _signature(path: Path) -> tuple | None:
    """What changes when a file is rewritten or replaced (atomic writes replace the inode); None when absent."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class ModelCatalog:
    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        # (family, version or None) -> (signatures of LATEST and the manifest, the resolved model): a request
        # costs two stat calls instead of scanning the repository and hashing the manifest.
        self._resolved: dict[tuple[str, str | None], tuple[tuple, ResolvedModel]] = {}

    def _check_family(self, family: str) -> None:
        families = list_families(self.models_dir)
        if family not in families:
            raise UnknownModel(f"unknown model {clip(family)!r}; available models: {', '.join(families) or 'none'}")

    def resolve(self, family: str, version: str | None = None) -> ResolvedModel:
        """The version to serve (LATEST when None); raises UnknownModel, VersionNotFound or ManifestError."""
        cached = self._resolved.get((family, version))
        if cached is not None and cached[0] == self._signatures(family, version, cached[1].version):
            return cached[1]
        self._check_family(family)
        try:
            resolved_version, directory = resolve_version(self.models_dir, family, version)
        except VersionNotFound as exc:  # the message echoes the version asked for: only a prefix of it
            raise VersionNotFound(exc.family, clip(exc.version), exc.available) from None
        model = ResolvedModel(family, resolved_version, load_manifest(directory), manifest_sha256(directory))
        self._resolved[(family, version)] = (self._signatures(family, version, resolved_version), model)
        return model

    def _signatures(self, family: str, asked: str | None, resolved: str) -> tuple:
        latest = _signature(self.models_dir / family / LATEST_NAME) if asked is None else None
        return latest, _signature(self.models_dir / family / resolved / MANIFEST_NAME)

    def describe_family(self, family: str, refused: Mapping[str, str]) -> dict:
        """A family's versions with their manifest essentials and status; `refused` ("family/version" -> why)
        names the versions workers refuse to serve."""
        self._check_family(family)
        try:
            latest = latest_version(self.models_dir, family)
        except ManifestError:
            latest = None
        versions = []
        for version in list_versions(self.models_dir, family):
            directory = self.models_dir / family / version
            try:
                manifest = load_manifest(directory)
            except ManifestError as exc:
                versions.append({"version": version, "latest": version == latest, "status": "unavailable",
                                 "reason": str(exc)})
                continue
            reason = refused.get(f"{family}/{version}")
            versions.append({
                "version": version,
                "latest": version == latest,
                "status": "unavailable" if reason else "available",
                **({"reason": reason} if reason else {}),
                "created": manifest["created"],
                "manifest_sha256": manifest_sha256(directory),
                "teacher": manifest["teacher"],
                "image_size": manifest["image_size"],
                "labels": manifest["labels"],
                "label_names": names_by_mechanism(family, manifest),
                "noise": manifest["noise"],
                "texture_shuffle": manifest["texture_shuffle"],
                "mechanisms": list(manifest["mechanisms"]),
                "fused": bool(manifest.get("fused")),
                "metrics": manifest.get("metrics", {}),
            })
        return {"name": family, "latest": latest, "versions": versions}

    def describe(self, refused: Mapping[str, str]) -> list[dict]:
        """Every family as describe_family gives it, for GET /models."""
        return [self.describe_family(family, refused) for family in list_families(self.models_dir)]
