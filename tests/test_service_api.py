"""The HTTP API against a real Redis, Celery worker and uvicorn: success paths, determinism, cache, bad input."""
from __future__ import annotations

import re

import shutil
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import yaml

from core.imageio import decode
from core.vocabulary import LABEL_NAMES
from tests.service_helpers import (
    COUNTERFACTUAL, FAMILY, GENERATE, REPO, counterfactual, current_version, images_of, metric,
)


def test_gateway_imports_neither_torch_nor_onnxruntime():
    code = ("import sys, service.app, service.__main__, service.run_local; "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnxruntime'}); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_health_readiness_and_models(client, models_dir):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["redis"] == "ok"
    (worker,) = ready["workers"]
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert worker["provider"] == ("CUDAExecutionProvider" if cuda else "CPUExecutionProvider")
    latest = current_version(models_dir)
    assert f"{FAMILY}/{latest}" in worker["loaded"]

    listing = client.get("/models").json()
    assert listing["default_model"] == FAMILY
    (family,) = [entry for entry in listing["models"] if entry["name"] == FAMILY]
    assert family["latest"] == latest
    (version,) = [entry for entry in family["versions"] if entry["version"] == latest]
    assert version["labels"]["count"] == 10 and version["image_size"] == 32
    assert set(version["mechanisms"]) == {"shape", "texture", "background"}
    # Texture and background labels are colours: named from core.vocabulary (the manifest's names stay digits).
    assert version["label_names"] == {"texture": list(LABEL_NAMES[FAMILY]["texture"]),
                                      "background": list(LABEL_NAMES[FAMILY]["background"])}
    assert (version["label_names"]["texture"][2], version["label_names"]["background"][5]) == ("lime", "burlywood")
    assert version["labels"]["names"] == [str(k) for k in range(10)]
    assert listing["workers"][0]["provider"] == worker["provider"]

    docs = client.get("/docs")
    assert docs.status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/counterfactual", "/generate/{mechanism}", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/result"} <= set(paths)


def test_counterfactual_json_components_and_png(client, models_dir):
    answer = counterfactual(client, n=4, seed=11, return_components=True, return_noise=True)
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    assert (payload["model"], payload["version"], payload["seed"]) == (FAMILY, current_version(models_dir), 11)
    assert images_of(payload).shape == (4, 32, 32, 3)
    for name in ("mask", "texture", "background"):
        assert images_of(payload["components"], name).shape == (4, 32, 32, 3)
    assert {name: np.shape(z) for name, z in payload["z"].items()} == {m: (4, 32) for m in ("shape", "texture",
                                                                                             "background")}
    png = client.post("/counterfactual", json={"shape": 3, "texture": 7, "background": 1, "n": 4, "seed": 11},
                      headers={"Accept": "image/png"})
    assert png.headers["content-type"] == "image/png"
    assert decode(png.content).shape == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2, 3)  # a 2×2 grid with 2-px padding
    single = client.post("/counterfactual", json={"shape": 3, "texture": 7, "background": 1, "seed": 11},
                         headers={"Accept": "image/png"})
    np.testing.assert_array_equal(decode(single.content), images_of(payload)[0])


def test_no_seed_gets_a_random_one_that_reproduces(client):
    first = counterfactual(client, seed=None).json()
    assert isinstance(first["seed"], int)
    again = counterfactual(client, seed=first["seed"]).json()
    np.testing.assert_array_equal(images_of(first), images_of(again))


def test_same_seed_same_pixels_cached_or_not(client):
    before = client.get("/metrics").text
    first = counterfactual(client, seed=2024, n=3)
    second = counterfactual(client, seed=2024, n=3)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert (first.json()["cached"], second.json()["cached"]) == (False, True)
    np.testing.assert_array_equal(images_of(first.json()), images_of(second.json()))
    after = client.get("/metrics").text
    hits = metric(after, "skdcgn_cache_hits_total", **COUNTERFACTUAL)
    assert hits == metric(before, "skdcgn_cache_hits_total", **COUNTERFACTUAL) + 1
    misses = metric(after, "skdcgn_cache_misses_total", **COUNTERFACTUAL)
    assert misses == metric(before, "skdcgn_cache_misses_total", **COUNTERFACTUAL) + 1

    # A request that differs only in what it returns is a cache miss, rendered afresh: same pixels.
    fresh = counterfactual(client, seed=2024, n=3, return_noise=True)
    assert fresh.headers["x-cache"] == "miss"
    np.testing.assert_array_equal(images_of(fresh.json()), images_of(first.json()))
    # Passing the returned z back in reproduces the images too.
    replay = counterfactual(client, seed=2024, n=3, z=fresh.json()["z"])
    np.testing.assert_array_equal(images_of(replay.json()), images_of(first.json()))
    other = counterfactual(client, seed=2025, n=3)
    assert not np.array_equal(images_of(other.json()), images_of(first.json()))


