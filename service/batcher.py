"""Batching across requests, in the gateway, before Celery: concurrent cache misses share one onnxruntime call.

A miss joins the pending batch. The batch goes to a worker as one task at once when the service is quiet (nothing
being rendered, no other request within the window: an idle service adds no delay), when it holds
`max_batch_samples` images, or when its oldest request has waited `batch_window_ms` and fewer than PIPELINE_DEPTH
batches per live worker are being rendered (so each worker has its next batch queued, never a backlog of small ones:
under load, batches grow instead of queueing up). The worker renders it in one call of the graphs per model version
and answers all its requests in one reply; each caller gets its own images, exactly those it would get alone, since
every sample draws its noise from its own seed. While Redis is down, every waiting request is answered 503 at once.

Every failure answers every request of its batch, whatever raised it, and every request waits at most
`deadline_s`: a batch can never hold its callers (and their in-flight slots) forever. When a worker dies or
restarts (the probe sees its heartbeat vanish or a new incarnation under its name), the batches in flight are
published again, so the callers of the batch it held are answered by another worker instead of timing out.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

from core.messages import RENDER_TASK, RenderBatch, RenderReply, RenderRequest
from core.settings import Settings
from service.broker import Broker
from service.errors import ServiceError
from service.metrics import GatewayMetrics

logger = logging.getLogger(__name__)
Waiting = tuple[RenderRequest, asyncio.Future]
PIPELINE_DEPTH = 2  # batches per live worker in flight: one rendering, one queued behind it


class RenderBatcher:
    def __init__(self, broker: Broker, settings: Settings, metrics: GatewayMetrics):
        self.broker, self.settings, self.metrics = broker, settings, metrics
        self.window_s = settings.batch_window_ms / 1000.0
        self.pending: list[Waiting] = []
        self.pending_samples = 0
        self.oldest = 0.0  # when the oldest pending request arrived (monotonic)
        self.last_arrival = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.in_flight: dict[asyncio.Task, list[Waiting]] = {}
        self.published: dict[str, RenderBatch] = {}  # reply list -> batch, while its answer is awaited
        self.resends: set[asyncio.Task] = set()
        # From the request's arrival: a batch waiting for a free worker does not extend its callers' wait.
        self.deadline_s = settings.sync_timeout_s + 0.5

    def waiting(self) -> int:
        """Callers still waiting for an answer, pending in the next batch or in a batch being rendered (one whose
        deadline passed was answered 504 and is not counted)."""
        batches = [self.pending, *self.in_flight.values()]
        return sum(not future.done() for items in batches for _, future in items)

    async def render(self, request: RenderRequest) -> RenderReply:
        """The worker's answer to `request`, rendered in a batch with whatever else arrived meanwhile."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        now = time.monotonic()
        quiet = now - self.last_arrival >= self.window_s  # no other request lately: nothing to wait for
        self.last_arrival = now
        if not self.pending:
            self.oldest = now
        self.pending.append((request, future))
        self.pending_samples += request.n
        if self.pending_samples >= self.settings.max_batch_samples or (quiet and not self.in_flight) \
                or self.window_s == 0:
            self.dispatch()
        elif self.timer is None:
            self.timer = loop.call_at(loop.time() + self.window_s - (time.monotonic() - self.oldest),
                                      self._window_elapsed)
        try:
            return await asyncio.wait_for(future, self.deadline_s)
        except asyncio.TimeoutError:
            raise ServiceError(504, f"no answer within {self.deadline_s:g} s; the service is overloaded or a worker "
                                    "is stuck: retry later, or ask for fewer images") from None

    def _room(self) -> bool:
        return len(self.in_flight) < PIPELINE_DEPTH * max(1, self.broker.worker_count())

    def _window_elapsed(self) -> None:
        self.timer = None
        if self._room():
            self.dispatch()  # otherwise the next finished batch sends it

    def dispatch(self) -> None:
        """Send the pending requests as one task (no-op when none wait)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.pending:
            return
        items, self.pending, self.pending_samples = self.pending, [], 0
        self.metrics.batch_requests.observe(len(items))
        task = asyncio.create_task(self._render_batch(items))
        self.in_flight[task] = items
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self.in_flight.pop(task, None)
        if self.pending and time.monotonic() - self.oldest >= self.window_s and self._room():
            self.dispatch()  # a worker is free again: what waited its window goes now

    async def _publish(self, batch: RenderBatch) -> None:
        # Expiring with the callers' wait: a worker that reaches the task after they gave up skips it.
        remaining = self.settings.sync_timeout_s - (time.time() - batch.sent_at)
        await self.broker.send(RENDER_TASK, [(batch.reply_to, batch.to_dict())], expires=max(0.1, remaining))

    def resend_lost(self, lost: list[str]) -> None:
        """A worker died or restarted (`lost` names it): a batch it had taken will never be answered, and which
        worker took which batch is not known here, so every batch published before now is published again under
        the same reply list. Its callers get whichever answer comes first (a batch is a pure function of its
        requests); a second answer expires unread."""
        logger.warning("worker %s gone; re-sending the %d batches in flight", ", ".join(lost), len(self.published))
        for batch in list(self.published.values()):
            task = asyncio.create_task(self._publish(batch))
            self.resends.add(task)
            task.add_done_callback(self._resent)

    def _resent(self, task: asyncio.Task) -> None:
        self.resends.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("re-sending a batch failed: %s", task.exception())

    async def _render_batch(self, items: list[Waiting]) -> None:
        batch = RenderBatch([request for request, _ in items], uuid.uuid4().hex, time.time())
        try:
            await self._publish(batch)
            self.published[batch.reply_to] = batch
            replies = (await self.broker.wait_batch(batch.reply_to)).replies
            if len(replies) != len(items):
                raise ServiceError(502, f"a worker answered {len(replies)} of the {len(items)} requests of a batch; "
                                        "run the gateway and the workers from the same release")
        except ServiceError as exc:
            self._fail(items, exc)
            return
        except Exception as exc:  # anything else still answers every caller (CancelledError: fail_all answered)
            self._fail(items, ServiceError(500, f"the gateway failed while rendering ({type(exc).__name__}: "
                                                f"{str(exc)[:200]}); retry, and report it if it persists"))
            return
        finally:
            self.published.pop(batch.reply_to, None)
        for (_, future), reply in zip(items, replies):
            if not future.done():  # a caller that went away cancelled its future
                future.set_result(reply)

    @staticmethod
    def _fail(items: list[Waiting], error: Exception) -> None:
        for _, future in items:
            if not future.done():
                future.set_exception(error)

    def fail_all(self, error: ServiceError) -> None:
        """Answer every waiting request with `error` now (Redis went down: their replies may never come)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        items, self.pending, self.pending_samples = self.pending, [], 0
        self._fail(items, error)
        for task, waiting in list(self.in_flight.items()):
            task.cancel()
            self._fail(waiting, error)
