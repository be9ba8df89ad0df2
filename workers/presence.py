"""A worker's background threads: follow each family's LATEST, and announce the worker to the gateway.

The watcher checks every version's files against its manifest (hashing only files that changed) and loads
(and warms up) every family's LATEST version at start and whenever LATEST changes, so a promoted or rolled-back
version is served without a restart. The heartbeat is this worker's field in one Redis hash (core.messages
WORKERS_KEY) naming the provider, the loaded versions and the refused ones (files failing their sha256 check), which
the gateway reports as unavailable, and when it expires on the Redis server's clock. It appears only after the
first pass finished, which is what "ready" means to the gateway; readers ignore it once expired (a dead worker
vanishes with its refusals) and the gateway's probe drops it. One hash, not a key per worker: finding the workers
costs one HGETALL, whatever else Redis holds.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid

import redis

from core.jobs import now_iso
from core.messages import WORKERS_KEY, redis_now
from core.settings import Settings
from workers.engine import LoadedModels, ModelRefused

logger = logging.getLogger(__name__)
WATCH_INTERVAL_S = 1.0


class WorkerPresence:
    def __init__(self, models: LoadedModels, settings: Settings, name: str):
        self.models, self.settings, self.name = models, settings, name
        self.ready = threading.Event()
        self._beat_now = threading.Event()  # set when the refusals change, so the gateway hears at once
        self._announced_refusals: dict[str, str] = {}
        self._served: dict[str, str] = {}  # family -> the LATEST version last loaded (or tried)
        self._withdrawn = threading.Event()
        # Tells this process from an earlier one of the same name (a container restarted with the same hostname and
        # pid): the gateway re-sends the batches it had in flight when a worker's incarnation changes or vanishes.
        self.incarnation = uuid.uuid4().hex

    def start(self) -> None:
        threading.Thread(target=self._watch, name="model-watcher", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()

    def _follow_latest(self) -> None:
        for family, version in self.models.latest_versions().items():
            if self._served.get(family) == version:
                continue
            try:
                self.models.get(family, version)
            except ModelRefused:
                continue  # logged once by the check; retried each pass (cheaply) until its files check out
            except Exception:
                logger.exception("cannot load %s/%s named by LATEST; requests for it will fail", family, version)
            self._served[family] = version  # any other failure is reported once, not retried every second

    def _watch(self) -> None:
        while True:
            try:
                self.models.audit()
                self._follow_latest()
                if self.models.refused() != self._announced_refusals:
                    self._beat_now.set()
            except Exception:
                logger.exception("scanning the model repository %s failed", self.models.models_dir)
            self.ready.set()
            time.sleep(WATCH_INTERVAL_S)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, socket_timeout=5, socket_connect_timeout=2)

    def withdraw(self) -> None:
        """Stop announcing this worker and remove its heartbeat (best effort: it expires anyway)."""
        self._withdrawn.set()
        self._beat_now.set()
        try:
            self.client().hdel(WORKERS_KEY, self.name)
        except redis.RedisError as exc:
            logger.warning("could not withdraw the heartbeat (%s); it expires by itself", exc)

    def _heartbeat(self) -> None:
        self.ready.wait()
        client = self.client()
        period = self.settings.heartbeat_ttl_s / 3
        while not self._withdrawn.is_set():
            beat = {"name": self.name, "pid": os.getpid(), "incarnation": self.incarnation,
                    "provider": self.models.provider_in_use(), "loaded": self.models.loaded(),
                    "refused": self.models.refused(), "updated": now_iso()}
            try:
                ttl = self.settings.heartbeat_ttl_s
                beat["expires_at"] = redis_now(client.time()) + ttl
                # The hash itself outlives its last worker by a little, so a cluster that stopped leaves nothing.
                client.pipeline().hset(WORKERS_KEY, self.name, json.dumps(beat)).expire(
                    WORKERS_KEY, math.ceil(2 * ttl)).execute()
                self._announced_refusals = beat["refused"]
            except redis.RedisError as exc:
                logger.warning("heartbeat to Redis failed (%s); retrying", exc)
            self._beat_now.wait(period)
            self._beat_now.clear()