def test_mask_modifiers(client):
    plain = counterfactual(client, seed=5, n=2, return_components=True).json()
    hidden = counterfactual(client, seed=5, n=2, return_components=True, mask={"transparency": 0.0}).json()
    assert images_of(hidden["components"], "mask").max() == 0
    # With a fully transparent mask the counterfactual is its background.
    np.testing.assert_array_equal(images_of(hidden), images_of(hidden["components"], "background"))
    study = {"transparency": 0.75, "rotation_deg": 90, "noise_std": 0.1}
    modified = counterfactual(client, seed=5, n=2, mask=study).json()
    assert not np.array_equal(images_of(modified), images_of(plain))
    again = counterfactual(client, seed=5, n=2, mask=study, return_noise=True).json()  # not from the cache
    np.testing.assert_array_equal(images_of(again), images_of(modified))


@pytest.mark.parametrize("mechanism", ["shape", "texture", "background"])
def test_generate_mechanism(client, mechanism):
    answer = client.post(f"/generate/{mechanism}", json={"label": 3, "n": 3, "seed": 9})
    assert answer.status_code == 200, answer.text
    images = images_of(answer.json())
    assert images.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(images_of(client.post(f"/generate/{mechanism}",
                                                        json={"label": 3, "n": 3, "seed": 9}).json()), images)
    if mechanism == "shape":
        assert (images[..., 0] == images[..., 1]).all()  # masks come back grey
        # The unmodified mask of a counterfactual with the same seed and shape label is this mask.
        composed = counterfactual(client, shape=3, n=3, seed=9, return_components=True).json()
        np.testing.assert_array_equal(images_of(composed["components"], "mask"), images)
    png = client.post(f"/generate/{mechanism}", json={"label": 3, "seed": 9}, headers={"Accept": "image/png"})
    np.testing.assert_array_equal(decode(png.content), images[0])


BAD_INPUTS = [
    ("shape label too big", "/counterfactual", {"shape": 10, "texture": 1, "background": 1}, 422, "labels 0..9"),
    ("negative label", "/counterfactual", {"shape": 1, "texture": -1, "background": 1}, 422, "labels 0..9"),
    ("missing label", "/counterfactual", {"shape": 1, "texture": 1}, 422, "background: Field required"),
    ("misspelt field", "/counterfactual", {"shap": 1, "shape": 1, "texture": 1, "background": 1}, 422,
     "shap: Extra inputs are not permitted"),
    ("unknown model", "/counterfactual", {"model": "nope", "shape": 1, "texture": 1, "background": 1}, 404,
     f"available models: .*{FAMILY}"),
    ("unknown version", "/counterfactual", {"version": "v999", "shape": 1, "texture": 1, "background": 1}, 404,
     "available:"),
    ("n over the maximum", "/counterfactual", {"shape": 1, "texture": 1, "background": 1, "n": 17}, 422,
     "maximum of 16"),
    ("zero n", "/counterfactual", {"shape": 1, "texture": 1, "background": 1, "n": 0}, 422, "greater than or equal to 1"),
    ("transparency out of range", "/counterfactual",
     {"shape": 1, "texture": 1, "background": 1, "mask": {"transparency": 1.5}}, 422, "less than or equal to 1"),
    ("rotation out of range", "/counterfactual",
     {"shape": 1, "texture": 1, "background": 1, "mask": {"rotation_deg": 181}}, 422, "less than or equal to 180"),
    ("noise out of range", "/counterfactual",
     {"shape": 1, "texture": 1, "background": 1, "mask": {"noise_std": -0.1}}, 422, "greater than or equal to 0"),
    ("z of the wrong size", "/counterfactual",
     {"shape": 1, "texture": 1, "background": 1, "z": {"shape": [[0.0] * 31]}}, 422, "1 vectors of 32 numbers"),
    ("unknown mechanism", "/generate/colour", {"label": 1}, 422, "'shape', 'texture' or 'background'"),
    ("mechanism label too big", "/generate/shape", {"label": 12}, 422, "labels 0..9"),
    ("unknown job format", "/jobs", {"n": 10, "format": "gif"}, 422, "'npz', 'png' or 'webdataset'"),
    ("job over the maximum", "/jobs", {"n": 5001}, 422, "maximum of 5000"),
    ("job label out of range", "/jobs", {"n": 10, "labels": {"shape": [0, 12]}}, 422, "labels.shape: label 12"),
    ("job with empty label list", "/jobs", {"n": 10, "labels": {"texture": []}}, 422, "at least 1 item"),
]


