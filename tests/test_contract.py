"""The seams between the parts: the gateway and the workers meet only in core/, each concept lives in one place."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.celery_config import make_celery
from core.compose import MaskModifiers
from core.jobs import JobSpec
from core.messages import (
    MESSAGE_SCHEMA, RENDER_TASK, BatchReply, ChunkTask, MessageSchemaError, RenderBatch, RenderReply, RenderRequest,
    reply_key,
)
from core.settings import REPO_ROOT, Paths, Settings

PACKAGES = ("core", "training", "service", "workers", "benchmarks", "tests")


def python_files(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (REPO_ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package, forbidden", [("service", "workers"), ("workers", "service"),
                                                ("core", "service"), ("core", "workers"), ("core", "training")])
def test_the_gateway_and_the_workers_meet_only_in_core(package, forbidden):
    offenders = {str(path.relative_to(REPO_ROOT)): sorted(m for m in imported_modules(path)
                                                           if m == forbidden or m.startswith(forbidden + "."))
                 for path in python_files(package)}
    assert not {path: modules for path, modules in offenders.items() if modules}


def test_the_worker_loads_no_gateway_code():
    code = ("import sys, workers.tasks, workers.health; "
            "leaked = sorted({m.split('.')[0] for m in sys.modules} & {'service', 'torch', 'fastapi'}); "
            "assert not leaked, leaked")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_every_onnxruntime_session_is_made_in_core_runtime():
    makers = {str(path.relative_to(REPO_ROOT)) for path in python_files(*PACKAGES[:-1])
              if "InferenceSession(" in path.read_text()}
    assert makers == {"core/runtime.py", "training/export.py"}  # export keeps its parity check's own session


def test_one_mask_modifiers_class_and_one_value_range_table():
    classes, tables = [], []
    for path in python_files(*PACKAGES[:-1]):
        tree = ast.parse(path.read_text())
        classes += [f"{path.name}:{node.name}" for node in ast.walk(tree)
                    if isinstance(node, ast.ClassDef) and node.name.startswith("MaskModifiers")]
        tables += [f"{path.name}:{target.id}" for node in ast.walk(tree) if isinstance(node, ast.Assign)
                   for target in node.targets if isinstance(target, ast.Name) and "VALUE_RANGE" in target.id]
    assert classes == ["compose.py:MaskModifiers"]
    assert tables == ["manifest.py:VALUE_RANGES"]


def test_environment_settings_are_read_only_in_core_settings():
    reads = re.compile(r"environ(\.get)?[\[(]\s*[\"']SKDCGN_")
    offenders = [str(path.relative_to(REPO_ROOT)) for path in python_files(*PACKAGES)
                 if reads.search(path.read_text()) and path.name != "settings.py"]
    assert not offenders


def test_the_old_data_dir_variable_still_works_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.delenv("SKDCGN_JOBS_DIR", raising=False)
    monkeypatch.delenv("SKDCGN_MNIST_DIR", raising=False)
    monkeypatch.setenv("SKDCGN_DATA_DIR", str(tmp_path))
    with pytest.warns(FutureWarning, match="SKDCGN_DATA_DIR is deprecated"):
        paths = Paths.from_env()
    assert paths.jobs_dir == tmp_path / "jobs" and paths.mnist_dir == tmp_path
    monkeypatch.setenv("SKDCGN_JOBS_DIR", str(tmp_path / "results"))
    with pytest.warns(FutureWarning):
        assert Paths.from_env().jobs_dir == tmp_path / "results"


def test_messages_round_trip_and_refuse_another_contract_version():
    request = RenderRequest("counterfactual", "double_colored_mnist", "v2", "ab" * 32,
                            {"shape": 3, "texture": 2, "background": 5}, 4, 7, MaskModifiers().to_dict())
    batch = RenderBatch([request], "reply-1")
    assert RenderBatch.from_dict(json.loads(json.dumps(batch.to_dict()))) == batch
    assert ChunkTask.from_dict(ChunkTask("f" * 32, 3).to_dict()) == ChunkTask("f" * 32, 3)
    reply = BatchReply([RenderReply.failure(503, "down"), RenderReply(payload={"n": 1})])
    assert BatchReply.from_dict(json.loads(json.dumps(reply.to_dict()))) == reply
    old = {**request.to_dict(), "schema": MESSAGE_SCHEMA - 1}
    with pytest.raises(MessageSchemaError, match=f"version {MESSAGE_SCHEMA - 1}.*speaks {MESSAGE_SCHEMA}"):
        RenderRequest.from_dict(old)
    with pytest.raises(MessageSchemaError, match="unknown fields \\['colour'\\]"):
        RenderRequest.from_dict({**request.to_dict(), "colour": "red"})
    # Everything that determines the pixels is in the cache key; equal requests share it.
    assert request.cache_key() == RenderRequest.from_dict(request.to_dict()).cache_key()
    assert request.cache_key() != RenderRequest(**{**request.__dict__, "seed": 8}).cache_key()


def test_a_job_spec_is_stored_once_as_json():
    spec = JobSpec(id="a" * 32, family="f", version="v", manifest_sha256="s", n=10, chunk_size=5, chunks=2,
                   shard_size=10, shards=1, seed=1, counterfactuals_per_shape=1, labels={"shape": [1]},
                   mask=MaskModifiers().to_dict(), format="npz", created="now", request={"n": 10})
    assert JobSpec.from_json(spec.to_json()) == spec


def test_a_worker_refuses_a_message_of_another_contract_version_loudly(stack):
    """A gateway of another release sends a render: the worker answers with an error naming both versions."""
    settings = Settings(redis_url=stack.env["SKDCGN_REDIS_URL"])
    message = {**RenderBatch([], "stale-gateway").to_dict(), "schema": MESSAGE_SCHEMA + 1}
    make_celery(settings).send_task(RENDER_TASK, args=[message], ignore_result=True)
    client = stack.redis()
    deadline, popped = time.monotonic() + 20, None
    while popped is None and time.monotonic() < deadline:
        popped = client.blpop([reply_key("stale-gateway")], timeout=1)
    (reply,) = BatchReply.from_dict(json.loads(popped[1])).replies
    assert reply.status == 500 and f"contract version {MESSAGE_SCHEMA + 1}" in reply.error


def test_each_image_copies_only_the_packages_it_runs():
    copied = {name: set(re.findall(r"^COPY (\w+) \1$", (REPO_ROOT / "docker" / f"Dockerfile.{name}").read_text(), re.M))
              for name in ("gateway", "worker")}
    assert copied == {"gateway": {"core", "service"}, "worker": {"core", "workers"}}


def test_every_shipped_version_keeps_each_mechanism_graph_beside_the_fused_one():
    for manifest in (REPO_ROOT / "models").glob("*/*/manifest.json"):
        files = json.loads(manifest.read_text())["files"]
        assert {"shape.onnx", "texture.onnx", "background.onnx", "fused.onnx"} <= set(files), manifest
