"""Hostile input against the real stack: every refusal is a 4xx naming what is valid, in the one error shape
{"error": ...}, before anything is queued or cached.

Most tests use the shared gateway (SKDCGN_MAX_BODY_BYTES at its 2 MiB default); the rest use one more gateway
on the same Redis and worker, with API keys, a small body limit, one active job per key and a job maximum far
beyond any disk.
"""
from __future__ import annotations

import json
import socket

import httpx
import pytest

from core.jobs import job_key
from core.settings import Settings
from tests.service_helpers import COUNTERFACTUAL, FAMILY, GENERATE, counterfactual, metric, wait_job

DEFAULT_BODY_LIMIT = Settings().max_body_bytes
SMALL_BODY_LIMIT = 16 * 1024
KEYS = {"disk": "key-disk-0123456789", "cap": "key-cap-0123456789", "other": "key-other-0123456789",
        "view": "key-view-0123456789"}
UNTOUCHED = (("skdcgn_cache_misses_total", COUNTERFACTUAL),
             ("skdcgn_cache_misses_total", GENERATE),
             ("skdcgn_cache_hits_total", COUNTERFACTUAL),
             ("skdcgn_jobs_total", {"event": "submitted"}))


@pytest.fixture(scope="module")
def limited(stack):
    url = stack.start_gateway(api_keys=",".join(KEYS.values()), max_active_jobs_per_key=1, max_job_n=10**15,
                              max_body_bytes=SMALL_BODY_LIMIT)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            yield http
    finally:
        stack.stop_gateway(url)


def key(name: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[name]}


