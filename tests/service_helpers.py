"""Small helpers the service tests share: decoding answers, waiting for jobs, reading metrics."""
from __future__ import annotations

import base64
import io
import re
import shutil
import time
from pathlib import Path

import httpx
import numpy as np

from core.imageio import decode
from core.manifest import latest_version, load_manifest, write_manifest
from tests.model_helpers import FAMILY
from tests.paths import REPO

JOB_TIMEOUT_S = 90
LABEL = re.compile(r'(\w+)="([^"]*)"')
SHIPPED_VERSION = latest_version(REPO / "models", FAMILY)
# The labels of the render metrics of the shipped default model, per route.
COUNTERFACTUAL = {"route": "/counterfactual", "model": FAMILY, "version": SHIPPED_VERSION}
GENERATE = {"route": "/generate/{mechanism}", "model": FAMILY, "version": SHIPPED_VERSION}


def poll(check, timeout: float, what: str):
    """Call `check` until it returns something truthy; bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def images_of(payload: dict, field: str = "images") -> np.ndarray:
    return np.stack([decode(base64.b64decode(image)) for image in payload[field]])


def counterfactual(client: httpx.Client, **body) -> httpx.Response:
    request = {"shape": 3, "texture": 7, "background": 1, "n": 2, "seed": 123} | body
    return client.post("/counterfactual", json=request)


def wait_job(client: httpx.Client, job_id: str, states=("succeeded",), timeout: float = JOB_TIMEOUT_S,
             headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = client.get(f"/jobs/{job_id}", headers=headers)
        if answer.status_code in (429, 503):  # transient by design (overload, Redis or workers restarting): poll on
            time.sleep(0.2)
            continue
        assert answer.status_code == 200, answer.text
        status = answer.json()
        if status["state"] in states:
            return status
        assert status["state"] not in ("failed", "cancelled"), status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {answer.status_code} {answer.text}")


def load_npz(content: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(content)) as data:
        return {name: data[name] for name in data.files}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text format, its labels in any order (0 when absent)."""
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        found, _, label_text = series.partition("{")
        if found == name and dict(LABEL.findall(label_text)) == labels:
            return float(value)
    return 0.0


def current_version(models_dir) -> str:
    return latest_version(models_dir, FAMILY)


def new_version(models_dir: Path, source: str, name: str, edit) -> None:
    """Copy version `source` to `name` and let `edit(manifest, directory)` change it."""
    directory = models_dir / FAMILY / name
    shutil.copytree(models_dir / FAMILY / source, directory)
    manifest = load_manifest(directory)
    manifest["version"] = name
    edit(manifest, directory)
    write_manifest(directory, manifest)


def swap_texture_and_background(manifest: dict, _directory) -> None:
    """A visibly different model from the same files: no fused graph, texture and background students swapped."""
    manifest["fused"] = None
    mechanisms = manifest["mechanisms"]
    for field in ("file", "outputs"):  # a graph's output keeps its name: the manifest must say so
        mechanisms["texture"][field], mechanisms["background"][field] = (mechanisms["background"][field],
                                                                         mechanisms["texture"][field])
