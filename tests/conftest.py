"""Fixtures of the service tests: a private copy of the model repository and the shared server stack.

The stacks are real processes (see tests/service_stack.py) started once per session or module.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from core.manifest import ManifestError, latest_version
from tests.service_helpers import FAMILY, REPO
from tests.service_stack import ServiceStack

MODELS_SOURCE = Path(os.environ.get("SKDCGN_MODELS_DIR", REPO / "models"))


def copy_models(target: Path) -> Path:
    try:
        latest_version(MODELS_SOURCE, FAMILY)
    except ManifestError as exc:
        pytest.fail(f"the service tests need a trained {FAMILY} in {MODELS_SOURCE} (or SKDCGN_MODELS_DIR): {exc}")
    shutil.copytree(MODELS_SOURCE, target)
    return target


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A private copy of the model repository: the hot-reload tests promote versions in it."""
    return copy_models(tmp_path_factory.mktemp("models") / "models")


@pytest.fixture(scope="session")
def stack(tmp_path_factory, models_dir):
    """The shared stack: Redis, one worker, one gateway (small limits so the limits are testable)."""
    service = ServiceStack(tmp_path_factory.mktemp("stack"), models_dir, max_n=16, max_job_n=5000,
                           job_chunk_size=50, sync_timeout_s=20, heartbeat_ttl_s=10, visibility_timeout_s=60)
    try:
        yield service.start()
    finally:
        service.stop()


@pytest.fixture(scope="session")
def client(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        yield http
