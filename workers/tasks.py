"""Celery tasks: batches of interactive requests answered through Redis reply lists, and dataset-job chunks.

Models load after the worker starts (worker_process_init fires in the process that runs tasks, after any
fork), in a background thread that also announces the worker once the sessions are warm. Messages are read
through core.messages, which refuses (loudly) any message of another contract version.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time

import redis
from celery import signals

from core.messages import (
    CHUNK_TASK, RENDER_TASK, STATS_KEY, BatchReply, ChunkTask, MessageSchemaError, RenderBatch, RenderReply, reply_key,
)
from core.results import store_for
from workers.celery_app import app, settings
from workers.engine import LoadedModels, render_batch
from workers.jobs import run_chunk, sweep_scratch
from workers.metrics import WorkerMetrics
from workers.presence import WorkerPresence

logger = logging.getLogger(__name__)
models = LoadedModels(settings.models_dir, settings.models_loaded_max, settings.ort_threads)
metrics = WorkerMetrics()
results = store_for(settings)  # where chunks and results go (SKDCGN_RESULTS_URL); SKDCGN_JOBS_DIR is the scratch
_clients: dict[int, redis.Redis] = {}


def broker_client() -> redis.Redis:
    """One client per process, created after any fork."""
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_timeout=10, socket_connect_timeout=2
        )
    return _clients[pid]


presences: list[WorkerPresence] = []  # this process's announcement, withdrawn when the worker stops


@signals.worker_process_init.connect
def start_presence(sender=None, **_) -> None:
    presence = WorkerPresence(models, settings, name=f"{sender}:{os.getpid()}")
    presence.start()
    presences.append(presence)
    metrics.serve(settings.worker_metrics_port)
    try:
        if removed := sweep_scratch(broker_client(), results):
            logger.info("removed the scratch files of %d ended jobs from %s", removed, results.scratch)
    except (OSError, redis.RedisError) as exc:
        logger.warning("could not sweep the scratch folder %s: %s", results.scratch, exc)


@signals.worker_shutdown.connect
def withdraw_presence(**_) -> None:
    """A worker stopping cleanly leaves the gateway's view at once, not when its heartbeat expires."""
    for presence in presences:
        presence.withdraw()


def queued_for(sent_at: float, kind: str) -> None:
    if sent_at:
        metrics.queue_wait.labels(kind).observe(max(0.0, time.time() - sent_at))


def send_replies(reply_to: str, replies: list[RenderReply]) -> None:
    """Push a batch's answers to its reply list (which expires if its caller has gone), and count the images made."""
    key, ttl = reply_key(reply_to), math.ceil(settings.sync_timeout_s) + 60
    pipe = broker_client().pipeline()
    pipe.rpush(key, json.dumps(BatchReply(replies).to_dict())).expire(key, ttl)
    rendered = sum(reply.payload["n"] for reply in replies if reply.payload is not None)
    if rendered:
        pipe.hincrby(STATS_KEY, "images_generated", rendered)
    pipe.execute()


@app.task(name=RENDER_TASK)
def render(message: dict) -> None:
    """Render a batch of interactive requests, one onnxruntime call per model version, and answer each caller."""
    try:
        batch = RenderBatch.from_dict(message)
    except MessageSchemaError as exc:
        logger.error("refusing a render message: %s", exc)
        reply_to, count = (message.get("reply_to"), len(message.get("requests", []))) if isinstance(message, dict) \
            else (None, 0)
        if isinstance(reply_to, str):
            send_replies(reply_to, [RenderReply.failure(500, f"the worker refused the request: {exc}")] * max(count, 1))
        return
    queued_for(batch.sent_at, "interactive")
    send_replies(batch.reply_to, render_batch(models, batch, metrics))


@app.task(name=CHUNK_TASK)
def render_chunk(message: dict) -> None:
    """Render one chunk of a dataset job (a message of another contract version raises, and is logged)."""
    task = ChunkTask.from_dict(message)
    queued_for(task.sent_at, "chunk")
    run_chunk(broker_client(), models, settings, results, metrics, task)
