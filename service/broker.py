"""The gateway's side of Redis and Celery: Redis health, admission (503/429), sending tasks, replies, the cache.

Two connection pools: short commands (cache, job records, admission) time out after `redis_timeout_s`, and the
blocking waits for replies (BLPOP, one per batch in flight) have their own pool. Both pools are larger than the
requests admitted at once, so overload is answered 429 by admission and never surfaces as a pool error. A probe
pings Redis twice a second; while it fails, every request that needs Redis is answered 503 at once, waiting
requests included, and the gateway recovers by itself when Redis answers again. Publishing is
one LPUSH of the task, in the envelope of Celery's Redis transport, from the event loop.
"""
from __future__ import annotations

import asyncio
import base64
import json
import math
import time
import uuid
from typing import Callable
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from kombu import serialization

from core.celery_config import make_celery
from core.messages import QUEUES, STATS_KEY, TASK_QUEUES, WORKER_PREFIX, BatchReply, reply_key
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


PROBE_INTERVAL_S = 0.5
WORKERS_FRESH_S = 1.0  # admission reuses the workers' heartbeats read this recently


class Broker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.celery = make_celery(settings)
        timeout = settings.redis_timeout_s
        # A connection left idle in a pool across a Redis restart is dead; the first command on it fails at once
        # with ConnectionError. One immediate retry on a new connection keeps that from becoming a 503 after Redis
        # is back, and a Redis still down refuses the retry just as fast. Timeouts (a frozen Redis) are not
        # retried: an outage stays a fast 503.
        reconnect = Retry(NoBackoff(), 1, supported_errors=(aioredis.ConnectionError,))
        quick = dict(socket_connect_timeout=timeout, socket_timeout=timeout, timeout=timeout, retry=reconnect,
                     max_connections=settings.max_in_flight + 32)
        self.redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, decode_responses=True, **quick))
        # BLPOP waits up to the synchronous timeout, so its socket timeout must exceed it.
        self.blocking = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, decode_responses=True, socket_connect_timeout=timeout,
            socket_timeout=settings.sync_timeout_s + 5, timeout=timeout, retry=reconnect,
            max_connections=settings.max_in_flight + 8))
        self.cache = self.redis if settings.cache_url == settings.redis_url else aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(settings.cache_url, **quick))
        self.down_reason: str | None = None  # why the last probe failed; None while Redis answers
        self.on_down: list[Callable[[ServiceError], None]] = []
        self._workers: tuple[float, list[dict]] = (0.0, [])
        self.depths: dict[str, int] = {}  # queue -> tasks waiting, as of the last probe

    async def close(self) -> None:
        await self.redis.aclose()
        await self.blocking.aclose()
        if self.cache is not self.redis:
            await self.cache.aclose()

    def outage(self, reason: str) -> ServiceError:
        return ServiceError(503, f"Redis at {redis_location(self.settings.redis_url)} is unreachable ({reason}); "
                                 "retry shortly", {"Retry-After": "2"})

    def ensure_up(self) -> None:
        """503 at once while the probe finds Redis down, instead of waiting on a timeout per request."""
        if self.down_reason is not None:
            raise self.outage(self.down_reason)

    def mark_down(self, reason: str) -> None:
        """Redis is down: answer what waits on it with 503 (on_down), and every new request until the probe hears
        it again."""
        first = self.down_reason is None
        self.down_reason = reason
        if first:
            for callback in self.on_down:
                callback(self.outage(reason))

    async def probe_forever(self) -> None:
        """Every PROBE_INTERVAL_S read the queue depths and the workers' heartbeats, which admission then uses
        without a Redis call per request; on failure answer everything waiting with 503 (see on_down)."""
        while True:
            try:
                depths = await asyncio.wait_for(self._read_depths(), self.settings.redis_timeout_s)
                await asyncio.wait_for(self.workers(), self.settings.redis_timeout_s)
                self.depths, self.down_reason = depths, None
            except (aioredis.RedisError, asyncio.TimeoutError, OSError) as exc:
                self.mark_down(str(exc) or "no answer within {:g} s".format(self.settings.redis_timeout_s))
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def _read_depths(self) -> dict[str, int]:
        pipe = self.redis.pipeline()
        for queue in QUEUES:
            pipe.llen(queue)
        return dict(zip(QUEUES, await pipe.execute()))

    async def workers(self) -> list[dict]:
        """Heartbeats of the workers that are up and have loaded their models.

        The view admission reuses is stamped with the time its read began, and a read that began before the one
        already kept is not kept: reads overlap (the probe's and /readyz's), and a slow one that saw a worker just
        before its heartbeat expired must not replace a newer read that found it gone."""
        began = time.monotonic()
        keys = [key async for key in self.redis.scan_iter(match=WORKER_PREFIX + "*", count=100)]
        values = await self.redis.mget(keys) if keys else []
        found = [json.loads(value) for value in values if value]
        if began >= self._workers[0]:
            self._workers = (began, found)
        return found

    async def recent_workers(self) -> list[dict]:
        """The heartbeats read within WORKERS_FRESH_S, or read now: admission does not scan Redis per request."""
        read_at, found = self._workers
        return found if time.monotonic() - read_at < WORKERS_FRESH_S else await self.workers()

    def worker_count(self) -> int:
        """Workers up at the last read of their heartbeats (no Redis call)."""
        return len(self._workers[1])

    async def admit(self, queue: str, bound: int, model: str) -> None:
        """503 when Redis or every worker is down or a worker refuses `model` ("family/version"), 429 with
        Retry-After when the queue is deeper than `bound` (as of the last probe, at most PROBE_INTERVAL_S ago)."""
        self.ensure_up()
        workers = await self.recent_workers()
        if not workers:
            raise ServiceError(503, "no worker is up to render images; start one (`make run` starts one) "
                                    "and retry", {"Retry-After": "5"})
        refused = refusals(workers).get(model)
        if refused:
            family = model.split("/")[0]
            raise ServiceError(503, f"model {model} is unavailable: {refused}; restore its files or ask for another "
                                    f"version (GET /models/{family} lists them)")
        depth = self.depths.get(queue, 0)
        if depth > bound:
            raise ServiceError(429, f"the {queue} queue holds {depth} tasks (bound {bound}); retry later",
                               {"Retry-After": str(max(1, math.ceil(depth / max(bound, 1))))})

    def envelope(self, name: str, task_id: str, message: dict, expires: float | None) -> str:
        """The task as Celery's Redis transport stores it in its queue: Celery builds the task message (protocol 2
        headers, body), kombu's envelope wraps it. Built here so that publishing is one LPUSH from the event loop:
        Celery's blocking producer, run in a thread, waited for the GIL behind the event loop (10-20 ms a batch)."""
        task = self.celery.amqp.as_task_v2(task_id, name, args=[message], expires=expires, ignore_result=True)
        content_type, encoding, body = serialization.dumps(task.body, serializer="json")
        properties = {**task.properties, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                      "delivery_info": {"exchange": "", "routing_key": TASK_QUEUES[name]},
                      "delivery_tag": str(uuid.uuid4())}
        if expires is not None:
            properties["expiration"] = str(int(expires * 1000))
        return json.dumps({"body": base64.b64encode(body.encode()).decode(), "content-encoding": encoding,
                           "content-type": content_type, "headers": task.headers, "properties": properties})

    async def send(self, name: str, calls: list[tuple[str, dict]], expires: float | None = None) -> None:
        """Queue (task_id, message) pairs of task `name` in one round trip; 503 when Redis refuses or stalls."""
        self.ensure_up()
        envelopes = [self.envelope(name, task_id, message, expires) for task_id, message in calls]
        try:
            await self.redis.lpush(TASK_QUEUES[name], *envelopes)
        except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            raise ServiceError(503, f"cannot queue work on Redis at {redis_location(self.settings.redis_url)}: "
                                    f"{exc}; retry shortly", {"Retry-After": "2"}) from exc

    async def wait_batch(self, reply_to: str) -> BatchReply:
        timeout = self.settings.sync_timeout_s
        try:
            popped = await self.blocking.blpop([reply_key(reply_to)], timeout=timeout)
        except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            raise self.outage(str(exc)) from exc
        if popped is None:
            raise ServiceError(504, f"no worker answered within {timeout:g} s; the service is overloaded or a "
                                    "worker is stuck: retry later, or ask for fewer images")
        return BatchReply.from_dict(json.loads(popped[1]))

    async def cache_get(self, key: str) -> str | None:
        """A cached payload's JSON text, or None; a failing cache is a miss, never an error. When the cache is the
        broker Redis, a failure also marks Redis down until the probe hears it again, so the request that met it
        is answered 503 at once instead of waiting on the next timeout."""
        shared = self.cache is self.redis
        if shared and self.down_reason is not None:
            return None
        try:
            return await self.cache.get(key)
        except (aioredis.RedisError, OSError) as exc:
            if shared and isinstance(exc, (aioredis.ConnectionError, aioredis.TimeoutError)):
                self.mark_down(str(exc) or "no answer")
            return None

    async def cache_set(self, key: str, payload: str) -> None:
        if not self.settings.cache_ttl_s or len(payload) > self.settings.cache_max_entry_bytes:
            return
        try:
            await self.cache.set(key, payload, ex=self.settings.cache_ttl_s)
        except (aioredis.RedisError, OSError):
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
