"""Load and faults with real processes: a flooded queue, Redis down and back, a worker killed mid-job,
a version promoted while the service runs (tests/test_service_versions.py covers refused model files)."""
from __future__ import annotations

import os
import signal
import time

import httpx
import numpy as np
import pytest

from tests.service_helpers import (
    FAMILY, counterfactual, current_version, images_of, load_npz, new_version, poll, swap_texture_and_background,
    wait_job,
)
from tests.service_stack import ServiceStack
from training.registry import promote, rollback


def test_a_stuck_worker_gives_504_and_a_deep_queue_429_with_retry_after(stack):
    """With the worker frozen, admitted requests time out (504); a queue deeper than its bound is refused at once."""
    url = stack.start_gateway(queue_bound=1, sync_timeout_s=3)
    worker = stack.workers["worker1"]
    queue = stack.redis()
    with httpx.Client(base_url=url, timeout=30) as http:
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert counterfactual(http, seed=1000).status_code == 504
            assert time.monotonic() - started < 10
            # Tasks another gateway queued: the probe sees the depth within half a second.
            queue.lpush("interactive", *["stale"] * 3)
            refused = poll(lambda: (answer := counterfactual(http, seed=2000)).status_code == 429 and answer, 10,
                           "a 429 for the deep queue")
            assert int(refused.headers["retry-after"]) >= 1 and "bound 1" in refused.json()["error"]
        finally:
            queue.delete("interactive")
            os.kill(worker.pid, signal.SIGCONT)
        # The stale tasks expire unrendered and the gateway serves again.
        assert poll(lambda: counterfactual(http, seed=2001).status_code == 200, 20, "service after the flood")
    stack.stop_gateway(url)


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory, models_dir):
    """A stack of its own, with a short visibility timeout and heartbeat, for killing things."""
    with ServiceStack(tmp_path_factory.mktemp("faults"), models_dir, job_chunk_size=50, sync_timeout_s=10,
                      visibility_timeout_s=3, heartbeat_ttl_s=2) as service:
        yield service


def test_redis_down_gives_503_then_recovers(fault_stack):
    with httpx.Client(base_url=fault_stack.url, timeout=30) as http:
        assert counterfactual(http, seed=1).status_code == 200
        fault_stack.stop_redis()
        for answer in (counterfactual(http, seed=2), http.post("/jobs", json={"n": 10}), http.get("/readyz")):
            assert answer.status_code == 503, answer.text
            assert "Redis at 127.0.0.1" in answer.json()["error"] and answer.headers["retry-after"]
        assert http.get("/healthz").status_code == 200  # alive, though not ready
        assert "skdcgn_redis_up 0.0" in http.get("/metrics").text
        fault_stack.start_redis()
        assert poll(lambda: counterfactual(http, seed=3).status_code == 200, 45, "recovery after Redis returns")
        assert http.get("/readyz").status_code == 200


def test_worker_killed_mid_job_loses_nothing(fault_stack):
    n, seed = 1500, 31
    with httpx.Client(base_url=fault_stack.url, timeout=30) as http:
        job_id = http.post("/jobs", json={"n": n, "seed": seed}).json()["id"]

        def part_way() -> int:
            done = http.get(f"/jobs/{job_id}").json()["progress"]["done"]
            return done if 100 <= done <= n - 300 else 0

        progress = poll(part_way, 30, "the job to be part-way")
        fault_stack.kill_worker()
        # With every worker gone (its heartbeat expired), requests are refused instead of queued.
        poll(lambda: http.get("/readyz").status_code == 503, 10, "readiness to drop")
        refused = counterfactual(http, seed=5)
        assert refused.status_code == 503 and "no worker is up" in refused.json()["error"]
        stalled = http.get(f"/jobs/{job_id}").json()
        assert stalled["state"] == "running" and progress <= stalled["progress"]["done"] < n

        fault_stack.start_worker()
        status = wait_job(http, job_id, timeout=60)
        assert status["progress"] == {"done": n, "total": n}
        data = load_npz(http.get(status["result_url"]).content)
        assert len(data["images"]) == n
        np.testing.assert_array_equal(data["indices"], np.arange(n))  # no duplicates, no gaps
        assert len(np.unique(data["images"].reshape(n, -1), axis=0)) == n

        # The same job, uninterrupted and shared by two workers, is the same dataset.
        fault_stack.start_worker("worker2")
        reference_id = http.post("/jobs", json={"n": n, "seed": seed}).json()["id"]
        reference = load_npz(http.get(wait_job(http, reference_id, timeout=60)["result_url"]).content)
        for name in ("images", "labels", "indices"):
            np.testing.assert_array_equal(reference[name], data[name])


