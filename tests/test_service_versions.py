"""Serving for reproducible research: model versions, provenance, noise control, job listing and retention,
per-key jobs, and model files that fail their sha256 check.

The module runs a stack of its own: its own copy of the model repository (versions are added, promoted and
corrupted here) and its own Redis (the short-retention gateway expires every ended job in it).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import httpx
import numpy as np
import pytest

from core.hashing import sha256_file
from core.imageio import decode
from core.manifest import load_manifest
from core.settings import Settings
from tests.model_helpers import copy_models
from tests.service_helpers import (
    FAMILY, REPO, counterfactual, current_version, images_of, load_npz, new_version, poll, swap_texture_and_background,
    wait_job,
)
from tests.service_stack import ServiceStack

SHARD = 50  # samples per tar shard in this module's stack
KEYS = {"a": "key-a-0123456789", "b": "key-b-0123456789", "lister": "key-lister-0123456789"}


@pytest.fixture(scope="module")
def vstack(tmp_path_factory):
    models = copy_models(tmp_path_factory.mktemp("versions-models") / "models")
    with ServiceStack(tmp_path_factory.mktemp("versions"), models, max_n=16, job_chunk_size=40,
                      job_shard_size=SHARD, sync_timeout_s=20, heartbeat_ttl_s=10, visibility_timeout_s=60) as service:
        yield service


@pytest.fixture(scope="module")
def http(vstack):
    with httpx.Client(base_url=vstack.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def swapped(vstack) -> str:
    """A second, visibly different version of the family (same files, texture and background swapped)."""
    new_version(vstack.models_dir, current_version(vstack.models_dir), "swapped", swap_texture_and_background)
    return "swapped"


@pytest.fixture(scope="module")
def keyed(vstack):
    """A gateway with API keys that guard the generation endpoints too."""
    url = vstack.start_gateway(api_keys=",".join(KEYS.values()), api_keys_for_generation=1)
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def key(name: str) -> dict:
    return {"X-API-Key": KEYS[name]}


def versions_of(http: httpx.Client) -> dict[str, dict]:
    listing = http.get(f"/models/{FAMILY}")
    assert listing.status_code == 200, listing.text
    return {entry["version"]: entry for entry in listing.json()["versions"]}


def registry_cli(*args: str, models_dir) -> str:
    result = subprocess.run([sys.executable, "-m", "training.registry", *args, "--models-dir", str(models_dir)],
                            cwd=REPO, capture_output=True, text=True, check=True)
    return result.stdout


def test_onnxruntime_sessions_use_the_configured_threads_without_spinning(vstack):
    from workers.engine import LoadedModels

    assert Settings().ort_threads == 1
    model = LoadedModels(vstack.models_dir, capacity=1, ort_threads=2).get(FAMILY)
    for session in [model.fused, *model.sessions.values()]:
        options = session.get_session_options()
        assert options.intra_op_num_threads == 2
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_versions_listed_pinned_and_unknown_ones_404(http, vstack, swapped):
    latest = current_version(vstack.models_dir)
    versions = versions_of(http)
    assert {latest, swapped} <= set(versions)
    for name, entry in versions.items():
        manifest = load_manifest(vstack.models_dir / FAMILY / name)
        assert entry["status"] == "available" and entry["latest"] == (name == latest)
        for field in ("created", "teacher", "metrics", "noise", "labels"):
            assert entry[field] == manifest[field]
        assert entry["manifest_sha256"] == sha256_file(vstack.models_dir / FAMILY / name / "manifest.json")
    assert versions[latest]["noise"]["dim"] == 32 and versions[latest]["teacher"]["name"] == "double_colored"
    assert versions[latest]["manifest_sha256"] != versions[swapped]["manifest_sha256"]
    unknown = http.get("/models/nope")
    assert unknown.status_code == 404 and "available models: " in unknown.json()["error"]
    assert FAMILY in unknown.json()["error"].split("available models: ")[1]

    default = counterfactual(http, seed=8).json()
    pinned = counterfactual(http, seed=8, version=swapped).json()
    for answer, name in ((default, latest), (pinned, swapped)):
        assert (answer["model"], answer["version"]) == (FAMILY, name)
        assert answer["manifest_sha256"] == versions[name]["manifest_sha256"]
    assert not np.array_equal(images_of(default), images_of(pinned))
    png = http.post("/counterfactual", json={"shape": 3, "texture": 7, "background": 1, "version": swapped},
                    headers={"Accept": "image/png"})
    assert (png.headers["x-model-family"], png.headers["x-model-version"]) == (FAMILY, swapped)
    assert png.headers["x-manifest-sha256"] == versions[swapped]["manifest_sha256"]

    for path, body in (("/counterfactual", {"shape": 1, "texture": 1, "background": 1, "version": "v999"}),
                       ("/generate/shape", {"label": 1, "version": "v999"}), ("/jobs", {"n": 5, "version": "v999"})):
        missing = http.post(path, json=body)
        assert missing.status_code == 404
        assert f"no version 'v999'; available: {', '.join(sorted(versions))}" in missing.json()["error"]


def test_promote_and_rollback_through_the_cli_reach_the_running_worker(http, vstack, swapped):
    old = current_version(vstack.models_dir)
    request = {"shape": 2, "texture": 6, "background": 0, "n": 2, "seed": 99}
    before = counterfactual(http, **request).json()
    (worker,) = http.get("/readyz").json()["workers"]

    assert f"LATEST -> {swapped}" in registry_cli("promote", "--family", FAMILY, "--version", swapped,
                                                   models_dir=vstack.models_dir)
    assert f"* {FAMILY}/{swapped}" in registry_cli("list", "--family", FAMILY, models_dir=vstack.models_dir)
    promoted = counterfactual(http, **request).json()
    assert promoted["version"] == swapped and not np.array_equal(images_of(promoted), images_of(before))

    def loaded_by_the_same_worker(version: str) -> bool:
        (now,) = http.get("/readyz").json()["workers"]
        return now["pid"] == worker["pid"] and now["loaded"][-1] == f"{FAMILY}/{version}"  # most recently used last

    poll(lambda: loaded_by_the_same_worker(swapped), 10, "the worker to follow the promotion")
    assert versions_of(http)[swapped]["latest"]

    assert f"LATEST -> {old}" in registry_cli("rollback", "--family", FAMILY, models_dir=vstack.models_dir)
    poll(lambda: loaded_by_the_same_worker(old), 10, "the worker to follow the rollback")
    rolled_back = counterfactual(http, **request).json()
    assert rolled_back["version"] == old
    np.testing.assert_array_equal(images_of(rolled_back), images_of(before))


def download_shards(http: httpx.Client, status: dict) -> list[dict[str, bytes]]:
    """Every tar shard of a png job as {member name: bytes}, checking the model headers on the way."""
    shards = []
    for shard in range(status["shards"]):
        answer = http.get(status["result_url"], params={"shard": shard})
        assert answer.status_code == 200, answer.text
        assert (answer.headers["x-model-version"], answer.headers["x-manifest-sha256"]) == (
            status["version"], status["manifest_sha256"])
        with tarfile.open(fileobj=io.BytesIO(answer.content)) as archive:
            shards.append({member.name: archive.extractfile(member).read() for member in archive.getmembers()})
    return shards


def test_job_outputs_carry_provenance_and_reruns_are_byte_identical(http, vstack):
    version = current_version(vstack.models_dir)
    sha = versions_of(http)[version]["manifest_sha256"]
    request = {"n": 120, "seed": 5, "counterfactuals_per_shape": 3, "format": "png", "version": version,
               "labels": {"shape": [1, 4], "texture": None, "background": [0, 9]}, "mask": {"transparency": 0.75}}
    ids = [http.post("/jobs", json=body).json()["id"] for body in (request, request, request | {"format": "npz"})]
    png, rerun, npz = (wait_job(http, job_id) for job_id in ids)
    assert (png["shards"], npz["shards"]) == (3, 1)  # 120 samples in tar shards of 50
    assert png["manifest_sha256"] == npz["manifest_sha256"] == sha

    whole = http.get(png["result_url"])
    assert whole.status_code == 422 and "?shard=0 .. 2" in whole.json()["error"]
    assert http.get(png["result_url"], params={"shard": 3}).status_code == 404
    shards, rerun_shards = download_shards(http, png), download_shards(http, rerun)
    arrays = load_npz(http.get(npz["result_url"]).content)

    images = []
    for shard, members in enumerate(shards):
        start, stop = shard * SHARD, min((shard + 1) * SHARD, 120)
        provenance = json.loads(members.pop("provenance.json"))
        assert provenance["request"] == request | {"model": FAMILY, "mask": {"transparency": 0.75, "rotation_deg": 0.0,
                                                                              "noise_std": 0.0}}
        assert (provenance["family"], provenance["version"], provenance["manifest_sha256"]) == (FAMILY, version, sha)
        assert (provenance["seed"], provenance["indices"], provenance["shard"], provenance["shards"]) == (
            5, [start, stop], shard, 3)
        assert "SeedSequence([seed, i])" in provenance["sample_seeds"]["noise"]
        assert "SeedSequence([seed, i, 1])" in provenance["sample_seeds"]["labels"]
        assert provenance["counterfactuals_per_shape"] == 3 and provenance["labels"]["background"] == [0, 9]
        assert provenance["created"] == png["created"] and provenance["job_id"] == png["id"]
        rows = list(csv.DictReader(io.StringIO(members["labels.csv"].decode())))
        assert [(int(row["seed"]), int(row["index"])) for row in rows] == [(5, i) for i in range(start, stop)]
        images += [decode(members[row["file"]]) for row in rows]
        # The re-run: the same PNG bytes and labels; only its provenance (job id, times) differs.
        rerun_members = dict(rerun_shards[shard])
        assert json.loads(rerun_members.pop("provenance.json"))["job_id"] == rerun["id"]
        assert rerun_members == members
    np.testing.assert_array_equal(np.stack(images), arrays["images"])

    provenance = json.loads(arrays["provenance.json"])
    assert (provenance["indices"], provenance["version"], provenance["manifest_sha256"]) == ([0, 120], version, sha)
    again = load_npz(http.get(wait_job(http, http.post("/jobs", json=request | {"format": "npz"}).json()["id"])
                              ["result_url"]).content)
    for name in ("images", "labels", "indices"):
        np.testing.assert_array_equal(again[name], arrays[name])


def test_explicit_noise_in_and_the_noise_used_out(http):
    drawn = counterfactual(http, n=3, seed=21, return_noise=True).json()
    assert {name: np.shape(z) for name, z in drawn["z"].items()} == {m: (3, 32) for m in ("shape", "texture",
                                                                                          "background")}
    replay = counterfactual(http, n=3, seed=21, z=drawn["z"], return_noise=True).json()
    assert replay["z"] == drawn["z"]
    np.testing.assert_array_equal(images_of(replay), images_of(drawn))

    # A z of one's own for one mechanism: returned exactly, the others drawn from the seed as before.
    own = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32).tolist()
    chosen = counterfactual(http, n=3, seed=21, z={"shape": own}, return_noise=True).json()
    assert chosen["z"]["shape"] == own and chosen["z"]["texture"] == drawn["z"]["texture"]
    assert not np.array_equal(images_of(chosen), images_of(drawn))
    again = counterfactual(http, n=3, seed=21, z={"shape": own}).json()
    np.testing.assert_array_equal(images_of(again), images_of(chosen))

    # A mechanism's output depends on its label and z only: the same z gives the same image under any seed.
    masks = [http.post("/generate/shape", json={"label": 4, "n": 3, "seed": seed, "z": own, "return_noise": True})
             for seed in (1, 2)]
    assert masks[0].json()["z"] == {"shape": own}
    np.testing.assert_array_equal(images_of(masks[0].json()), images_of(masks[1].json()))
    composed = counterfactual(http, shape=4, n=3, seed=21, z={"shape": own}, return_components=True).json()
    np.testing.assert_array_equal(images_of(composed["components"], "mask"), images_of(masks[0].json()))


WRONG_NOISE = [
    ("short vector", "/counterfactual", {"shape": 1, "texture": 1, "background": 1, "z": {"texture": [[0.0] * 31]}},
     "z.texture must hold n=1 vectors of 32 numbers each"),
    ("too few vectors", "/counterfactual", {"shape": 1, "texture": 1, "background": 1, "n": 2,
                                            "z": {"shape": [[0.0] * 32]}}, "n=2 vectors of 32 numbers"),
    ("long vector", "/generate/background", {"label": 1, "z": [[0.0] * 33]}, "z must hold n=1 vectors of 32 numbers"),
    ("unknown mechanism", "/counterfactual", {"shape": 1, "texture": 1, "background": 1, "z": {"colour": [[0.0]]}},
     "z.colour"),
]


@pytest.mark.parametrize("path, body, message", [case[1:] for case in WRONG_NOISE], ids=[c[0] for c in WRONG_NOISE])
def test_noise_of_the_wrong_size_is_a_422(http, path, body, message):
    answer = http.post(path, json=body)
    assert answer.status_code == 422 and message in answer.json()["error"]


def test_non_finite_noise_is_a_422(http):
    body = b'{"shape": 1, "texture": 1, "background": 1, "z": {"shape": [[NaN' + b', 0.0' * 31 + b']]}}'
    answer = http.post("/counterfactual", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and "finite number" in answer.json()["error"]


def test_job_listing_is_newest_first_paginated_and_filterable(keyed):
    headers = key("lister")  # a key no other test uses: its listing holds exactly these jobs
    ids = [keyed.post("/jobs", json={"n": 5, "seed": seed}, headers=headers).json()["id"] for seed in range(5)]
    for job_id in ids:
        wait_job(keyed, job_id, headers=headers)
    running = keyed.post("/jobs", json={"n": 5000, "seed": 9}, headers=headers).json()["id"]
    assert keyed.delete(f"/jobs/{running}", headers=headers).json()["state"] == "cancelled"
    newest_first = [running, *reversed(ids)]

    listed, cursor, pages = [], None, 0
    while True:
        page = keyed.get("/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=headers)
        assert page.status_code == 200, page.text
        listed += [job["id"] for job in page.json()["jobs"]]
        cursor, pages = page.json()["next_cursor"], pages + 1
        if not cursor:
            break
    assert listed == newest_first and pages == 3

    def ids_in(state: str) -> list[str]:
        return [job["id"] for job in keyed.get("/jobs", params={"state": state}, headers=headers).json()["jobs"]]

    assert ids_in("succeeded") == list(reversed(ids)) and ids_in("cancelled") == [running]
    assert ids_in("running") == []
    first = keyed.get("/jobs", params={"limit": 1}, headers=headers).json()["jobs"][0]
    assert (first["model"], len(first["manifest_sha256"])) == (FAMILY, 64)
    for params, message in (({"cursor": "nope"}, "cursor"), ({"limit": 0}, "limit"), ({"state": "done"}, "state")):
        answer = keyed.get("/jobs", params=params, headers=headers)
        assert answer.status_code == 422 and message in answer.json()["error"]


def test_each_key_sees_only_its_own_jobs_and_generation_needs_a_key(keyed):
    job_id = keyed.post("/jobs", json={"n": 5, "seed": 3}, headers=key("a")).json()["id"]
    status = wait_job(keyed, job_id, headers=key("a"))
    for method, path in (("GET", f"/jobs/{job_id}"), ("GET", status["result_url"]), ("DELETE", f"/jobs/{job_id}")):
        answer = keyed.request(method, path, headers=key("b"))
        assert answer.status_code == 404 and "no job" in answer.json()["error"]
        assert keyed.request(method, path).status_code == 401
    assert job_id not in [job["id"] for job in keyed.get("/jobs", headers=key("b")).json()["jobs"]]
    assert job_id in [job["id"] for job in keyed.get("/jobs", headers=key("a")).json()["jobs"]]
    assert keyed.get(status["result_url"], headers=key("a")).status_code == 200

    assert counterfactual(keyed, seed=4).status_code == 401
    assert keyed.post("/generate/shape", json={"label": 1}, headers={"X-API-Key": "wrong"}).status_code == 403
    assert keyed.post("/counterfactual", json={"shape": 3, "texture": 7, "background": 1},
                      headers=key("b")).status_code == 200


def test_deleting_a_finished_job_deletes_its_result(http, vstack):
    status = wait_job(http, http.post("/jobs", json={"n": 5, "seed": 1}).json()["id"])
    files = vstack.root / "data" / "jobs" / status["id"]
    assert (files / "result.npz").is_file()
    assert http.delete(f"/jobs/{status['id']}").status_code == 204
    assert not files.exists()
    for path in (f"/jobs/{status['id']}", status["result_url"]):
        assert http.get(path).status_code == 404


def test_a_model_file_failing_its_sha256_is_refused_and_reported(http, vstack):
    latest = current_version(vstack.models_dir)
    shape_file = vstack.models_dir / FAMILY / "corrupt" / "shape.onnx"

    def corrupt(manifest, directory):
        with open(directory / manifest["mechanisms"]["shape"]["file"], "ab") as handle:
            handle.write(b"tampered")

    new_version(vstack.models_dir, latest, "corrupt", corrupt)
    def corrupt_version(status: str) -> dict | None:
        entry = versions_of(http)["corrupt"]
        return entry if entry["status"] == status else None

    refused = poll(lambda: corrupt_version("unavailable"), 15, "the worker to refuse the corrupt version")
    assert "fails its sha256 check" in refused["reason"] and "worker worker1@" in refused["reason"]
    log = (vstack.root / "worker1.log").read_text()
    assert f"refusing to serve {FAMILY}/corrupt: model file {shape_file} fails its sha256 check" in log
    for path, body in (("/counterfactual", {"shape": 1, "texture": 1, "background": 1, "version": "corrupt"}),
                       ("/jobs", {"n": 5, "version": "corrupt"})):
        answer = http.post(path, json=body)
        assert answer.status_code == 503, answer.text
        assert "model double_colored_mnist/corrupt is unavailable" in answer.json()["error"]
        assert "fails its sha256 check" in answer.json()["error"]
    assert versions_of(http)[latest]["status"] == "available"
    assert counterfactual(http, seed=1).status_code == 200

    # Restored files are served again, without a restart.
    shutil.copyfile(vstack.models_dir / FAMILY / latest / "shape.onnx", shape_file)
    poll(lambda: corrupt_version("available"), 15, "the restored version")
    assert counterfactual(http, seed=1, version="corrupt").status_code == 200


def test_expired_jobs_are_cleaned_up_and_running_jobs_are_not(vstack):
    """Last in the module: while its gateway runs, every job of this stack that ended 1.5 s ago is deleted."""
    url = vstack.start_gateway(job_retention_s=1.5, cleanup_interval_s=0.2)
    worker = vstack.workers["worker1"]
    jobs_dir = vstack.root / "data" / "jobs"
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            ended = wait_job(http, http.post("/jobs", json={"n": 5, "seed": 1}).json()["id"])
            assert (jobs_dir / ended["id"]).is_dir()
            running = http.post("/jobs", json={"n": 2000, "seed": 2}).json()["id"]
            poll(lambda: http.get(f"/jobs/{running}").json()["progress"]["done"] > 0, 30, "the job to start")
            os.kill(worker.pid, signal.SIGSTOP)  # holds the job running for as long as the test needs
            try:
                poll(lambda: http.get(f"/jobs/{ended['id']}").status_code == 404, 10, "the ended job to expire")
                assert not (jobs_dir / ended["id"]).exists()
                time.sleep(2)  # the running job is now older than the retention, and several passes have run
                status = http.get(f"/jobs/{running}").json()
                assert status["state"] == "running" and any((jobs_dir / running / "chunks").iterdir())
                assert running in [job["id"] for job in http.get("/jobs").json()["jobs"]]
            finally:
                os.kill(worker.pid, signal.SIGCONT)
            wait_job(http, running)
            poll(lambda: http.get(f"/jobs/{running}").status_code == 404, 10, "the finished job to expire")
            assert not (jobs_dir / running).exists()
            assert running not in [job["id"] for job in http.get("/jobs").json()["jobs"]]
    finally:
        vstack.stop_gateway(url)