def error_of(answer: httpx.Response, status: int) -> str:
    """The message of an error answer, after checking its status and its one shape."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert set(body) <= {"error", "detail"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def nothing_done(client: httpx.Client, request):
    """Run `request`; assert no cache lookup happened and no job was submitted meanwhile."""
    before = client.get("/metrics").text
    answer = request()
    after = client.get("/metrics").text
    for name, labels in UNTOUCHED:
        assert metric(after, name, **labels) == metric(before, name, **labels), name
    return answer


def raw_request(url: str, head: str) -> tuple[int, dict, bytes]:
    """Send only a request head (no body) and read the answer until the server closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(head.encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
    return int(status_line.split()[1]), headers, body


# --- body limit ----------------------------------------------------------------------------------------------------

def test_content_length_over_the_limit_is_413_before_the_body_is_read(stack, client):
    def request():
        return raw_request(stack.url, "POST /counterfactual HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
                                      f"\r\nContent-Length: {DEFAULT_BODY_LIMIT + 1}\r\n\r\n")

    status, headers, body = nothing_done(client, request)  # answered with no body byte sent
    assert status == 413 and headers["connection"] == "close"
    message = json.loads(body)["error"]
    assert set(json.loads(body)) == {"error"}
    assert str(DEFAULT_BODY_LIMIT) in message and "SKDCGN_MAX_BODY_BYTES" in message


def test_streamed_body_over_the_limit_is_413(limited):
    def chunks(size: int):
        yield b'{"shape": 1, "texture": 1, "background": 1, "pad": "'
        for _ in range(size // 1024):
            yield b"x" * 1024
        yield b'"}'

    answer = nothing_done(limited, lambda: limited.post("/counterfactual", content=chunks(4 * SMALL_BODY_LIMIT),
                                                        headers={"Content-Type": "application/json"}))
    assert "content-length" not in answer.request.headers  # chunked: only counting can catch it
    assert str(SMALL_BODY_LIMIT) in error_of(answer, 413)
    # A streamed body under the limit reaches validation.
    under = limited.post("/counterfactual", content=chunks(SMALL_BODY_LIMIT // 2),
                         headers={"Content-Type": "application/json"})
    assert "pad: Extra inputs are not permitted" in error_of(under, 422)


# --- labels, z, strict types ---------------------------------------------------------------------------------------

def test_label_bomb_is_422_and_duplicate_labels_are_stored_once(client, stack):
    bomb = {"n": 10, "labels": {"shape": [3] * 200_000}}
    message = error_of(nothing_done(client, lambda: client.post("/jobs", json=bomb)), 422)
    assert "labels.shape: 200000 labels listed" in message and "10 labels 0..9" in message and len(message) < 300

    accepted = client.post("/jobs", json={"n": 5, "seed": 8, "labels": {"shape": [3, 3, 1, 3], "texture": [2] * 10}})
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    with stack.redis() as redis:
        assert redis.memory_usage(job_key(job_id)) < 8 * 1024
        spec = json.loads(redis.hget(job_key(job_id), "spec"))
    assert spec["labels"] == {"shape": [1, 3], "texture": [2], "background": list(range(10))}
    assert spec["request"]["labels"] == {"shape": [1, 3], "texture": [2], "background": None}
    wait_job(client, job_id)


@pytest.mark.parametrize("z, fragment", [
    ('[[1e39, 0.0]]', "outside float32's range"),
    ('[[-3.5e38]]', "outside float32's range"),
    ('[[1e400]]', "finite number"),
    ('[[NaN]]', "finite number"),
    ('[[-Infinity]]', "finite number"),
])
def test_z_outside_float32_is_422(client, z, fragment):
    body = '{"shape": 1, "texture": 2, "background": 3, "z": {"texture": ' + z + '}}'
    answer = nothing_done(client, lambda: client.post("/counterfactual", content=body,
                                                      headers={"Content-Type": "application/json"}))
    assert fragment in error_of(answer, 422)


STRICT = [
    ("/counterfactual", {"shape": True, "texture": 1, "background": 1}, "shape: Input should be a valid integer"),
    ("/counterfactual", {"shape": "3", "texture": 1, "background": 1}, "shape: Input should be a valid integer"),
    ("/counterfactual", {"shape": 3, "texture": 1, "background": 1, "n": 2.0}, "n: Input should be a valid integer"),
    ("/counterfactual", {"shape": 3, "texture": 1, "background": 1, "return_noise": 0},
     "return_noise: Input should be a valid boolean"),
    ("/generate/shape", {"label": "1"}, "label: Input should be a valid integer"),
    ("/jobs", {"n": 10, "labels": {"shape": [1, True]}}, "labels.shape.1: Input should be a valid integer"),
    ("/jobs", {"n": "10"}, "n: Input should be a valid integer"),
]


@pytest.mark.parametrize("path, body, message", STRICT, ids=[str(case[1]) for case in STRICT])
def test_types_are_strict(client, path, body, message):
    assert message in error_of(nothing_done(client, lambda: client.post(path, json=body)), 422)


def test_number_fields_still_take_json_integers(client):
    answer = counterfactual(client, n=1, seed=31, mask={"transparency": 1, "rotation_deg": 0})
    assert answer.status_code == 200, answer.text


# --- one error shape -----------------------------------------------------------------------------------------------

def test_every_refusal_has_the_one_error_shape(client):
    assert "/counterfactual" in error_of(client.get("/no/such/route"), 404)
    put = client.put("/jobs")
    assert "GET, POST" in error_of(put, 405) and put.headers["allow"] == "GET, POST"
    post = client.post(f"/jobs/{'0' * 32}", json={})
    assert "DELETE, GET" in error_of(post, 405) and post.headers["allow"] == "DELETE, GET"
    assert client.post("/healthz").headers["allow"] == "GET"
    broken = client.post("/jobs", content=b'{"n": ', headers={"Content-Type": "application/json"})
    assert "not valid JSON" in error_of(broken, 400)
    for headers in ({"Content-Type": "text/plain"}, {}):
        refused = client.post("/jobs", content=b'{"n": 5}', headers=headers)
        assert "Content-Type: application/json" in error_of(refused, 415)


def test_a_422_echoes_only_a_short_prefix_of_the_input(client):
    long_text = "x" * 20_000
    for body in ({"shape": long_text, "texture": 1, "background": 1},
                 {"shape": 1, "texture": 1, "background": 1, long_text: 1},
                 {"shape": 1, "texture": 1, "background": 1, "model": long_text}):
        answer = client.post("/counterfactual", json=body)
        error_of(answer, 422)
        assert len(answer.content) < 1500 and "x" * 100 not in answer.text
    many = client.post("/counterfactual", content='{"shape": 1, "texture": 1, "background": 1, "n": 2, "z": '
                                                  '{"shape": [[' + ", ".join(["NaN"] * 5000) + ']]}}',
                       headers={"Content-Type": "application/json"})
    assert "(and 4990 more)" in error_of(many, 422) and len(many.json()["detail"]) == 10
    cursor = client.get("/jobs", params={"cursor": "c" * 5000})
    assert "c" * 100 not in error_of(cursor, 422)


# --- disk space and active jobs per key ----------------------------------------------------------------------------

def test_a_job_that_would_not_fit_on_disk_is_507(limited):
    answer = nothing_done(limited, lambda: limited.post("/jobs", json={"n": 10**12}, headers=key("disk")))
    message = error_of(answer, 507)
    assert "needs about" in message and "are free" in message and "ask for n ≤" in message
    assert limited.get("/jobs", headers=key("disk")).json()["jobs"] == []


def test_each_key_has_a_cap_on_active_jobs(limited):
    assert "X-API-Key" in error_of(limited.post("/jobs", json={"n": 5}), 401)
    error_of(limited.post("/jobs", json={"n": 5}, headers={"X-API-Key": "wrong"}), 403)
    first = limited.post("/jobs", json={"n": 20_000, "seed": 1}, headers=key("cap"))
    assert first.status_code == 202, first.text
    try:
        second = nothing_done(limited, lambda: limited.post("/jobs", json={"n": 5}, headers=key("cap")))
        assert "SKDCGN_MAX_ACTIVE_JOBS_PER_KEY=1" in error_of(second, 429)
        assert int(second.headers["retry-after"]) >= 1
        other = limited.post("/jobs", json={"n": 5, "seed": 2}, headers=key("other"))  # another key's count
        assert other.status_code == 202, other.text
    finally:
        limited.delete(f"/jobs/{first.json()['id']}", headers=key("cap"))
    again = limited.post("/jobs", json={"n": 5, "seed": 3}, headers=key("cap"))  # the cancelled job is no longer active
    assert again.status_code == 202, again.text
    wait_job(limited, again.json()["id"], headers=key("cap"))
    wait_job(limited, other.json()["id"], headers=key("other"))


# --- what a caller without a key sees ------------------------------------------------------------------------------

def test_readiness_and_models_hide_worker_hosts_without_a_key(limited):
    for headers in ({}, {"X-API-Key": "wrong"}):
        ready = limited.get("/readyz", headers=headers)
        assert ready.status_code == 200, ready.text
        listing = limited.get("/models", headers=headers)
        family = limited.get(f"/models/{FAMILY}", headers=headers)
        for answer in (ready, listing, family):
            assert socket.gethostname() not in answer.text and "worker1@" not in answer.text
        for workers in (ready.json()["workers"], listing.json()["workers"]):
            (worker,) = workers
            assert "pid" not in worker and worker["name"] == "#1" and worker["loaded"]
    (worker,) = limited.get("/readyz", headers=key("view")).json()["workers"]
    assert worker["name"].startswith("worker1@") and isinstance(worker["pid"], int)


# --- the documentation ---------------------------------------------------------------------------------------------

def test_openapi_documents_errors_limits_examples_and_the_key(client):
    spec = client.get("/openapi.json").json()
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    jobs = spec["paths"]["/jobs"]["post"]
    for status in ("400", "401", "403", "404", "413", "415", "422", "429", "503", "507"):
        assert jobs["responses"][status]["content"]["application/json"]["schema"] == error_ref, status
    readyz = spec["paths"]["/readyz"]["get"]["responses"]
    for status in ("404", "405", "422", "503"):
        assert readyz[status]["content"]["application/json"]["schema"] == error_ref
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "n ≤ 16 per synchronous request" in spec["info"]["description"]
    assert f"{DEFAULT_BODY_LIMIT} bytes" in spec["info"]["description"]
    for name in ("CounterfactualRequest", "MechanismRequest", "JobRequest"):
        assert spec["components"]["schemas"][name]["examples"], name
    assert spec["components"]["securitySchemes"]["APIKey"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": spec["components"]["securitySchemes"]["APIKey"]["description"]}
    # This gateway has no API keys: the key is declared, and optional ({}), as this server enforces it.
    assert jobs["security"] == [{"APIKey": []}, {}]
    assert spec["paths"]["/counterfactual"]["post"]["security"] == [{"APIKey": []}, {}]


# --- what errors echo, redirects, and the OpenAPI document against the service (issue 22, item 8) -------------------

def test_404s_echo_only_a_short_prefix_of_long_ids_and_names(client):
    job_id = "a" * 8192
    for answer in (client.get(f"/jobs/{job_id}"), client.get(f"/jobs/{job_id}/result"),
                   client.get(f"/jobs/{job_id}/checksums"), client.delete(f"/jobs/{job_id}")):
        assert "job ids are 32 lowercase hex digits" in error_of(answer, 404)
        assert len(answer.content) < 500 and "a" * 100 not in answer.text
    family = "f" * 20_000
    listing = client.get(f"/models/{family}")
    assert "unknown model" in error_of(listing, 404) and FAMILY in listing.text
    assert len(listing.content) < 500 and "f" * 100 not in listing.text
    name = "f" * 100  # the longest name the request schema takes: its 404 echoes a shorter prefix still
    for path, body in (("/counterfactual", {"shape": 1, "texture": 1, "background": 1, "model": name}),
                       ("/counterfactual", {"shape": 1, "texture": 1, "background": 1, "version": name}),
                       ("/generate/shape", {"label": 1, "version": name}),
                       ("/jobs", {"n": 5, "model": name})):
        answer = client.post(path, json=body)
        error_of(answer, 404)
        assert "f" * 81 not in answer.text and "…" in answer.text, answer.text


def test_a_trailing_slash_is_a_404_never_a_redirect_that_reflects_the_host(stack):
    for method, path, bare in (("GET", "/jobs/", "/jobs"), ("POST", "/jobs/", "/jobs"), ("GET", "/readyz/", "/readyz"),
                               ("GET", "/models/", "/models"), ("GET", f"/jobs/{'0' * 32}/", f"/jobs/{'0' * 32}")):
        status, headers, body = raw_request(stack.url, f"{method} {path} HTTP/1.1\r\nHost: evil.example\r\n"
                                                       "Content-Length: 0\r\nConnection: close\r\n\r\n")
        assert status == 404 and "location" not in headers, (method, path, status, headers)
        assert headers["content-type"].startswith("application/json") and b"evil.example" not in body
        message = json.loads(body)["error"]
        assert f"no route {method} {path}" in message and f"no trailing slash: {bare})" in message, message
    head = "GET /static HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    status, headers, _ = raw_request(stack.url, head)
    assert status == 404 and "location" not in headers


OPEN_ROUTES = ("/healthz", "/readyz", "/models", "/models/{family}", "/metrics")


def test_openapi_declares_keys_as_enforced_and_text_for_metrics(client, limited):
    spec = client.get("/openapi.json").json()  # a gateway without API keys
    keyed = limited.get("/openapi.json").json()  # with keys, not for rendering (SKDCGN_API_KEYS_FOR_GENERATION=0)
    for document in (spec, keyed):
        assert "security" not in document  # no global requirement: each keyed operation declares its own
        for path in OPEN_ROUTES:
            assert "security" not in document["paths"][path]["get"], path
        for path in ("/counterfactual", "/generate/{mechanism}"):
            assert document["paths"][path]["post"]["security"] == [{"APIKey": []}, {}], path  # optional
    for path, operations in keyed["paths"].items():
        if path.startswith("/jobs"):
            for method, operation in operations.items():
                assert operation["security"] == [{"APIKey": []}], (method, path)  # required
                assert spec["paths"][path][method]["security"] == [{"APIKey": []}, {}], (method, path)
    cursor = next(p for p in spec["paths"]["/jobs"]["get"]["parameters"] if p["name"] == "cursor")
    assert cursor["schema"]["pattern"] and cursor["schema"]["maxLength"] <= 100
    metrics_ok = spec["paths"]["/metrics"]["get"]["responses"]["200"]
    assert list(metrics_ok["content"]) == ["text/plain"], metrics_ok
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
