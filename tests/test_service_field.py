"""The service in the field, with real processes: batching across requests, overload, a frozen Redis, a worker
killed mid-job at default settings, cancel, a chunk that keeps failing, orphaned job files. Bounded in time."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from core.jobs import job_key
from tests.service_helpers import (
    FAMILY, counterfactual, current_version, images_of, load_npz, metric, new_version, poll, wait_job,
)
from tests.service_stack import ServiceStack

REQUESTS = [{"shape": s, "texture": (s + 3) % 10, "background": (s + 7) % 10, "n": 1 + s % 3, "seed": 500 + s}
            for s in range(10)]


def post_all(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    with httpx.Client(base_url=url, timeout=30) as http, ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda body: counterfactual(http, **body), bodies))


def test_batched_alone_and_cached_pixels_are_identical(stack):
    """Batching never changes a pixel: the same requests alone, together in batches, and from the cache."""
    uncached = stack.start_gateway(cache_ttl_s=0, batch_window_ms=50)
    try:
        alone = [images_of(answer.json()) for answer in post_all(uncached, REQUESTS, 1)]
        before = metric(httpx.get(f"{uncached}/metrics").text, "skdcgn_render_batch_requests_count")
        together = post_all(uncached, REQUESTS, len(REQUESTS))
        batches = metric(httpx.get(f"{uncached}/metrics").text, "skdcgn_render_batch_requests_count") - before
        assert all(answer.status_code == 200 for answer in together)
        assert batches < len(REQUESTS)  # some requests shared a task
        cached_gateway = [post_all(stack.url, REQUESTS, len(REQUESTS)) for _ in range(2)][-1]
        assert all(answer.headers["x-cache"] == "hit" for answer in cached_gateway)
        for i, pixels in enumerate(alone):
            np.testing.assert_array_equal(pixels, images_of(together[i].json()))
            np.testing.assert_array_equal(pixels, images_of(cached_gateway[i].json()))
    finally:
        stack.stop_gateway(uncached)


def test_overload_is_429_with_retry_after_never_503(stack):
    """More concurrent requests than a gateway admits: the rest are refused 429 at once, nothing is an outage."""
    url = stack.start_gateway(max_in_flight=4, sync_timeout_s=3)
    worker = stack.workers["worker1"]
    try:
        os.kill(worker.pid, signal.SIGSTOP)  # every admitted request waits: the gateway stays full
        answers = post_all(url, [{"seed": 9000 + i} for i in range(12)], 12)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        stack.stop_gateway(url)
    statuses = sorted(answer.status_code for answer in answers)
    assert 429 in statuses and 503 not in statuses, statuses
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert refused.headers["retry-after"] and "SKDCGN_MAX_IN_FLIGHT=4" in refused.json()["error"]


def test_128_concurrent_clients_get_200_or_429_never_an_outage(stack):
    async def flood() -> list[int]:
        limits = httpx.Limits(max_connections=128)
        async with httpx.AsyncClient(base_url=stack.url, timeout=30, limits=limits) as http:
            bodies = [{"shape": 1, "texture": 2, "background": 3, "n": 1, "seed": 20_000 + i} for i in range(128)]
            answers = await asyncio.gather(*(http.post("/counterfactual", json=body) for body in bodies))
        return [answer.status_code for answer in answers]

    statuses = asyncio.run(flood())
    assert set(statuses) <= {200, 429}, sorted(set(statuses))


@pytest.fixture(scope="module")
def field_stack(tmp_path_factory, models_dir):
    """A stack at default settings (visibility timeout, chunk size, timeouts): faults must be survived as shipped."""
    with ServiceStack(tmp_path_factory.mktemp("field"), models_dir) as service:
        yield service


def test_frozen_redis_gives_503_within_2_s_and_recovers(field_stack):
    with httpx.Client(base_url=field_stack.url, timeout=30) as http:
        assert counterfactual(http, seed=1).status_code == 200
        job = http.post("/jobs", json={"n": 10}).json()
        wait_job(http, job["id"])
        field_stack.redis_process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.2)
            for method, path, body in (("POST", "/counterfactual", {"shape": 1, "texture": 2, "background": 3}),
                                       ("POST", "/counterfactual", {"shape": 3, "texture": 7, "background": 1,
                                                                    "n": 2, "seed": 1}),  # a cache hit before
                                       ("POST", "/jobs", {"n": 10}), ("GET", f"/jobs/{job['id']}", None),
                                       ("GET", "/jobs", None), ("GET", "/readyz", None)):
                started = time.monotonic()
                answer = http.request(method, path, json=body)
                elapsed = time.monotonic() - started
                assert answer.status_code == 503, (path, answer.text)
                assert elapsed < 2.0, (path, elapsed)
                assert "Redis at 127.0.0.1" in answer.json()["error"] and answer.headers["retry-after"]
            assert http.get("/healthz").status_code == 200
        finally:
            field_stack.redis_process.send_signal(signal.SIGCONT)
        assert poll(lambda: counterfactual(http, seed=4).status_code == 200, 15, "recovery after SIGCONT")
        assert http.get("/readyz").status_code == 200


def test_a_worker_killed_mid_job_at_default_settings_loses_nothing(field_stack):
    n, seed = 6000, 77
    with httpx.Client(base_url=field_stack.url, timeout=30) as http:
        job_id = http.post("/jobs", json={"n": n, "seed": seed}).json()["id"]
        poll(lambda: 0 < http.get(f"/jobs/{job_id}").json()["progress"]["done"] < n - 2000, 60, "a part-way job")
        field_stack.kill_worker()
        field_stack.start_worker()
        started = time.monotonic()
        status = wait_job(http, job_id, timeout=120)
        print(f"job finished {time.monotonic() - started:.1f} s after the new worker started")
        data = load_npz(http.get(status["result_url"]).content)
    assert status["progress"] == {"done": n, "total": n} and len(data["images"]) == n
    np.testing.assert_array_equal(data["indices"], np.arange(n))  # no duplicates, no gaps
    assert len(np.unique(data["images"].reshape(n, -1), axis=0)) == n


def test_cancel_is_final(field_stack, tmp_path):
    with httpx.Client(base_url=field_stack.url, timeout=30) as http:
        job_id = http.post("/jobs", json={"n": 20_000, "seed": 5}).json()["id"]
        poll(lambda: http.get(f"/jobs/{job_id}").json()["progress"]["done"] > 0, 60, "the job to start")
        cancelled = http.delete(f"/jobs/{job_id}").json()
        assert cancelled["state"] == "cancelled"
        time.sleep(4)  # chunks in flight land, or not
        after = http.get(f"/jobs/{job_id}").json()
        assert after["state"] == "cancelled" and after["progress"] == cancelled["progress"]
        assert http.get(f"/jobs/{job_id}/result").status_code == 409
    assert not list((field_stack.root / "data" / "jobs" / job_id).glob("result*"))


def test_a_chunk_that_keeps_failing_is_retried_then_fails_the_job_naming_it(field_stack, models_dir):
    def break_fused_outputs(manifest: dict, _directory) -> None:  # files check out; rendering raises
        manifest["fused"]["bindings"]["shape"]["output"] = "no_such_output"

    broken = "broken-outputs"
    new_version(models_dir, current_version(models_dir), broken, break_fused_outputs)
    try:
        with httpx.Client(base_url=field_stack.url, timeout=30) as http:
            job_id = http.post("/jobs", json={"n": 10, "version": broken}).json()["id"]
            status = wait_job(http, job_id, states=("failed",), timeout=60)
    finally:
        shutil.rmtree(models_dir / FAMILY / broken)
    assert status["error"].startswith("chunk 0 (samples 0..9) failed 3 times:")
    assert "no_such_output" in status["error"]


def test_orphaned_job_files_are_removed_after_retention(field_stack):
    orphan = field_stack.root / "data" / "jobs" / ("0123456789abcdef" * 2)
    (orphan / "chunks").mkdir(parents=True)
    (orphan / "chunks" / "000000.npz").write_bytes(b"left behind")
    old = time.time() - 60
    os.utime(orphan, (old, old))
    url = field_stack.start_gateway(job_retention_s=30, cleanup_interval_s=0.5)
    try:
        poll(lambda: not orphan.exists(), 10, "the orphaned job folder to be removed")
        assert field_stack.redis().exists(job_key(orphan.name)) == 0
    finally:
        field_stack.stop_gateway(url)