def test_promoted_version_is_served_without_restart(client, stack, models_dir):
    old = current_version(models_dir)
    new = f"{old}-swapped"
    new_version(models_dir, old, new, swap_texture_and_background)
    request = {"shape": 2, "texture": 6, "background": 0, "n": 2, "seed": 99}
    before = counterfactual(client, **request).json()
    worker_pid = client.get("/readyz").json()["workers"][0]["pid"]
    job = client.post("/jobs", json={"n": 400, "seed": 99}).json()  # version resolved now: the old one
    promote(models_dir, FAMILY, new)
    try:
        after = counterfactual(client, **request).json()
        assert after["version"] == new
        assert not np.array_equal(images_of(after), images_of(before))

        def worker_with_new_version() -> dict | None:
            (worker,) = client.get("/readyz").json()["workers"]
            return worker if f"{FAMILY}/{new}" in worker["loaded"] else None

        assert poll(worker_with_new_version, 10, "the worker to load the promoted version")["pid"] == worker_pid

        # The job accepted before the promotion finishes on the version it started with.
        status = wait_job(client, job["id"])
        assert status["version"] == old
        data = load_npz(client.get(status["result_url"]).content)
        labels = dict(zip(("shape", "texture", "background"), (int(v) for v in data["labels"][0])))
        pinned = counterfactual(client, **labels, n=1, seed=99, version=old).json()
        np.testing.assert_array_equal(images_of(pinned)[0], data["images"][0])
        latest = counterfactual(client, **labels, n=1, seed=99).json()
        assert latest["version"] == new and not np.array_equal(images_of(latest)[0], data["images"][0])
    finally:
        rollback(models_dir, FAMILY)
    assert counterfactual(client, **request).json()["version"] == old


def test_heartbeats_are_judged_on_their_own_expiry():
    """Workers live in one hash, judged on the Redis clock: an expired beat is not a worker (its refusals go with
    it), and only one expired long ago, or unreadable, is dropped (a worker that was merely late keeps its field)."""
    import json

    from core.messages import live_heartbeats

    beats = {name: json.dumps({"name": name, "expires_at": expires}) for name, expires in
             (("b@h:2", 110.0), ("a@h:1", 101.0), ("late@h:3", 95.0), ("dead@h:4", 30.0))}
    beats["garbled@h:5"] = "{not json"
    live, forgotten = live_heartbeats(beats, now=100.0, forget_after=60.0)
    assert [beat["name"] for beat in live] == ["a@h:1", "b@h:2"]
    assert sorted(forgotten) == ["dead@h:4", "garbled@h:5"]


def test_pooled_connections_survive_a_redis_restart(tmp_path):
    """Connections left idle in the gateway's pools when Redis restarts are dead; each must be replaced on use, not
    turned into a 503 for whichever request draws it (seen as /readyz 503 right after a 200 in the fault test)."""
    import asyncio
    import dataclasses

    from core.messages import WORKERS_KEY
    from core.settings import Settings
    from service.broker import Broker

    stack = ServiceStack(tmp_path, models_dir=tmp_path)  # its Redis only: no worker, no gateway
    url = stack.env["SKDCGN_REDIS_URL"]

    async def scenario():
        stack.start_redis()
        broker = Broker(dataclasses.replace(Settings.from_env(), redis_url=url, cache_url=url))
        try:
            await asyncio.gather(*[broker.redis.ping() for _ in range(8)])  # eight connections, now idle in the pool
            stack.stop_redis()
            stack.start_redis()
            for _ in range(8):
                assert await broker.redis.hgetall(WORKERS_KEY) == {}
            broker.ensure_up()
        finally:
            await broker.close()
            stack.stop()

    asyncio.run(scenario())


def test_a_worker_is_lost_when_its_heartbeat_vanishes_or_it_restarts():
    from core.messages import lost_workers

    def beat(name, incarnation):
        return {"name": name, "incarnation": incarnation}

    before = [beat("w1@a:10", "x"), beat("w2@a:11", "y")]
    assert lost_workers(before, before) == []
    assert lost_workers(before, [beat("w2@a:11", "y")]) == ["w1@a:10"]  # expired
    assert lost_workers(before, [*before, beat("w1@a:12", "z")]) == ["w1@a:10"]  # restarted, old beat still fresh
    assert lost_workers(before, [beat("w1@a:10", "new"), before[1]]) == ["w1@a:10"]  # same name and pid, new process
    assert lost_workers([], before) == []
