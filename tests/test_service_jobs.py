"""Dataset jobs: npz and png results, label restriction, counterfactual groups, cancellation, API keys."""
from __future__ import annotations

import csv
import io
import json
import tarfile
import time

import httpx
import numpy as np
import pytest

from core.imageio import decode
from tests.service_helpers import counterfactual, current_version, images_of, load_npz, wait_job

API_KEY = "test-key-0123456789"


def test_npz_job_with_restricted_labels_and_groups(client, models_dir):
    request = {"n": 120, "seed": 7, "counterfactuals_per_shape": 10, "format": "npz",
               "labels": {"shape": [0, 1], "texture": None, "background": [5]}}
    accepted = client.post("/jobs", json=request)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    assert len(job_id) == 32 and int(job_id, 16) >= 0  # uuid4 hex: unguessable
    assert accepted.headers["location"] == f"/jobs/{job_id}"
    status = wait_job(client, job_id)
    assert status["progress"] == {"done": 120, "total": 120}
    assert status["started"] and status["finished"] and status["error"] is None

    data = load_npz(client.get(status["result_url"]).content)
    assert data["images"].shape == (120, 32, 32, 3) and data["images"].dtype == np.uint8
    assert data["labels"].shape == (120, 3)
    np.testing.assert_array_equal(data["indices"], np.arange(120))
    shapes, textures, backgrounds = data["labels"].T
    assert set(shapes) <= {0, 1} and set(backgrounds) == {5} and len(set(textures)) > 1
    assert all(len(set(shapes[g * 10:(g + 1) * 10])) == 1 for g in range(12))  # a group shares its shape label
    provenance = json.loads(data["provenance.json"])
    assert provenance["version"] == current_version(models_dir) and provenance["seed"] == 7
    assert provenance["samples"] == 120 and len(provenance["manifest_sha256"]) == 64

    # A group's first sample is the plain counterfactual of the same seed and index.
    for index in (0, 10):
        shape, texture, background = (int(v) for v in data["labels"][index])
        single = counterfactual(client, shape=shape, texture=texture, background=background, n=index + 1, seed=7)
        np.testing.assert_array_equal(images_of(single.json())[index], data["images"][index])


def test_png_job_holds_the_same_samples_as_npz(client):
    ids = {fmt: client.post("/jobs", json={"n": 30, "seed": 3, "format": fmt}).json()["id"] for fmt in ("npz", "png")}
    arrays = load_npz(client.get(f"/jobs/{wait_job(client, ids['npz'])['id']}/result").content)
    download = client.get(f"/jobs/{wait_job(client, ids['png'])['id']}/result")
    assert download.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(download.content)) as archive:
        rows = list(csv.DictReader(io.StringIO(archive.extractfile("labels.csv").read().decode())))
        assert len(rows) == 30
        for i, row in enumerate(rows):
            image = decode(archive.extractfile(row["file"]).read())
            np.testing.assert_array_equal(image, arrays["images"][i])
            assert [int(row[k]) for k in ("shape", "texture", "background")] == list(arrays["labels"][i])
            assert (int(row["seed"]), int(row["index"])) == (3, i)
        assert json.loads(archive.extractfile("provenance.json").read())["samples"] == 30


def test_cancel_stops_a_job_and_discards_its_chunks(client, stack):
    job_id = client.post("/jobs", json={"n": 5000, "seed": 1}).json()["id"]  # 100 chunks of 50
    early = client.get(f"/jobs/{job_id}/result")
    assert early.status_code == 409 and "once it has succeeded" in early.json()["error"]
    cancelled = client.delete(f"/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["finished"]
    redis_client = stack.redis()
    deadline = time.monotonic() + 30
    while redis_client.llen("jobs") and time.monotonic() < deadline:  # revoked chunks drain without rendering
        time.sleep(0.1)
    time.sleep(0.5)
    status = client.get(f"/jobs/{job_id}").json()
    assert status["state"] == "cancelled" and status["progress"]["done"] < 5000
    assert client.get(f"/jobs/{job_id}/result").status_code == 409
    job_files = stack.root / "data" / "jobs" / job_id
    assert not (job_files / "chunks").exists()  # a chunk that landed after the cancel was discarded by its worker
    # DELETE on an ended job deletes it.
    assert client.delete(f"/jobs/{job_id}").status_code == 204
    assert client.get(f"/jobs/{job_id}").status_code == 404 and not job_files.exists()


@pytest.fixture(scope="module")
def keyed_url(stack):
    return stack.start_gateway(api_keys=f"other-key,{API_KEY}")


def test_api_keys_guard_jobs_and_downloads(keyed_url):
    with httpx.Client(base_url=keyed_url, timeout=30) as http:
        body = {"n": 5, "seed": 2}
        missing = http.post("/jobs", json=body)
        assert missing.status_code == 401 and "X-API-Key" in missing.json()["error"]
        assert http.post("/jobs", json=body, headers={"X-API-Key": "wrong"}).status_code == 403
        accepted = http.post("/jobs", json=body, headers={"X-API-Key": API_KEY})
        assert accepted.status_code == 202
        job_id = accepted.json()["id"]
        assert http.get(f"/jobs/{job_id}").status_code == 401
        status = wait_job(http, job_id, headers={"X-API-Key": API_KEY})
        assert http.get(status["result_url"]).status_code == 401
        assert http.get(status["result_url"], headers={"X-API-Key": API_KEY}).status_code == 200
        assert http.delete(f"/jobs/{job_id}").status_code == 401
        # Single requests stay open.
        assert counterfactual(http, seed=4).status_code == 200