@pytest.mark.parametrize("path, body, status, message", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_rejected_before_any_work(client, path, body, status, message):
    before = client.get("/metrics").text
    answer = client.post(path, json=body)
    assert answer.status_code == status, answer.text
    assert re.search(message, answer.json()["error"]), answer.json()["error"]  # messages are regex patterns
    after = client.get("/metrics").text
    # Nothing was looked up in the cache (the step before queueing) and no job was submitted.
    for name, labels in (("skdcgn_cache_misses_total", COUNTERFACTUAL),
                         ("skdcgn_cache_misses_total", GENERATE),
                         ("skdcgn_jobs_total", {"event": "submitted"})):
        assert metric(after, name, **labels) == metric(before, name, **labels)


def test_malformed_json_is_a_400(client):
    answer = client.post("/counterfactual", content=b'{"shape": 3, "texture": ', headers={"Content-Type":
                                                                                          "application/json"})
    assert answer.status_code == 400
    assert "not valid JSON" in answer.json()["error"]


@pytest.mark.parametrize("job_id", ["0" * 32, "not-a-job", "..%2F..%2Fetc%2Fpasswd"])
def test_unknown_or_malformed_job_ids_are_404(client, job_id):
    for method, path in (("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/result"), ("DELETE", f"/jobs/{job_id}")):
        assert client.request(method, path).status_code == 404


def test_metrics_exposition(client):
    counterfactual(client, seed=77)
    text = client.get("/metrics").text
    assert metric(text, "skdcgn_redis_up") == 1
    assert metric(text, "skdcgn_workers_ready") == 1
    assert metric(text, "skdcgn_images_generated_total") > 0
    assert metric(text, "skdcgn_http_requests_total", method="POST", route="/counterfactual", status="200") > 0
    assert metric(text, "skdcgn_http_request_duration_seconds_count", route="/counterfactual") > 0
    for series in ('skdcgn_queue_depth{queue="interactive"}', 'skdcgn_queue_depth{queue="jobs"}',
                   'skdcgn_jobs_total{event="submitted"}'):
        assert series in text


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose (Debian's 1.29) is not installed")
def test_docker_compose_file_validates():
    result = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "config"], cwd=REPO, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"redis", "cache", "gateway", "worker-cpu", "worker-gpu"} <= set(services)
    (device,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"
    # Every long-running service has a healthcheck; a one-shot (restart on-failure, e.g. s3-bucket) exits instead.
    assert all("healthcheck" in service for service in services.values() if service.get("restart") != "on-failure")
    assert "noeviction" in " ".join(services["redis"]["command"])
    assert "allkeys-lru" in " ".join(services["cache"]["command"])


def test_a_repeated_request_is_answered_from_the_cache_with_the_same_body(client):
    """Byte-identical seeded requests skip validation (service.repeats) and answer exactly what the first did."""
    body = {"shape": 6, "texture": 0, "background": 9, "n": 2, "seed": 31337}
    first, second, third = (client.post("/counterfactual", json=body) for _ in range(3))
    assert [answer.headers["x-cache"] for answer in (first, second, third)] == ["miss", "hit", "hit"]
    assert second.content == third.content and second.json() == {**first.json(), "cached": True}
    for answer in (second, third):
        assert answer.headers["x-model-version"] == first.headers["x-model-version"]
        assert answer.headers["x-request-id"] != first.headers["x-request-id"]
    text = client.get("/metrics").text
    assert metric(text, "skdcgn_http_requests_total", method="POST", route="/counterfactual", status="200") >= 3
    assert metric(text, "skdcgn_http_requests_total", method="POST", route="unmatched", status="200") == 0
