"""Download-or-use-local for files with known checksums (MNIST, teacher checkpoints).

A local path is always accepted; a download is tried mirror by mirror, verified, and only then renamed
into the cache, so the cache never holds a partial or wrong file.
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Sequence

from core.atomic import atomic_path


class ChecksumError(ValueError):
    """A file exists but its checksum is not the expected one."""


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str | os.PathLike, expected: str, algorithm: str) -> None:
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise ChecksumError(
            f"{path} is corrupt or not the expected file: {algorithm} {actual}, expected {expected}"
        )


def download(urls: Sequence[str], target: str | os.PathLike, expected: str, algorithm: str, timeout: float = 60) -> Path:
    """Fetch the first mirror whose content matches `expected`; raise naming every failure otherwise."""
    target = Path(target)
    errors = []
    for url in urls:
        try:
            with atomic_path(target) as tmp:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                verify(tmp, expected, algorithm)
            return target
        except (OSError, ChecksumError) as exc:
            errors.append(f"{url}: {exc}")
    raise OSError(f"could not download {target.name}:\n  " + "\n  ".join(errors))
