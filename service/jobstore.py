"""Job records as the gateway sees them: creation, status, ownership, listing, cancelling, deletion, retention.

A job hash (`skdcgn:job:<id>`) holds the job's status fields and its spec (core.jobs.JobSpec), written once by the
gateway and moved through its states by core.jobs's transitions, by the gateway and the workers alike. Each owner
(the hash of an API key, or `public`) has an index of its jobs by creation time, which GET /jobs pages through; the
transition script files ended jobs by end time, which is the retention clock, so the cleanup never sees a queued or
running job. Result files live in the result store (core.results: a folder, or an S3-compatible bucket); the
gateway reads them there, removes a job's files with its record, and removes what no record names (orphans).
Store calls run in threads under a deadline: a store that hangs delays a delete or a download, never the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import datetime as dt
import math
import re
import time

import redis.asyncio as aioredis

from core.jobs import (
    JOB_ID_PATTERN, JOBS_ENDED_KEY, JobSpec, done_samples, end_args, job_chunks_key, job_key, job_rate_key,
    jobs_index_key, parse_files, recorded_progress,
)
from core.messages import STATS_KEY
from core.results import ResultStore, StoreError, chunks_prefix, file_key, job_prefix
from core.vocabulary import CANCELLED, QUEUED, SUCCEEDED
from service.errors import ServiceError, clip

logger = logging.getLogger(__name__)
CURSOR_PATTERN = re.compile(r"^(\d+):([0-9a-f]{32})$")  # "<created epoch ms>:<id>" of the last job of a page
SCAN_BATCH = 100  # index entries read per round trip while filling a page or expiring jobs
RATE_WINDOW_S = 60  # SKDCGN_JOB_CREATE_RATE counts jobs per owner in fixed windows of this many seconds
STORE_DEADLINE_S = 60.0  # one store call from the gateway (botocore retries inside it): then 503, or a later pass
STATUS_FIELDS = ("id", "state", "model", "version", "manifest_sha256", "format", "created", "started", "finished",
                 "error")


def status_view(record: dict, done_chunks: int, last_chunk_done: bool) -> dict:
    """The JobStatus body of a job hash, given how many of its chunks are on disk."""
    total, chunk_size = int(record["n"]), int(record["chunk_size"])
    succeeded = record["state"] == SUCCEEDED
    status = {key: record.get(key) for key in STATUS_FIELDS} | {"files": None}
    status.update(seed=int(record["seed"]), shards=int(record["shards"]), progress={
        "done": total if succeeded else done_samples(done_chunks, last_chunk_done, chunk_size, total), "total": total})
    if succeeded:
        status["result_url"] = f"/jobs/{record['id']}/result"
        files = parse_files(record.get("files"))  # None for a job assembled before checksums were recorded
        status["files"] = None if files is None else [
            {**item, "url": f"/jobs/{record['id']}/result?file={item['name']}"} for item in files]
    return status


async def in_store(call, *args):
    """A blocking store call in a thread, under STORE_DEADLINE_S; StoreError (503 where a request waits) otherwise."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(call, *args), STORE_DEADLINE_S)
    except asyncio.TimeoutError:
        raise StoreError(f"the result store did not answer within {STORE_DEADLINE_S:g} s") from None


