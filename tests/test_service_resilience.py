"""Day two: the service keeps its availability as Redis fills up, when its batches fail in every way we know of,
and while other clients ask for the heaviest answers. Real Redis, gateway and workers; a scripted stand-in worker
only where a fault must come from the worker's side (foreign, short, malformed or missing replies)."""
from __future__ import annotations

import base64
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from core.manifest import latest_version
from core.messages import (
    INTERACTIVE_QUEUE, MESSAGE_SCHEMA, WORKERS_KEY, BatchReply, RenderBatch, RenderReply, redis_now, reply_key,
)
from tests.service_helpers import FAMILY, counterfactual, poll
from tests.service_stack import ServiceStack

UNRELATED_KEYS = 1_000_000
FILL_SCRIPT = "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'unrelated:' .. i, 'x') end"


def gauge(http: httpx.Client, name: str) -> float:
    found = re.search(rf"^{name} ([0-9.e+-]+)$", http.get("/metrics").text, re.M)
    assert found, f"{name} is not exported:\n{http.get('/metrics').text[:3000]}"
    return float(found.group(1))


def test_a_million_unrelated_keys_change_nothing(tmp_path, models_dir):
    """A Redis holding a million keys that are not ours: every answer is 200 and no command whose cost grows with
    the keyspace ran (INFO commandstats), probes, readiness, model listing and metrics included."""
    with ServiceStack(tmp_path, models_dir) as stack:
        broker = stack.redis()
        broker.eval(FILL_SCRIPT, 0, UNRELATED_KEYS)
        assert broker.dbsize() >= UNRELATED_KEYS
        stack.wait_ready(stack.url)  # filling blocks Redis for a second or two: the probe may have seen an outage
        broker.config_resetstat()
        with httpx.Client(base_url=stack.url, timeout=30) as http, ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda seed: counterfactual(http, seed=seed % 40, n=1).status_code, range(400)))
            answers += [http.get(path).status_code for path in ("/readyz", "/models", f"/models/{FAMILY}",
                                                                 "/metrics", "/jobs")]
            time.sleep(1.5)  # three more probes
        assert answers == [200] * len(answers)
        stats = broker.info("commandstats")
        assert "cmdstat_hgetall" in stats  # the probe ran, and read the workers' hash
        grows = [name for name in ("cmdstat_scan", "cmdstat_keys", "cmdstat_hscan", "cmdstat_sscan",
                                   "cmdstat_zscan", "cmdstat_randomkey", "cmdstat_flushdb") if name in stats]
        assert grows == [], f"commands whose cost grows with the keyspace ran: {grows}"


class StandInWorker:
    """Plays a worker from the queue's side: announces itself (loaded: the default model's LATEST), takes the
    gateway's batches off the interactive queue, and answers each as `mode` says."""

    def __init__(self, url: str, version: str):
        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
        self.mode, self.version, self.taken, self.incarnation = "ok", version, 0, "first"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def announce(self) -> None:
        beat = {"name": "stand-in@test:1", "pid": 1, "incarnation": self.incarnation, "provider": "none",
                "loaded": [f"{FAMILY}/{self.version}"],
                "refused": {}, "updated": "", "expires_at": redis_now(self.redis.time()) + 3600}
        self.redis.hset(WORKERS_KEY, beat["name"], json.dumps(beat))

    def withdraw(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.redis.hdel(WORKERS_KEY, "stand-in@test:1")

    def serve(self) -> None:
        while not self.stopped.is_set():
            try:
                popped = self.redis.brpop([INTERACTIVE_QUEUE], timeout=0.2)
            except redis.ResponseError:  # unblocked when a test turns Redis into a replica
                continue
            if popped is None:
                continue
            self.taken += 1
            args, _, _ = json.loads(base64.b64decode(json.loads(popped[1])["body"]))
            batch = RenderBatch.from_dict(args[0])
            replies = [RenderReply({"images": [], "n": request.n}) for request in batch.requests]
            body = {"ok": lambda: json.dumps(BatchReply(replies).to_dict()),
                    "foreign": lambda: json.dumps({**BatchReply(replies).to_dict(), "schema": MESSAGE_SCHEMA - 1}),
                    "short": lambda: json.dumps(BatchReply(replies[:-1]).to_dict()),
                    "malformed": lambda: "{this is not json",
                    "silent": lambda: None}[self.mode]()
            if body is not None:
                self.redis.rpush(reply_key(batch.reply_to), body)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, models_dir):
    """Redis and a gateway admitting 8 requests at once (a leaked slot shows within a few faults), no worker."""
    stack = ServiceStack(tmp_path_factory.mktemp("resilience"), models_dir)
    stack.start_redis()
    url = stack.start_gateway(max_in_flight=8, sync_timeout_s=2)
    stand_in = StandInWorker(stack.env["SKDCGN_REDIS_URL"], latest_version(models_dir, FAMILY))
    stand_in.announce()
    stand_in.thread.start()
    stack.wait_ready(url)
    try:
        yield stack, url, stand_in
    finally:
        stand_in.withdraw()
        stack.stop()


