"""The gateway's side of Redis and Celery: admission (503/429), sending tasks, waiting for replies, the cache.

Waiting happens on asyncio Redis clients (BLPOP on the task's reply list), so a slow render holds no thread.
Publishing goes through Celery's (blocking) producer in a worker thread.
"""
from __future__ import annotations

import asyncio
import json
import math
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from kombu.exceptions import OperationalError

from core.celery_config import make_celery
from core.messages import STATS_KEY, WORKER_PREFIX, RenderReply, reply_key
from core.settings import Settings


class ServiceError(Exception):
    """An answer other than 2xx, with a message the caller can act on."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def redis_location(url: str) -> str:
    """host:port of a Redis URL, without credentials, for error messages."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}"


def refusals(workers: list[dict]) -> dict[str, str]:
    """"family/version" -> why, for each version a live worker refuses because its files fail their sha256 check."""
    found: dict[str, str] = {}
    for worker in workers:
        for name, reason in worker.get("refused", {}).items():
            found.setdefault(name, f"worker {worker['name']} refuses it: {reason}")
    return found


class Broker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.celery = make_celery(settings)
        # Reads wait up to the synchronous timeout (BLPOP), so the socket timeout must exceed it.
        socket_timeout = settings.sync_timeout_s + 5
        self.redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True,
                                             socket_connect_timeout=1, socket_timeout=socket_timeout)
        self.cache = self.redis if settings.cache_url == settings.redis_url else aioredis.Redis.from_url(
            settings.cache_url, socket_connect_timeout=1, socket_timeout=5)

    async def close(self) -> None:
        await self.redis.aclose()
        if self.cache is not self.redis:
            await self.cache.aclose()

    async def workers(self) -> list[dict]:
        """Heartbeats of the workers that are up and have loaded their models."""
        keys = [key async for key in self.redis.scan_iter(match=WORKER_PREFIX + "*", count=100)]
        values = await self.redis.mget(keys) if keys else []
        return [json.loads(value) for value in values if value]

    async def queue_depth(self, queue: str) -> int:
        return await self.redis.llen(queue)

    async def admit(self, queue: str, bound: int, model: str) -> None:
        """503 when no worker is up or one refuses `model` ("family/version"), 429 with Retry-After when the
        queue is deeper than `bound`."""
        workers = await self.workers()
        if not workers:
            raise ServiceError(503, "no worker is up to render images; start one (`make run` starts one) "
                                    "and retry", {"Retry-After": "5"})
        refused = refusals(workers).get(model)
        if refused:
            family = model.split("/")[0]
            raise ServiceError(503, f"model {model} is unavailable: {refused}; restore its files or ask for another "
                                    f"version (GET /models/{family} lists them)")
        depth = await self.queue_depth(queue)
        if depth > bound:
            raise ServiceError(429, f"the {queue} queue holds {depth} tasks (bound {bound}); retry later",
                               {"Retry-After": str(max(1, math.ceil(depth / max(bound, 1))))})

    async def send(self, name: str, calls: list[tuple[str, dict]], expires: float | None = None) -> None:
        """Publish (task_id, message) pairs over one producer connection; 503 when Redis refuses them."""
        def publish() -> None:
            with self.celery.producer_or_acquire() as producer:
                for task_id, message in calls:
                    # Answers travel through reply lists and job records: the worker stores no Celery result.
                    self.celery.send_task(name, args=[message], task_id=task_id, expires=expires, producer=producer,
                                          ignore_result=True)

        try:
            await asyncio.to_thread(publish)
        except OperationalError as exc:
            raise ServiceError(503, f"cannot queue work on Redis at {redis_location(self.settings.redis_url)}: "
                                    f"{exc}; retry shortly", {"Retry-After": "5"}) from exc

    async def wait_reply(self, reply_to: str) -> RenderReply:
        timeout = self.settings.sync_timeout_s
        popped = await self.redis.blpop([reply_key(reply_to)], timeout=timeout)
        if popped is None:
            raise ServiceError(504, f"no worker answered within {timeout:g} s; the service is overloaded or a "
                                    "worker is stuck: retry later, or ask for fewer images")
        return RenderReply.from_dict(json.loads(popped[1]))

    async def cache_get(self, key: str) -> dict | None:
        """A cached payload, or None; a failing cache is a miss, never an error."""
        try:
            value = await self.cache.get(key)
        except aioredis.RedisError:
            return None
        return json.loads(value) if value else None

    async def cache_set(self, key: str, payload: dict) -> None:
        data = json.dumps(payload)
        if not self.settings.cache_ttl_s or len(data) > self.settings.cache_max_entry_bytes:
            return
        try:
            await self.cache.set(key, data, ex=self.settings.cache_ttl_s)
        except aioredis.RedisError:
            pass  # the answer is already computed; losing its cache entry costs only a later recomputation

    async def revoke(self, task_ids: list[str]) -> None:
        await asyncio.to_thread(self.celery.control.revoke, task_ids)

    async def snapshot(self, queues: tuple[str, ...]) -> dict:
        """What /metrics reports from Redis: queue depths, ready workers, the stats hash."""
        pipe = self.redis.pipeline()
        for queue in queues:
            pipe.llen(queue)
        pipe.hgetall(STATS_KEY)
        *depths, stats = await pipe.execute()
        return {"queues": dict(zip(queues, depths)), "stats": stats, "workers": len(await self.workers())}
