"""Celery tasks: interactive renders answered through a Redis reply list, and dataset-job chunks.

Models load after the worker starts (worker_process_init fires in the process that runs tasks, after any
fork), in a background thread that also announces the worker once the sessions are warm.
"""
from __future__ import annotations

import json
import logging
import math
import os

import redis
from celery import signals

from workers.celery_app import app, settings
from workers.engine import ModelRefused, ModelRegistry, render_request
from workers.jobs import run_chunk
from workers.presence import WorkerPresence
from workers.protocol import CHUNK_TASK, RENDER_TASK, STATS_KEY, reply_key

logger = logging.getLogger(__name__)
registry = ModelRegistry(settings.models_dir, settings.models_loaded_max, settings.ort_threads)
_clients: dict[int, redis.Redis] = {}


def broker_client() -> redis.Redis:
    """One client per process, created after any fork."""
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_timeout=10, socket_connect_timeout=2
        )
    return _clients[pid]


@signals.worker_process_init.connect
def start_presence(sender=None, **_) -> None:
    WorkerPresence(registry, settings, name=f"{sender}:{os.getpid()}").start()


@app.task(name=RENDER_TASK, bind=True)
def render(self, request: dict) -> None:
    """Render an interactive request and push {"ok": payload} or {"error", "status"} to its reply list."""
    try:
        reply = {"ok": render_request(registry, request)}
    except ModelRefused as exc:
        reply = {"error": f"{exc}; the version is unavailable until its files are restored", "status": 503}
    except Exception as exc:
        logger.exception("render failed for %s/%s", request.get("family"), request.get("version"))
        reply = {"error": f"the worker could not render this request: {type(exc).__name__}: {exc}", "status": 500}
    key = reply_key(self.request.id)
    pipe = broker_client().pipeline()
    pipe.rpush(key, json.dumps(reply)).expire(key, math.ceil(settings.sync_timeout_s) + 60)
    if "ok" in reply:
        pipe.hincrby(STATS_KEY, "images_generated", request["n"])
    pipe.execute()


@app.task(name=CHUNK_TASK)
def render_chunk(job: dict, chunk: int) -> None:
    run_chunk(broker_client(), registry, settings, job, chunk)
