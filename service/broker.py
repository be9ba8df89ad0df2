"""The gateway's side of Redis and Celery: Redis health, admission (503/429), sending tasks, replies, the cache.

Two connection pools: short commands (cache, job records, admission) time out after `redis_timeout_s`, and the
blocking waits for replies (BLPOP, one per batch in flight) have their own pool. Both pools are larger than the
requests admitted at once, so overload is answered 429 by admission and never surfaces as a pool error.

A probe, in a thread of its own with its own connection, reads Redis twice a second: queue depths, the Redis clock
and the workers' heartbeats (one hash: its cost grows with the workers, never with the keyspace). Admission uses
what it read, with no Redis call per request. Only the probe declares Redis down: while it fails, every request
that needs Redis is answered 503 at once, waiting requests included, and the gateway recovers by itself when Redis
answers again. Being a thread, it is never late because the event loop is busy, so a slow loop is never reported
as a Redis outage; a request whose own Redis call fails is answered for itself (a cache read becomes a miss).
Publishing is one LPUSH of the task, in the envelope of Celery's Redis transport, from the event loop.
"""
from __future__ import annotations

import asyncio
import base64
import json
import math
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from kombu import serialization

from core.celery_config import make_celery
from core.messages import (
    QUEUES, STATS_KEY, TASK_QUEUES, WORKERS_KEY, BatchReply, live_heartbeats, lost_workers, redis_now, reply_key,
)
from core.settings import Settings
from service.errors import ServiceError


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
FORGET_WORKER_AFTER_S = 60.0  # a heartbeat expired this long ago is dropped from the hash by the probe


@dataclass(frozen=True)
class ClusterView:
    """What the probe last read: tasks waiting per queue and the workers whose heartbeat is current."""

    depths: dict[str, int] = field(default_factory=dict)
    workers: list[dict] = field(default_factory=list)


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
        self.on_worker_lost: list[Callable[[list[str]], None]] = []  # names of workers that died or restarted
        self.view = ClusterView()  # as of the last probe
        self._stop_probe = threading.Event()

    async def close(self) -> None:
        self._stop_probe.set()
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

    def start_probe(self) -> None:
        """Probe Redis from a thread every PROBE_INTERVAL_S; its findings are applied on the running event loop."""
        threading.Thread(target=self._probe_forever, args=(asyncio.get_running_loop(),), name="redis-probe",
                         daemon=True).start()

    def _probe_forever(self, loop: asyncio.AbstractEventLoop) -> None:
        timeout = self.settings.redis_timeout_s
        client = redis.Redis.from_url(self.settings.redis_url, decode_responses=True, socket_timeout=timeout,
                                      socket_connect_timeout=timeout)
        while True:
            try:
                pipe = client.pipeline(transaction=False)
                for queue in QUEUES:
                    pipe.llen(queue)
                *depths, now, beats = pipe.time().hgetall(WORKERS_KEY).execute()
                workers, forgotten = live_heartbeats(beats, redis_now(now), FORGET_WORKER_AFTER_S)
                if forgotten:
                    client.hdel(WORKERS_KEY, *forgotten)
                found, reason = ClusterView(dict(zip(QUEUES, depths)), workers), None
            except (redis.RedisError, OSError) as exc:
                found, reason = None, str(exc) or f"no answer within {timeout:g} s"
            try:
                loop.call_soon_threadsafe(self._probed, found, reason)
            except RuntimeError:  # the event loop is closed: the gateway is stopping
                break
            if self._stop_probe.wait(PROBE_INTERVAL_S):
                break
        client.close()

    def _probed(self, found: ClusterView | None, reason: str | None) -> None:
        if reason is not None:
            self.mark_down(reason)
            return
        lost = lost_workers(self.view.workers, found.workers)
        self.view, self.down_reason = found, None
        if lost:
            for callback in self.on_worker_lost:
                callback(lost)

    def worker_count(self) -> int:
        """Workers up at the last probe (no Redis call)."""
        return len(self.view.workers)

    async def admit(self, queue: str, bound: int, model: str) -> None:
        """503 when Redis or every worker is down or a worker refuses `model` ("family/version"), 429 with
        Retry-After when the queue is deeper than `bound` (as of the last probe, at most PROBE_INTERVAL_S ago)."""
        self.ensure_up()
        workers = self.view.workers
        if not workers:
            raise ServiceError(503, "no worker is up to render images; start one (`make run` starts one) "
                                    "and retry", {"Retry-After": "5"})
        refused = refusals(workers).get(model)
        if refused:
            family = model.split("/")[0]
            raise ServiceError(503, f"model {model} is unavailable: {refused}; restore its files or ask for another "
                                    f"version (GET /models/{family} lists them)")
        depth = self.view.depths.get(queue, 0)
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
        """Queue (task_id, message) pairs of task `name` in one round trip; 503 naming the cause when Redis refuses
        (out of memory, read-only replica) or stalls."""
        self.ensure_up()
        envelopes = [self.envelope(name, task_id, message, expires) for task_id, message in calls]
        try:
            await self.redis.lpush(TASK_QUEUES[name], *envelopes)
        except (aioredis.RedisError, OSError) as exc:
            raise ServiceError(503, f"cannot queue work on Redis at {redis_location(self.settings.redis_url)}: "
                                    f"{exc}; retry shortly", {"Retry-After": "2"}) from exc

    async def wait_batch(self, reply_to: str) -> BatchReply:
        """The worker's reply to a batch: 504 when none comes in time, 503 when Redis fails, 502 when the reply is
        not one this gateway can read (malformed, or from a worker of another release)."""
        timeout = self.settings.sync_timeout_s
        try:
            popped = await self.blocking.blpop([reply_key(reply_to)], timeout=timeout)
        except (aioredis.RedisError, OSError) as exc:
            raise self.outage(str(exc)) from exc
        if popped is None:
            raise ServiceError(504, f"no worker answered within {timeout:g} s; the service is overloaded or a "
                                    "worker is stuck: retry later, or ask for fewer images")
        try:
            return BatchReply.from_dict(json.loads(popped[1]))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # MessageSchemaError is a ValueError
            raise ServiceError(502, f"a worker sent a reply this gateway cannot read ({str(exc)[:200]}); run the "
                                    "gateway and the workers from the same release") from exc

    async def cache_get(self, key: str) -> str | None:
        """A cached payload's JSON text, or None. A failing cache read is a miss for this request only: outages
        are the probe's to detect, so one slow read never fails other requests."""
        if self.cache is self.redis and self.down_reason is not None:
            return None
        try:
            return await self.cache.get(key)
        except (aioredis.RedisError, OSError):
            return None

    async def cache_set(self, key: str, payload: str) -> None:
        if not self.settings.cache_ttl_s or len(payload) > self.settings.cache_max_entry_bytes:
            return
        try:
            await self.cache.set(key, payload, ex=self.settings.cache_ttl_s)
        except (aioredis.RedisError, OSError):
            pass  # the answer is already computed; losing its cache entry costs only a later recomputation

    async def snapshot(self, queues: tuple[str, ...]) -> dict:
        """What /metrics reports from Redis: queue depths, the stats hash, and the workers up at the last probe.
        Reads only, without MULTI, so a Redis that refuses writes (out of memory, read-only) still reports."""
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
        pipe.hgetall(STATS_KEY)
        *depths, stats = await pipe.execute()
        return {"queues": dict(zip(queues, depths)), "stats": stats, "workers": self.worker_count()}
