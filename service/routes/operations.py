"""GET /healthz, /readyz and /metrics: the gateway reporting on itself, for orchestrators and Prometheus.

These paths are always admitted and not counted in flight (service.middleware), so an overloaded gateway still
answers them. Readiness is judged as admission judges it: Redis answers now and, as of the probe's last reading,
a worker has loaded the default model.
"""
from __future__ import annotations

import redis.exceptions
from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from core.messages import INTERACTIVE_QUEUE, JOBS_QUEUE
from service.gateway import GatewayDep, SeesWorkersDep, live_workers, worker_view

router = APIRouter()


@router.get("/healthz")
async def healthz():
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(gw: GatewayDep, detailed: SeesWorkersDep):
    """Ready when Redis answers now and, as of the probe's last reading (what admission uses, so a ready gateway
    admits and an unready one refuses), a worker has loaded the default model. With SKDCGN_API_KEYS set, worker
    names and PIDs only for a valid X-API-Key."""
    default = gw.settings.default_model
    gw.broker.ensure_up()
    await gw.broker.redis.ping()
    workers = worker_view(live_workers(gw), detailed)
    serving = [w for w in workers if any(name.startswith(default + "/") for name in w["loaded"])]
    body = {"ready": bool(serving), "redis": "ok", "default_model": default, "workers": workers}
    if not serving:
        body["reason"] = f"no worker has loaded {default} yet" if workers else "no worker is up"
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    return body


@router.get("/metrics", response_class=PlainTextResponse)  # declared text/plain in OpenAPI, as it answers
async def metrics(gw: GatewayDep):
    """Prometheus text format."""
    try:
        snapshot = await gw.broker.snapshot((INTERACTIVE_QUEUE, JOBS_QUEUE))
    except (redis.exceptions.RedisError, OSError):
        snapshot = None
    return Response(gw.metrics.render(snapshot), media_type=CONTENT_TYPE_LATEST)
