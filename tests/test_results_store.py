"""Job results in an S3-compatible store (SKDCGN_RESULTS_URL=s3://…), with a real S3 endpoint: moto in server mode on
127.0.0.1. The gateway and two workers stand for three hosts that share no disk (each its own SKDCGN_JOBS_DIR); one
worker is killed mid-job, the store is stopped mid-job, and every file is read back through the gateway, straight
from the store (presigned URLs, webdataset over s3://, client.torch_data) and checked against its recorded sha256.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.s3_server import S3Server
from client.store import register_webdataset, shard_urls
from core.results import LocalResults, S3Results, chunk_key, open_results
from service.downloads import byte_range
from tests.service_helpers import poll, wait_job
from tests.service_stack import ServiceStack

BUCKET = "skdcgn-results"
JOB_N = 20_000


@pytest.fixture
def s3(tmp_path, monkeypatch):
    server = S3Server(tmp_path, BUCKET).start()
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    yield server
    server.stop()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def test_byte_ranges_read_as_rfc_9110_says():
    assert byte_range(None, 100) is None and byte_range("bytes=0-9,20-29", 100) is None  # several: whole file
    assert byte_range("bytes=10-19", 100) == (10, 20) and byte_range("bytes=90-", 100) == (90, 100)
    assert byte_range("bytes=-5", 100) == (95, 100) and byte_range("bytes=50-500", 100) == (50, 100)
    assert byte_range("bytes=100-", 100) == (100, 100)  # past the end: 416
    assert byte_range("items=0-5", 100) is None and byte_range("bytes=9-3", 100) is None


def test_both_stores_put_read_list_and_remove_alike(s3, tmp_path):
    scratch = tmp_path / "scratch"
    job = "a" * 32
    stores = [open_results(f"s3://{BUCKET}/some/prefix", scratch), open_results(str(tmp_path / "results"), scratch)]
    assert isinstance(stores[0], S3Results) and isinstance(stores[1], LocalResults)
    assert open_results("", scratch).in_place and not stores[1].in_place
    for store in stores:
        data = os.urandom(40 << 20)  # above the multipart threshold: S3 takes it in parts
        source = scratch / "upload.bin"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(data)
        store.put(source, chunk_key(job, 3))
        assert not source.exists(), "put removes the scratch copy"
        assert store.size(chunk_key(job, 3)) == len(data) and store.size(chunk_key(job, 4)) is None
        assert b"".join(store.read_range(chunk_key(job, 3), 1000, 1000 + 70_000)) == data[1000:71_000]
        with store.open(chunk_key(job, 3)) as handle:
            assert sha256(handle.read()) == sha256(data)
        assert list(store.jobs()) == [job] and store.newest(f"{job}/") > time.time() - 60
        store.remove(f"{job}/")
        assert list(store.jobs()) == [] and store.newest(f"{job}/") is None
    assert s3.keys() == []
    # A multipart upload a killed worker left open is aborted by the cleanup once older than the cutoff (moto reports
    # one fixed initiation time for every upload, so only the abort itself is checked here), or with its job.
    upload = s3.client().create_multipart_upload(Bucket=BUCKET, Key=f"some/prefix/{job}/result-00000.tar")
    assert stores[0].stale_uploads(time.time() + 1) == 1
    s3.client().create_multipart_upload(Bucket=BUCKET, Key=f"some/prefix/{job}/result-00001.tar")
    stores[0].remove(f"{job}/")
    assert s3.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == [], upload["UploadId"]
    with pytest.raises(ValueError, match="s3://bucket"):
        open_results("s3://", scratch)
    with pytest.raises(ValueError, match="file:///folder"):
        open_results("gs://bucket/prefix", scratch)


@pytest.fixture
def hosts(tmp_path, models_dir, s3):
    """A gateway and two workers with private folders, results in the bucket."""
    stack = ServiceStack(tmp_path, models_dir, results_url=f"s3://{BUCKET}/jobs", jobs_dir=tmp_path / "gateway",
                         max_job_n=JOB_N, job_shard_size=5000, visibility_timeout_s=4, heartbeat_ttl_s=2,
                         chunk_attempts=2)
    stack.env.update(s3.env)
    stack.start_redis()
    for name in ("worker1", "worker2"):
        stack.start_worker(name, jobs_dir=tmp_path / name)
    stack.url = stack.start_gateway()
    stack.wait_ready(stack.url)
    yield stack
    stack.stop()


def test_a_job_on_hosts_that_share_no_disk_survives_a_killed_worker_and_reads_back_from_the_store(hosts, s3, tmp_path):
    with httpx.Client(base_url=hosts.url, timeout=60) as client:
        created = client.post("/jobs", json={"n": JOB_N, "format": "webdataset", "seed": 11})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        poll(lambda: client.get(f"/jobs/{job_id}").json()["progress"]["done"] >= 3000, 120, "three chunks done")
        assert client.get(f"/jobs/{job_id}").json()["state"] == "running"
        hosts.kill_worker("worker2")  # kill -9 mid-job: its chunk in hand comes back after the visibility timeout
        status = wait_job(client, job_id, timeout=300)
        assert status["progress"] == {"done": JOB_N, "total": JOB_N}
        names = [item["name"] for item in status["files"]]
        assert names == [f"result-{shard:05d}.tar" for shard in range(4)] + ["provenance.json", "SHA256SUMS"]
        assert sorted(s3.keys(f"jobs/{job_id}/")) == sorted(f"jobs/{job_id}/{name}" for name in names), \
            "only the result is left in the store: chunks removed"
        for item in status["files"]:
            through_gateway = client.get(item["url"])
            assert through_gateway.status_code == 200 and sha256(through_gateway.content) == item["sha256"]
            assert through_gateway.headers["etag"] == f'"{item["sha256"]}"'
            direct = httpx.get(item["store_url"], timeout=60)  # presigned: no credentials, no gateway
            assert direct.status_code == 200 and sha256(direct.content) == item["sha256"]
        shard = status["files"][1]
        whole = client.get(shard["url"]).content
        part = client.get(shard["url"], headers={"Range": "bytes=1000-2999"})
        assert part.status_code == 206 and part.content == whole[1000:3000]
        assert part.headers["content-range"] == f"bytes 1000-2999/{len(whole)}"
        tail = client.get(shard["url"], headers={"Range": f"bytes={len(whole) - 10}-"})
        assert tail.status_code == 206 and tail.content == whole[-10:]
        beyond = client.get(shard["url"], headers={"Range": f"bytes={len(whole)}-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(whole)}"

        # Straight from the store with webdataset (s3:// through boto3, the test's credentials), no download first.
        import webdataset as wds

        register_webdataset()
        urls = shard_urls(status, f"s3://{BUCKET}/jobs")
        keys = [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
        assert len(keys) == JOB_N and sorted(set(keys)) == [f"{index:06d}" for index in range(JOB_N)]

        # No result file on any surviving host: the gateway's folder and worker1's scratch hold nothing.
        leftovers = files_under(tmp_path / "gateway") + files_under(tmp_path / "worker1")
        assert leftovers == [], leftovers

        # Delete removes every object of the job.
        assert client.delete(f"/jobs/{job_id}").status_code == 204
        assert s3.keys(f"jobs/{job_id}/") == []


def test_the_torch_dataset_streams_presigned_shards(hosts, s3):
    torch_data = pytest.importorskip("client.torch_data")
    with httpx.Client(base_url=hosts.url, timeout=60) as client:
        job_id = client.post("/jobs", json={"n": 300, "format": "webdataset", "seed": 5, "shard_size": 100}).json()["id"]
        status = wait_job(client, job_id, timeout=120)
    dataset = torch_data.StoredShards(shard_urls(status), target="labels", with_meta=True)  # presigned https
    samples = list(dataset)
    assert len(samples) == 300 and sorted(meta["index"] for _, _, meta in samples) == list(range(300))
    image, labels, _ = samples[0]
    assert tuple(image.shape) == (3, 32, 32) and labels.shape == (3,)


def test_a_store_that_stops_mid_job_fails_the_job_with_a_clear_error(hosts, s3):
    with httpx.Client(base_url=hosts.url, timeout=60) as client:
        job_id = client.post("/jobs", json={"n": JOB_N, "format": "npz", "seed": 3}).json()["id"]
        poll(lambda: client.get(f"/jobs/{job_id}").json()["progress"]["done"] >= 1000, 120, "a chunk stored")
        s3.process.send_signal(signal.SIGKILL)
        s3.process.wait()
        status = wait_job(client, job_id, states=("failed", "succeeded"), timeout=240)
        assert status["state"] == "failed", status
        assert "failed 2 times" in status["error"] and s3.endpoint in status["error"], status["error"]
        assert client.get(f"/jobs/{job_id}/result").status_code == 409


def test_retention_and_orphan_cleanup_remove_a_jobs_objects_from_the_store(s3, tmp_path):
    """JobStore's cleanup pass against the bucket: an expired job's objects go with its record, and objects no
    record names (Redis lost them) go once older than the retention period, open multipart uploads included."""
    import asyncio

    import redis.asyncio as aioredis

    from core.jobs import JOBS_ENDED_KEY, job_key
    from service.jobstore import JobStore
    from service.run_local import free_port, redis_answers, start_redis, stop, wait_until

    port = free_port()
    server = start_redis(port, open(tmp_path / "redis.log", "ab"))
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: redis_answers(url), 10, "Redis", {"redis": server})
    store = open_results(f"s3://{BUCKET}/jobs", tmp_path / "scratch")
    expired, orphan = "e" * 32, "f" * 32
    for job in (expired, orphan):
        source = tmp_path / "file"
        source.write_bytes(b"x" * 1000)
        store.put(source, f"{job}/result.npz")
    s3.client().create_multipart_upload(Bucket=BUCKET, Key=f"jobs/{orphan}/result-00001.tar")

    async def cleanup():
        client = aioredis.from_url(url, decode_responses=True)
        await client.hset(job_key(expired), mapping={"id": expired, "owner": "public", "state": "succeeded"})
        await client.zadd(JOBS_ENDED_KEY, {expired: time.time() - 100})
        jobs = JobStore(client, store)
        removed = await jobs.expire(retention_s=10), await jobs.remove_orphans(retention_s=0)
        left = await client.exists(job_key(expired))
        await client.aclose()
        return removed, left

    try:
        (expired_count, orphans), record_left = asyncio.run(cleanup())
    finally:
        stop([server])
    assert expired_count == 1 and orphans == 1 and record_left == 0
    assert s3.keys("jobs/") == []
    assert s3.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_shard_urls_name_the_store_or_say_why_not():
    status = {"id": "c" * 32, "state": "succeeded", "format": "webdataset", "shards": 2,
              "files": [{"name": "result-00000.tar"}, {"name": "result-00001.tar"}]}
    assert shard_urls(status, "s3://bucket/jobs/") == [f"s3://bucket/jobs/{'c' * 32}/result-0000{i}.tar" for i in (0, 1)]
    with pytest.raises(ValueError, match="skdcgn jobs download"):
        shard_urls(status)  # a folder store: no presigned URLs
    with pytest.raises(ValueError, match="is running"):
        shard_urls(status | {"state": "running"})
