"""A worker's Prometheus metrics, served on its own port (SKDCGN_WORKER_METRICS_PORT) once models load.

Labelled `model`, `version` and `provider` (the execution provider the sessions really run on), the way the
gateway labels its own: render time and batch size of interactive batches and job chunks, the time tasks waited
in their queue, and images rendered.
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server

logger = logging.getLogger(__name__)
disable_created_metrics()  # no `_created` series beside every counter and histogram
LABELS = ("model", "version", "provider", "kind")  # kind: "interactive" batch or job "chunk"
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class WorkerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.render_seconds = Histogram("skdcgn_worker_render_seconds", "time to render a batch or a chunk",
                                        LABELS, buckets=SECONDS_BUCKETS, registry=self.registry)
        self.batch_images = Histogram("skdcgn_worker_batch_images", "images per interactive batch or chunk",
                                      LABELS, buckets=SIZE_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("skdcgn_worker_batch_requests", "requests per interactive batch",
                                        ("model", "version", "provider"), buckets=SIZE_BUCKETS,
                                        registry=self.registry)
        self.queue_wait = Histogram("skdcgn_worker_queue_wait_seconds", "time a task waited in its queue",
                                    ("kind",), buckets=SECONDS_BUCKETS, registry=self.registry)
        self.images = Counter("skdcgn_worker_images_rendered", "images rendered", LABELS, registry=self.registry)

    def rendered(self, model, kind: str, images: int, seconds: float, requests: int | None = None) -> None:
        labels = (model.family, model.version, model.provider)
        self.render_seconds.labels(*labels, kind).observe(seconds)
        self.batch_images.labels(*labels, kind).observe(images)
        self.images.labels(*labels, kind).inc(images)
        if requests is not None:
            self.batch_requests.labels(*labels).observe(requests)

    def serve(self, port: int) -> None:
        """Expose the metrics on `port` (0: not at all); a busy port is logged, the worker serves on."""
        if not port:
            return
        try:
            start_http_server(port, registry=self.registry)
            logger.info("worker metrics on port %d", port)
        except OSError as exc:
            logger.error("worker metrics port %d is unavailable (%s); metrics are off in this worker", port, exc)
