"""The model repository's version pointer: promote, roll back and list versions of a family.

`models/<family>/LATEST` names the served version (workers watch it). `models/<family>/HISTORY.jsonl`
records each promotion and rollback, so a rollback returns to the version promoted before the current one.
Usage: python -m training.registry promote|rollback|list --family F [--version V] [--models-dir DIR]
(--models-dir defaults to core.settings.Paths.models_dir: $SKDCGN_MODELS_DIR, else models).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from core.atomic import write_text_atomic
from core.manifest import (
    LATEST_NAME, ManifestError, VersionNotFound, latest_version, list_families, list_versions, load_manifest,
    set_latest, verify_files,
)
from core.settings import Paths

HISTORY_NAME = "HISTORY.jsonl"


def _history_path(models_root: Path, family: str) -> Path:
    return Path(models_root) / family / HISTORY_NAME


def read_history(models_root: str | os.PathLike, family: str) -> list[dict]:
    path = _history_path(Path(models_root), family)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def promotion_stack(history: list[dict]) -> list[str]:
    """Promotions push a version, rollbacks pop one: the top is what LATEST should name."""
    stack: list[str] = []
    for entry in history:
        if entry["action"] == "promote":
            stack.append(entry["version"])
        elif entry["action"] == "rollback" and stack:
            stack.pop()
    return stack


def _record(models_root: Path, family: str, action: str, version: str) -> None:
    history = read_history(models_root, family)
    history.append({"time": dt.datetime.now(dt.timezone.utc).isoformat(), "action": action, "version": version})
    write_text_atomic(_history_path(models_root, family), "".join(json.dumps(entry) + "\n" for entry in history))


def _verify(models_root: Path, family: str, version: str) -> None:
    """LATEST only ever names a version whose files pass their manifest's sha256 check (workers refuse others)."""
    if version not in list_versions(models_root, family):
        raise VersionNotFound(family, version, list_versions(models_root, family))
    version_dir = models_root / family / version
    verify_files(version_dir, load_manifest(version_dir))


def promote(models_root: str | os.PathLike, family: str, version: str) -> None:
    """Point LATEST at `version` after checking its manifest and files."""
    models_root = Path(models_root)
    _verify(models_root, family, version)
    set_latest(models_root, family, version)
    _record(models_root, family, "promote", version)


def rollback(models_root: str | os.PathLike, family: str) -> str:
    """Return LATEST to the version promoted before the current one; returns that version."""
    models_root = Path(models_root)
    stack = promotion_stack(read_history(models_root, family))
    if len(stack) < 2:
        raise ManifestError(f"{family}: no earlier promoted version to roll back to (history: {stack or 'empty'})")
    previous = stack[-2]
    _verify(models_root, family, previous)
    set_latest(models_root, family, previous)
    _record(models_root, family, "rollback", stack[-1])
    return previous


def describe(models_root: str | os.PathLike, family: str) -> list[dict]:
    try:
        current = latest_version(models_root, family)
    except ManifestError:
        current = None
    rows = []
    for version in list_versions(models_root, family):
        manifest = load_manifest(Path(models_root) / family / version)
        rows.append({"version": version, "latest": version == current, "created": manifest["created"],
                     "metrics": manifest.get("metrics", {})})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.registry", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["promote", "rollback", "list"])
    parser.add_argument("--models-dir", default=str(Paths.from_env().models_dir),
                        help="model repository (default $SKDCGN_MODELS_DIR, else models)")
    parser.add_argument("--family", help="model family (default: every family, for list)")
    parser.add_argument("--version", help="version to promote")
    args = parser.parse_args(argv)
    try:
        if args.command == "promote":
            if not (args.family and args.version):
                parser.error("promote needs --family and --version")
            promote(args.models_dir, args.family, args.version)
            print(f"{args.family}: {LATEST_NAME} -> {args.version}")
        elif args.command == "rollback":
            if not args.family:
                parser.error("rollback needs --family")
            print(f"{args.family}: {LATEST_NAME} -> {rollback(args.models_dir, args.family)}")
        else:
            for family in [args.family] if args.family else list_families(args.models_dir):
                for row in describe(args.models_dir, family):
                    marker = "*" if row["latest"] else " "
                    print(f"{marker} {family}/{row['version']}  created {row['created']}  {json.dumps(row['metrics'])}")
    except (ManifestError, VersionNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
