"""Request ids from the client through the gateway into the worker's log, and metrics labelled by model."""
from __future__ import annotations

import json
import logging

import httpx

from core import logs
from tests.service_helpers import COUNTERFACTUAL, FAMILY, SHIPPED_VERSION, counterfactual, metric, poll, wait_job
from tests.service_stack import ServiceStack, free_port


def test_a_request_id_travels_to_the_worker_log_and_back(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        answer = http.post("/counterfactual", json={"shape": 4, "texture": 1, "background": 8, "seed": 4242},
                           headers={"X-Request-ID": "trace-me.4242"})
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "trace-me.4242"
        job = http.post("/jobs", json={"n": 20}, headers={"X-Request-ID": "job-trace-77"}).json()
        wait_job(http, job["id"])
        for bad in ("x" * 129, "has space", "quote\"d"):
            replaced = http.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
            assert replaced != bad and logs.REQUEST_ID_PATTERN.match(replaced)
        assert logs.REQUEST_ID_PATTERN.match(http.get("/healthz").headers["x-request-id"])
    worker_log = lambda: (stack.root / "worker1.log").read_text()  # noqa: E731
    poll(lambda: "[trace-me.4242]" in worker_log() and "[job-trace-77]" in worker_log(), 10,
         "the request ids in the worker's log")
    gateway_lines = [line for line in (stack.root / "gateway0.log").read_text().splitlines() if "trace-me.4242" in line]
    assert any("POST /counterfactual" in line for line in gateway_lines)  # uvicorn's access line carries it too


def test_json_log_lines_carry_the_request_id():
    record = logging.LogRecord("skdcgn", logging.INFO, __file__, 1, "rendered %d images", (3,), None)
    token = logs.request_id.set("abc")
    try:
        logs.RequestIdFilter().filter(record)
    finally:
        logs.request_id.reset(token)
    line = json.loads(logs.formatter("json").format(record))
    assert line["request_id"] == "abc" and line["message"] == "rendered 3 images" and line["level"] == "INFO"


def test_metrics_are_labelled_by_model_and_version_on_both_sides(tmp_path, models_dir):
    port = free_port()
    with ServiceStack(tmp_path, models_dir, worker_metrics_port=port) as stack:
        with httpx.Client(base_url=stack.url, timeout=30) as http:
            for seed in range(900, 904):
                counterfactual(http, seed=seed)
            text = http.get("/metrics").text
        assert metric(text, "skdcgn_cache_misses_total", **COUNTERFACTUAL) > 0
        assert metric(text, "skdcgn_render_duration_seconds_count", **COUNTERFACTUAL, cache="miss") > 0
        assert metric(text, "skdcgn_images_served_total", model=FAMILY, version=SHIPPED_VERSION, cache="miss") > 0
        assert "_created" not in text

        def worker_text() -> str | None:
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                return None
            return body if "skdcgn_worker_render_seconds_count{" in body else None

        body = poll(worker_text, 20, "the worker's metrics")
        labels = {"model": FAMILY, "version": SHIPPED_VERSION, "provider": "CPUExecutionProvider"}
        assert metric(body, "skdcgn_worker_batch_requests_count", **labels) > 0
        assert metric(body, "skdcgn_worker_render_seconds_count", **labels, kind="interactive") > 0
        assert metric(body, "skdcgn_worker_queue_wait_seconds_count", kind="interactive") > 0
        assert "_created" not in body


def test_the_dashboard_and_scrape_config_name_only_metrics_that_exist():
    """Every series the Grafana dashboard plots is one the gateway or a worker exports."""
    import re

    import yaml
    from prometheus_client import generate_latest

    from core.settings import REPO_ROOT
    from service.metrics import GatewayMetrics
    from workers.metrics import WorkerMetrics

    gateway = GatewayMetrics()
    gateway.cluster.snapshot = {"queues": {"interactive": 0}, "stats": {}, "workers": 1}
    gateway.observe("/counterfactual", "POST", 200, 0.01)
    gateway.render_latency.labels("/counterfactual", FAMILY, SHIPPED_VERSION, "hit").observe(0.01)
    gateway.batch_requests.observe(3)
    for counter in (gateway.cache_hits, gateway.cache_misses):
        counter.labels("/counterfactual", FAMILY, SHIPPED_VERSION).inc()
    gateway.images_served.labels(FAMILY, SHIPPED_VERSION, "hit").inc()
    worker = WorkerMetrics()
    model = type("Model", (), {"family": FAMILY, "version": SHIPPED_VERSION, "provider": "CPUExecutionProvider"})
    worker.rendered(model, "interactive", 3, 0.01, requests=3)
    worker.queue_wait.labels("interactive").observe(0.001)
    exported = set()
    for text in (gateway.render(gateway.cluster.snapshot), generate_latest(worker.registry)):
        exported |= {line.split("{")[0].split(" ")[0] for line in text.decode().splitlines()
                     if not line.startswith("#")}
    dashboard = (REPO_ROOT / "docker" / "grafana" / "dashboards" / "skdcgn.json").read_text()
    plotted = set(re.findall(r"\bskdcgn_\w+", dashboard))
    assert plotted and plotted <= exported, sorted(plotted - exported)
    scrape = yaml.safe_load((REPO_ROOT / "docker" / "prometheus.yml").read_text())
    assert {job["job_name"] for job in scrape["scrape_configs"]} == {"gateway", "workers"}
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert {"prometheus", "grafana"} <= set(compose["services"])
    assert set(scrape["scrape_configs"][1]["dns_sd_configs"][0]["names"]) <= set(compose["services"])
