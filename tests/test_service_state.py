"""What clients leave behind in the broker Redis: nothing that grows, except job records while they are kept.

A stack of its own (its Redis holds only what these tests and the service put there), with API keys: 200 jobs
created and cancelled at once leave one hash per job (its record) and a few fixed keys, no Celery result-backend
key and no chunk set, and their queued chunks drain; job creation per key (and, without keys, for everyone) is
rate-limited with 429 and Retry-After.
"""
from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

from core.jobs import jobs_index_key, owner_of
from tests.service_helpers import poll
from tests.service_stack import ServiceStack

KEYS = {"cycles": "key-cycles-0123456789", "rate": "key-rate-0123456789", "other": "key-rate-other-0123456789"}
CYCLES = 200
CHUNKS_PER_JOB = 10  # n = 1000 at SKDCGN_JOB_CHUNK_SIZE=100
FIXED_KEYS = 16  # queues, kombu bindings, Celery's unacked bookkeeping, indexes, stats, presence, rate counters
LOW_RATE = 3


@pytest.fixture(scope="module")
def state_stack(tmp_path_factory, models_dir):
    with ServiceStack(tmp_path_factory.mktemp("state"), models_dir, api_keys=",".join(KEYS.values()),
                      job_chunk_size=100, job_create_rate=CYCLES + 50) as service:
        yield service


def key(name: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[name]}


def kinds(client) -> Counter:
    """The broker's keys by kind (a scan is fine in a test; the service never scans)."""
    def kind(name: str) -> str:
        if name.startswith("celery-task-meta-"):
            return "celery-task-meta-*"
        if name.startswith("skdcgn:job:"):
            return "skdcgn:job:<id>:chunks" if name.endswith(":chunks") else "skdcgn:job:<id>"
        return name
    return Counter(kind(name) for name in client.scan_iter(count=1000))


def test_create_and_cancel_cycles_leave_only_job_records(state_stack):
    redis_client = state_stack.redis()
    baseline = redis_client.dbsize()
    with httpx.Client(base_url=state_stack.url, timeout=30) as http:
        for cycle in range(CYCLES):
            created = http.post("/jobs", json={"n": 100 * CHUNKS_PER_JOB, "seed": cycle}, headers=key("cycles"))
            assert created.status_code == 202, created.text
            cancelled = http.delete(f"/jobs/{created.json()['id']}", headers=key("cycles"))
            assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
        # A cancelled job's progress survives in its record (its chunk set is gone).
        progress = cancelled.json()["progress"]
        assert progress["total"] == 1000 and 0 <= progress["done"] <= 1000
        assert http.get(f"/jobs/{created.json()['id']}", headers=key("cycles")).json()["progress"] == progress

    # The workers consume the cancelled jobs' queued chunks (each finds its job ended and skips it).
    poll(lambda: not redis_client.llen("jobs") and not redis_client.hlen("unacked"), 120,
         "the cancelled jobs' chunk messages to drain")
    time.sleep(1)  # a worker that took the last message has acknowledged it and written whatever it writes
    records = redis_client.zcard(jobs_index_key(owner_of(KEYS["cycles"])))
    assert records == CYCLES
    found = kinds(redis_client)
    total = redis_client.dbsize()
    assert found["celery-task-meta-*"] == 0, found.most_common(8)
    assert found["skdcgn:job:<id>:chunks"] == 0, found.most_common(8)
    assert found["skdcgn:job:<id>"] == records
    assert total <= records + baseline + FIXED_KEYS, (total, baseline, found.most_common(12))
    worker_log = (state_stack.root / "worker1.log").read_text(errors="replace")
    assert "revoked" not in worker_log.lower(), "chunks of cancelled jobs are skipped, never revoked"


def test_cancel_folds_progress_into_the_record_and_drops_the_chunk_set(state_stack):
    redis_client = state_stack.redis()
    with httpx.Client(base_url=state_stack.url, timeout=30) as http:
        job_id = http.post("/jobs", json={"n": 50_000, "seed": 1}, headers=key("cycles")).json()["id"]
        poll(lambda: http.get(f"/jobs/{job_id}", headers=key("cycles")).json()["progress"]["done"] >= 300, 60,
             "some chunks of the job to be done")
        assert redis_client.exists(f"skdcgn:job:{job_id}:chunks")
        cancelled = http.delete(f"/jobs/{job_id}", headers=key("cycles")).json()
        assert cancelled["state"] == "cancelled" and cancelled["progress"]["done"] >= 300
        assert not redis_client.exists(f"skdcgn:job:{job_id}:chunks")
        time.sleep(1)  # a chunk in hand when the job was cancelled lands, and is not counted
        assert http.get(f"/jobs/{job_id}", headers=key("cycles")).json()["progress"] == cancelled["progress"]
        assert not redis_client.exists(f"skdcgn:job:{job_id}:chunks")


def start_of_a_minute() -> None:
    """The rate limit counts per clock minute: start a burst well inside one."""
    if 60 - time.time() % 60 < 15:
        time.sleep(60 - time.time() % 60 + 0.5)


def burst(http: httpx.Client, headers: dict, count: int) -> list[httpx.Response]:
    answers = [http.post("/jobs", json={"n": 5, "seed": i}, headers=headers) for i in range(count)]
    for answer in answers:
        if answer.status_code == 202:
            http.delete(f"/jobs/{answer.json()['id']}", headers=headers)
    return answers


def refused_for_rate(answer: httpx.Response) -> int:
    """Retry-After of a 429 for the creation rate, after checking its body names the setting."""
    assert answer.status_code == 429, answer.text
    assert f"SKDCGN_JOB_CREATE_RATE={LOW_RATE}" in answer.json()["error"]
    retry_after = int(answer.headers["retry-after"])
    assert 1 <= retry_after <= 60
    return retry_after


def test_job_creation_is_rate_limited_per_key_with_retry_after(state_stack):
    url = state_stack.start_gateway(job_create_rate=LOW_RATE)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            start_of_a_minute()
            answers = burst(http, key("rate"), LOW_RATE + 2)
            assert [a.status_code for a in answers[:LOW_RATE]] == [202] * LOW_RATE, [a.text for a in answers]
            for answer in answers[LOW_RATE:]:
                refused_for_rate(answer)
            assert "this API key" in answers[-1].json()["error"]
            # Another key has its own count.
            assert burst(http, key("other"), 1)[0].status_code == 202
    finally:
        state_stack.stop_gateway(url)
    rate_keys = [name for name in state_stack.redis().scan_iter(match="skdcgn:jobs:rate:*")]
    assert rate_keys and all(0 < state_stack.redis().ttl(name) <= 120 for name in rate_keys)  # they expire


def test_without_api_keys_everyone_shares_the_creation_rate(state_stack):
    url = state_stack.start_gateway(job_create_rate=LOW_RATE, api_keys="")
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            start_of_a_minute()
            answers = burst(http, {}, LOW_RATE + 1)
            assert [a.status_code for a in answers[:LOW_RATE]] == [202] * LOW_RATE, [a.text for a in answers]
            refused_for_rate(answers[-1])
            assert "without an API key" in answers[-1].json()["error"]
    finally:
        state_stack.stop_gateway(url)