def sixteen(http: httpx.Client, first_seed: int) -> list[httpx.Response]:
    """Sixteen misses, eight at a time (the admission limit), each with its own seed."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda seed: counterfactual(http, seed=seed, n=1), range(first_seed, first_seed + 16)))


@pytest.mark.parametrize("mode, status, says", [
    ("foreign", 502, "cannot read"),
    ("short", 502, "requests of a batch"),
    ("malformed", 502, "cannot read"),
    ("silent", 504, "within 2"),
])
def test_a_bad_or_missing_reply_answers_every_caller_and_frees_its_slot(faulty, mode, status, says):
    stack, url, stand_in = faulty
    stand_in.mode = mode
    with httpx.Client(base_url=url, timeout=30) as http:
        started = time.monotonic()
        answers = sixteen(http, first_seed=10_000 + 100 * ["foreign", "short", "malformed", "silent"].index(mode))
        assert [a.status_code for a in answers] == [status] * 16, answers[0].text
        assert all(says in a.json()["error"] for a in answers), answers[0].text
        if mode == "silent":
            assert time.monotonic() - started < 2 * 3  # two rounds of eight, each answered 504 within 3 s
        assert gauge(http, "skdcgn_requests_in_flight") == 0
        assert gauge(http, "skdcgn_render_requests_waiting") == 0


@pytest.mark.parametrize("fault", ["oom", "readonly"])
def test_redis_refusing_to_queue_answers_503_and_frees_its_slot(faulty, fault):
    """Redis out of memory or turned read-only: publishing fails for each request on its own (503 naming why),
    while the probe (reads only) still finds Redis up."""
    stack, url, stand_in = faulty
    stand_in.mode = "ok"
    broker = stack.redis()
    if fault == "oom":
        broker.config_set("maxmemory", 1)
    else:
        broker.execute_command("REPLICAOF", "127.0.0.1", "1")  # no master there: a read-only replica
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            answers = sixteen(http, first_seed=50_000 + (fault == "oom") * 100)
            assert [a.status_code for a in answers] == [503] * 16, answers[0].text
            expected = "maxmemory" if fault == "oom" else "read only replica"
            assert all(expected in a.json()["error"] and a.headers["retry-after"] for a in answers), \
                {a.json()["error"] for a in answers}
            assert gauge(http, "skdcgn_requests_in_flight") == 0
    finally:
        broker.config_set("maxmemory", 0)
        broker.execute_command("REPLICAOF", "NO", "ONE")


def test_a_worker_that_restarts_mid_batch_loses_no_request(faulty):
    """The worker takes a batch and dies; a new incarnation announces itself under the same name: the gateway
    publishes the batches in flight again, and their callers are answered 200 long before their deadline."""
    stack, url, stand_in = faulty
    stand_in.mode = "silent"  # takes the batch, never answers: as if killed while rendering it
    taken = stand_in.taken
    with httpx.Client(base_url=url, timeout=30) as http, ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(counterfactual, http, seed=80_000 + i, n=1) for i in range(4)]
        # Within the sync timeout (2 s) of the requests' arrival, or they are 504s and the test fails below.
        poll(lambda: stand_in.taken > taken, 2, "the stand-in to take the batch")
        stand_in.mode, stand_in.incarnation = "ok", "second"
        stand_in.announce()
        # 200, not 504: the batch went out again on the restart instead of waiting out the sync timeout.
        assert [future.result().status_code for future in waiting] == [200] * 4
        assert gauge(http, "skdcgn_requests_in_flight") == 0


def test_after_every_fault_a_real_worker_serves_64_in_a_row(faulty):
    """Run last in this module: the stand-in leaves, a real worker comes, and nothing the faults did lingers."""
    stack, url, stand_in = faulty
    stand_in.withdraw()
    stack.start_worker()
    with httpx.Client(base_url=url, timeout=30) as http:
        poll(lambda: [w["name"].split("@")[0] for w in http.get("/readyz").json()["workers"]] == ["worker1"], 60,
             "the real worker, alone, in the gateway's view")
        answers = [counterfactual(http, seed=70_000 + i, n=1) for i in range(64)]
        assert [a.status_code for a in answers] == [200] * 64, {a.text for a in answers if a.status_code != 200}
        assert gauge(http, "skdcgn_requests_in_flight") == 0


def test_heavy_png_clients_do_not_fail_a_small_one(stack):
    """Sixteen clients of the largest PNG answers (n = 16 upscaled 16×: 8 Mpx each) beside one small JSON client:
    the PNGs are drawn off the event loop, so the small client is answered, and nobody is told Redis is down."""
    url = stack.start_gateway()
    stop = time.monotonic() + 8
    heavy_statuses, small_statuses = [], []

    def heavy(client_number: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < stop:
                answer = http.post("/counterfactual?scale=16", headers={"Accept": "image/png"},
                                   json={"shape": 1, "texture": 2, "background": 3, "n": 16, "seed": client_number})
                heavy_statuses.append(answer.status_code)

    try:
        with ThreadPoolExecutor(17) as pool:
            heavies = [pool.submit(heavy, number) for number in range(16)]
            with httpx.Client(base_url=url, timeout=60) as http:
                seed = 90_000
                while time.monotonic() < stop:
                    small_statuses.append(counterfactual(http, seed=seed, n=1).status_code)
                    seed += 1
            for future in heavies:
                future.result()
    finally:
        stack.stop_gateway(url)
    assert small_statuses and set(small_statuses) == {200}, small_statuses
    assert heavy_statuses and set(heavy_statuses) <= {200, 429}, sorted(set(heavy_statuses))


def test_the_docker_healthcheck_reads_the_workers_hash(tmp_path, monkeypatch):
    """`python -m workers.health`: healthy only while a worker of this host has a current heartbeat."""
    import socket

    from workers import health

    stack = ServiceStack(tmp_path, models_dir=tmp_path)  # its Redis only
    stack.start_redis()
    try:
        monkeypatch.setenv("SKDCGN_REDIS_URL", stack.env["SKDCGN_REDIS_URL"])
        broker = stack.redis()
        assert health.main() == 1  # nobody announced
        now = redis_now(broker.time())
        for host, expires_at, exit_code in (("elsewhere", now + 60, 1), (socket.gethostname(), now - 1, 1),
                                            (socket.gethostname(), now + 60, 0)):
            name = f"worker1@{host}:42"
            broker.hset(WORKERS_KEY, name, json.dumps({"name": name, "expires_at": expires_at}))
            assert health.main() == exit_code, (host, expires_at)
            broker.hdel(WORKERS_KEY, name)
    finally:
        stack.stop()
