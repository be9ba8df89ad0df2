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


def test_the_vocabulary_is_spelt_once_in_core_with_the_standard_library_only():
    """Mechanisms, job states and formats: named once, in core/vocabulary.py, which the client can import (as it
    can core/settings.py: both need nothing beyond the standard library)."""
    names = {"MECHANISMS", "JOB_STATES", "ACTIVE_STATES", "ENDED_STATES", "FORMATS", "TAR_FORMATS", "QUEUED", "RUNNING",
             "SUCCEEDED", "CANCELLED"}
    defined = sorted(f"{path.relative_to(REPO_ROOT)}:{target.id}" for path in python_files(*PACKAGES[:-1], "client")
                     for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assign)
                     for item in node.targets for target in (item.elts if isinstance(item, ast.Tuple) else [item])
                     if isinstance(target, ast.Name) and target.id in names)
    assert {entry.split(":")[0] for entry in defined} == {"core/vocabulary.py"}, defined
    for module in ("vocabulary", "settings"):
        imported = {name.split(".")[0] for name in imported_modules(REPO_ROOT / "core" / f"{module}.py")}
        assert imported <= set(sys.stdlib_module_names) | {"__future__"}, (module, imported)


def test_each_setting_is_written_once_with_its_variable():
    from dataclasses import fields

    from core.settings import ClientSettings

    read = [item.metadata.get("variable") for cls in (Paths, Settings, ClientSettings) for item in fields(cls)
            if item.name != "paths"]
    assert all(read) and len({variable.name for variable in read}) == len(read)


@pytest.mark.parametrize("variable, value, message", [
    ("MAX_N", "0", "SKDCGN_MAX_N='0' must be at least 1"),
    ("SYNC_TIMEOUT_S", "soon", "SKDCGN_SYNC_TIMEOUT_S='soon' is not a valid float"),
    ("REQUIRE_GPU", " Maybe", "SKDCGN_REQUIRE_GPU='maybe' is not a flag: use 1 or 0"),
    ("LOG_FORMAT", "xml", "SKDCGN_LOG_FORMAT='xml': use one of text, json"),
    ("CACHE_MAX_MEMORY", "lots", "SKDCGN_CACHE_MAX_MEMORY='lots' is not a memory size: use e.g. 256mb or 2gb"),
])
def test_a_setting_the_service_cannot_use_is_refused_naming_it(monkeypatch, variable, value, message):
    from core.settings import SettingsError

    monkeypatch.setenv(f"SKDCGN_{variable}", value)
    with pytest.raises(SettingsError) as refused:
        Settings.from_env()
    assert str(refused.value) == message


def test_settings_read_their_variables(monkeypatch):
    from dataclasses import fields

    from core.settings import ClientSettings, SettingsError

    for item in fields(Settings) + fields(ClientSettings):
        if "variable" in item.metadata:
            monkeypatch.delenv(f"SKDCGN_{item.metadata['variable'].name}", raising=False)
    assert Settings.from_env() == Settings(paths=Paths.from_env())
    assert ClientSettings.from_env() == ClientSettings()
    monkeypatch.setenv("SKDCGN_REDIS_URL", "redis://broker:6379/1")
    monkeypatch.setenv("SKDCGN_API_KEYS", " a, b,,a ")
    monkeypatch.setenv("SKDCGN_BATCH_WINDOW_MS", "2.5")
    settings = Settings.from_env()
    assert settings.cache_url == settings.redis_url == "redis://broker:6379/1"  # the cache is the broker's unless set
    assert settings.api_keys == {"a", "b"} and settings.batch_window_ms == 2.5
    monkeypatch.setenv("SKDCGN_CACHE_URL", "redis://cache:6379/0")
    assert Settings.from_env().cache_url == "redis://cache:6379/0"
    monkeypatch.setenv("SKDCGN_URL", " https://skdcgn.example/ ")
    monkeypatch.setenv("SKDCGN_API_KEY", "  ")
    assert ClientSettings.from_env() == ClientSettings(url="https://skdcgn.example", api_key=None)
    monkeypatch.setenv("SKDCGN_URL", "skdcgn.example")
    with pytest.raises(SettingsError, match="SKDCGN_URL='skdcgn.example' is not an http:// or https:// URL"):
        ClientSettings.from_env()


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
