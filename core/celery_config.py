"""The Celery configuration both sides use: Redis broker, one worker process per GPU, prefetch 1, late acks,
redelivery on worker loss, and the queues and routes of core.messages.

The gateway builds an app from it to send tasks by name (it never imports workers/); the worker's app
(workers.celery_app) adds its task module. Run workers with `--pool solo` (the default here) or `threads`:
models load after start, never before a fork, so the CUDA provider stays usable.

Redis is the broker, and there is no result backend: nothing reads a Celery result. Interactive answers travel
through per-task Redis reply lists the gateway awaits with asyncio, because Celery's Redis result consumer is not
safe to share between a server's threads (celery/celery#4670, #6335); job outputs go to job records and files.
Without a backend Celery writes no `celery-task-meta-*` keys at all: with one, every task id a worker is told to
revoke became a REVOKED key kept for a day (celery.worker.control._revoke stores it whatever the task's
ignore_result), so each cancelled chunk left state in the broker Redis. Nothing revokes tasks either: a chunk
checks its job's state before rendering, which is what a revoke would have saved.
"""
from __future__ import annotations

from celery import Celery
from kombu import Queue

from core.messages import INTERACTIVE_QUEUE, JOBS_QUEUE, TASK_QUEUES
from core.settings import Settings


def make_celery(settings: Settings, include: tuple[str, ...] = ()) -> Celery:
    """The Celery app of a gateway (sends tasks by name) or, with the worker's task modules in `include`, a worker."""
    app = Celery("skdcgn", broker=settings.redis_url, include=list(include))
    # Abandoned (unacknowledged) messages are swept back into their queue once they are older than the
    # visibility timeout; sweep at a quarter of it so a killed worker's chunk returns promptly.
    restore_interval = max(1, min(10, settings.visibility_timeout_s // 4))
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,  # Celery's DisabledBackend: no result or revocation is ever stored
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_pool="solo",
        worker_concurrency=1,
        broker_connection_retry_on_startup=True,
        # Chunks are idempotent: a task whose acknowledgement cannot reach a lost broker is redelivered.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": restore_interval,
            "unacked_restore_throttle": 1,
            # Poll the interactive queue first, so single requests overtake waiting job chunks.
            "queue_order_strategy": "priority",
            "socket_connect_timeout": 2,
        },
        # Publishing fails fast when Redis is gone: the gateway then answers 503 instead of hanging.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        task_queues=[Queue(INTERACTIVE_QUEUE), Queue(JOBS_QUEUE)],
        task_default_queue=INTERACTIVE_QUEUE,
        task_routes={task: {"queue": queue} for task, queue in TASK_QUEUES.items()},
    )
    return app
