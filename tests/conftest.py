"""Shared fixtures: private model repositories (a copy of the trained one, or tiny untrained students), the
shared service stack, and torch's thread count restored after a CLI changed it.

The stacks are real processes (see tests/service_stack.py) started once per session or module. Plain helpers
live in tests/paths.py, tests/model_helpers.py and tests/service_helpers.py; no test module imports another.
"""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.model_helpers import copy_models, tiny_model_repo
from tests.service_stack import ServiceStack


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A private copy of the model repository: the hot-reload tests promote versions in it."""
    return copy_models(tmp_path_factory.mktemp("models") / "models")


@pytest.fixture(scope="session")
def stack(tmp_path_factory, models_dir):
    """The shared stack: Redis, one worker, one gateway (small limits so the limits are testable)."""
    with ServiceStack(tmp_path_factory.mktemp("stack"), models_dir, max_n=16, max_job_n=5000,
                      job_chunk_size=50, sync_timeout_s=20, heartbeat_ttl_s=10, visibility_timeout_s=60) as service:
        yield service


@pytest.fixture(scope="session")
def client(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        yield http


@pytest.fixture
def tiny_models(tmp_path) -> Path:
    """A model repository holding untrained narrow students of model_helpers.FAMILY, version `tiny` (LATEST)."""
    return tiny_model_repo(tmp_path / "models")


@pytest.fixture
def restore_torch_threads():
    """The CLIs' --threads set torch's global thread count (1 keeps tiny runs fast on a busy CPU): undo it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
