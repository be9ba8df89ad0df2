"""Prometheus metrics of the gateway, plus the cluster-wide figures kept in Redis, read at scrape time.

Requests, latency and cache lookups are counted by this gateway process; whatever concerns a model is labelled
`model` and `version` (as the workers' own metrics are, see workers/metrics.py), routes are `route` everywhere.
Queue depth, ready workers, job counts and images generated are shared by every gateway and worker, so they live in
Redis (the stats hash and the queues) and are read when /metrics is scraped.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from core.vocabulary import ENDED_STATES

disable_created_metrics()  # no `_created` series beside every counter and histogram
JOB_EVENTS = ("submitted", *ENDED_STATES)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ClusterCollector:
    """Yields the last snapshot read from Redis; `redis_up` 0 when the read failed."""

    def __init__(self):
        self.snapshot: dict | None = None

    def collect(self):
        up = GaugeMetricFamily("skdcgn_redis_up", "1 when the gateway could read Redis at this scrape")
        up.add_metric([], 1.0 if self.snapshot is not None else 0.0)
        yield up
        if self.snapshot is None:
            return
        depth = GaugeMetricFamily("skdcgn_queue_depth", "tasks waiting in each Celery queue", labels=["queue"])
        for queue, value in self.snapshot["queues"].items():
            depth.add_metric([queue], value)
        yield depth
        workers = GaugeMetricFamily("skdcgn_workers_ready", "workers whose heartbeat is current")
        workers.add_metric([], self.snapshot["workers"])
        yield workers
        stats = self.snapshot["stats"]
        jobs = CounterMetricFamily("skdcgn_jobs", "dataset jobs by event", labels=["event"])
        for event in JOB_EVENTS:
            jobs.add_metric([event], float(stats.get(f"jobs_{event}", 0)))
        yield jobs
        images = CounterMetricFamily("skdcgn_images_generated", "images rendered by workers (jobs and requests)")
        images.add_metric([], float(stats.get("images_generated", 0)))
        yield images


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("skdcgn_http_requests", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("skdcgn_http_request_duration_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        model = ["route", "model", "version"]
        self.cache_hits = Counter("skdcgn_cache_hits", "batch-cache hits", model, registry=self.registry)
        self.cache_misses = Counter("skdcgn_cache_misses", "batch-cache misses", model, registry=self.registry)
        self.render_latency = Histogram("skdcgn_render_duration_seconds", "time to answer a render request",
                                        [*model, "cache"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images_served = Counter("skdcgn_images_served", "images answered to render requests",
                                     ["model", "version", "cache"], registry=self.registry)
        self.batch_requests = Histogram("skdcgn_render_batch_requests", "requests rendered together in one task",
                                        buckets=BATCH_BUCKETS, registry=self.registry)
        # A request that never ends holds its slot: these return to 0 when the gateway is idle, or something leaks.
        self.in_flight = Gauge("skdcgn_requests_in_flight", "requests this gateway is serving (admission counts them "
                               "against SKDCGN_MAX_IN_FLIGHT)", registry=self.registry)
        self.render_waiting = Gauge("skdcgn_render_requests_waiting", "render requests waiting for a worker's answer "
                                    "(batching or rendered)", registry=self.registry)
        self.cluster = ClusterCollector()
        self.registry.register(self.cluster)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self, snapshot: dict | None) -> bytes:
        self.cluster.snapshot = snapshot
        return generate_latest(self.registry)