class JobStore:
    def __init__(self, client: aioredis.Redis, results: ResultStore, url_ttl_s: int = 0):
        self.redis, self.results, self.url_ttl_s = client, results, url_ttl_s

    def store_links(self, status: dict) -> dict:
        """Add a presigned `store_url` (and when it expires) to each file of a succeeded job whose store has URLs:
        a direct download that bypasses the gateway. Signed locally (no request to the store)."""
        expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self.url_ttl_s)
        for item in status["files"] or []:
            try:
                url = self.results.url(file_key(status["id"], item["name"]), self.url_ttl_s)
            except Exception as exc:  # no credentials to sign with: the gateway's URL still serves the file
                logger.warning("cannot presign %s: %s", item["name"], exc)
                return status
            if url is None:
                return status
            item.update(store_url=url, store_url_expires=expires.isoformat(timespec="seconds"))
        return status

    async def create(self, spec: JobSpec, owner: str) -> None:
        """Store the job once: its status fields and its spec, which chunk messages refer to by id."""
        record = {"id": spec.id, "owner": owner, "state": QUEUED, "model": spec.family, "version": spec.version,
                  "manifest_sha256": spec.manifest_sha256, "format": spec.format, "seed": spec.seed, "n": spec.n,
                  "chunks": spec.chunks, "chunk_size": spec.chunk_size, "shards": spec.shards,
                  "created": spec.created, "spec": spec.to_json()}
        pipe = self.redis.pipeline()
        pipe.hset(job_key(spec.id), mapping=record)
        pipe.zadd(jobs_index_key(owner), {spec.id: int(time.time() * 1000)})
        pipe.hincrby(STATS_KEY, "jobs_submitted", 1)
        await pipe.execute()

    async def admit_creation(self, owner: str, per_minute: int, keyed: bool) -> None:
        """429 with Retry-After once `owner` has created `per_minute` jobs this minute: a fixed-window counter, one
        INCR on a key that expires after its minute (O(1); no scan, nothing left behind). `keyed`: the owner is an
        API key's (else every client without a key shares the limit)."""
        now = time.time()
        window = int(now // RATE_WINDOW_S)
        key = job_rate_key(owner, window)
        pipe = self.redis.pipeline()
        pipe.incr(key).expireat(key, (window + 2) * RATE_WINDOW_S)
        created, _ = await pipe.execute()
        if created > per_minute:
            retry_after = max(1, math.ceil((window + 1) * RATE_WINDOW_S - now))
            whose = "this API key" if keyed else "clients without an API key (this server has none configured)"
            raise ServiceError(429, f"{whose} created {per_minute} jobs this minute, the most allowed "
                                    f"(SKDCGN_JOB_CREATE_RATE={per_minute} per minute); retry in {retry_after} s",
                               {"Retry-After": str(retry_after)})

    async def cancel(self, job_id: str) -> bool:
        """Cancel an active job: True when this call ended it (its chunks are then discarded), False if it had ended.
        The move folds the job's progress into its record and deletes its chunks set (core.jobs.TRANSITION_SCRIPT),
        so a cancelled job leaves only its record in Redis; its queued chunk messages are consumed by workers, which
        find the job ended and skip them."""
        if not await self.redis.eval(*end_args(job_id, CANCELLED)):
            return False
        await self.redis.hincrby(STATS_KEY, "jobs_cancelled", 1)
        try:
            await in_store(self.results.remove, chunks_prefix(job_id))
        except (StoreError, OSError) as exc:  # the job's record stays until retention, whose pass removes its files
            logger.warning("job %s cancelled, its chunks stay in the store until retention removes them: %s",
                           job_id, exc)
        return True

    async def record(self, job_id: str, owner: str) -> dict:
        """The job hash; 404 when there is none, or it belongs to another API key (which must not learn it exists)."""
        if not JOB_ID_PATTERN.match(job_id):  # before the id comes near Redis or the file system
            raise ServiceError(404, f"no job {clip(job_id)!r}: job ids are 32 lowercase hex digits")
        record = await self.redis.hgetall(job_key(job_id))
        if not record or record["owner"] != owner:
            raise ServiceError(404, f"no job {job_id}")
        return record

    async def views(self, records: list[dict]) -> list[dict]:
        """Status bodies of job hashes, their progress read in one round trip (an ended job's from its hash)."""
        progress = [recorded_progress(record) for record in records]
        unrecorded = [record for record, done in zip(records, progress) if done is None]
        pipe = self.redis.pipeline()
        for record in unrecorded:
            chunks = job_chunks_key(record["id"])
            pipe.scard(chunks).sismember(chunks, int(record["chunks"]) - 1)
        counts = iter(await pipe.execute() if unrecorded else [])
        return [status_view(record, *(done or (next(counts), bool(next(counts)))))
                for record, done in zip(records, progress)]

    async def status(self, job_id: str, owner: str) -> dict:
        (status,) = await self.views([await self.record(job_id, owner)])
        return self.store_links(status)

    async def page(self, owner: str, state: str | None, limit: int, cursor: str | None) -> dict:
        """Up to `limit` of the owner's jobs in `state` (any when None), newest first, after `cursor`."""
        top, after = "+inf", None
        if cursor:
            match = CURSOR_PATTERN.match(cursor)
            if not match:
                raise ServiceError(422, f"cursor: {cursor!r} is not a cursor this server returned (next_cursor)")
            top, after = int(match[1]), match[2]
        index, offset, found = jobs_index_key(owner), 0, []
        while len(found) <= limit:  # one more than a page tells whether another page follows
            batch = await self.redis.zrevrangebyscore(index, top, "-inf", start=offset, num=SCAN_BATCH,
                                                      withscores=True)
            if not batch:
                break
            offset += len(batch)
            pipe = self.redis.pipeline()
            for job_id, _ in batch:
                pipe.hgetall(job_key(job_id))
            for (job_id, score), record in zip(batch, await pipe.execute()):
                # Jobs created in the cursor's millisecond come in descending id order: skip those already listed.
                if after is not None and score == top and job_id >= after:
                    continue
                if record and (state is None or record["state"] == state):
                    found.append((int(score), record))
                    if len(found) > limit:
                        break
        page, more = found[:limit], len(found) > limit
        jobs = await self.views([record for _, record in page])
        return {"jobs": jobs, "next_cursor": f"{page[-1][0]}:{page[-1][1]['id']}" if more else None}

    async def delete(self, record: dict) -> None:
        """Remove an ended job: its files first (StoreError when the store cannot, and the record stays), then its
        record and index entries."""
        job_id = record["id"]
        await in_store(self.results.remove, job_prefix(job_id))
        pipe = self.redis.pipeline()
        pipe.delete(job_key(job_id), job_chunks_key(job_id))
        pipe.zrem(jobs_index_key(record["owner"]), job_id).zrem(JOBS_ENDED_KEY, job_id)
        await pipe.execute()

    async def expire(self, retention_s: float) -> int:
        """Delete the jobs that ended more than `retention_s` ago; returns how many."""
        cutoff, removed = time.time() - retention_s, 0
        while ids := await self.redis.zrangebyscore(JOBS_ENDED_KEY, "-inf", cutoff, start=0, num=SCAN_BATCH):
            for job_id in ids:
                record = await self.redis.hgetall(job_key(job_id))
                if record:
                    await self.delete(record)
                    removed += 1
                else:  # deleted through DELETE /jobs/{id} meanwhile
                    await self.redis.zrem(JOBS_ENDED_KEY, job_id)
        return removed

    async def remove_orphans(self, retention_s: float) -> int:
        """Delete the files of jobs that no record names (Redis restarted without persistence, a worker that stored
        a chunk as its job was deleted) once nothing of theirs changed for the retention period, and abort multipart
        uploads older than it (a worker killed mid-upload); returns how many jobs. Walks the store: a background
        pass, never a request's work."""
        cutoff, removed = time.time() - retention_s, 0
        for job_id in await in_store(lambda: list(self.results.jobs())):
            if not JOB_ID_PATTERN.match(job_id) or await self.redis.exists(job_key(job_id)):
                continue
            newest = await in_store(self.results.newest, job_prefix(job_id))
            if newest is not None and newest < cutoff:
                await in_store(self.results.remove, job_prefix(job_id))
                removed += 1
        if aborted := await in_store(self.results.stale_uploads, cutoff):
            logger.info("aborted %d multipart uploads begun before the retention period", aborted)
        return removed

    async def cleanup_forever(self, retention_s: float, interval_s: float) -> None:
        """The gateway's periodic retention pass; every gateway may run one, deleting twice is harmless."""
        while True:
            try:
                await self.expire(retention_s)
                await self.remove_orphans(retention_s)
            except Exception:  # Redis away, the store away, a file system hiccup: the next pass retries, the gateway serves on
                logger.exception("job cleanup failed; retrying in %g s", interval_s)
            await asyncio.sleep(interval_s)
