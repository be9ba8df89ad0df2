"""GET /models and GET /models/{family}: what this gateway serves, read from the model files.

Each family's versions, labels and manifest essentials come from the models directory (service.catalog), so the
listing answers while Redis is down; a version a live worker refuses (its files fail their sha256 check) is marked
unavailable with the reason. Worker host names and PIDs are shown only to a caller that may see them
(service.gateway.sees_workers).
"""
from __future__ import annotations

from fastapi import APIRouter

from service.broker import refusals
from service.catalog import UnknownModel
from service.errors import ServiceError
from service.gateway import GatewayDep, SeesWorkersDep, live_workers, worker_view

router = APIRouter()


@router.get("/models")
async def models(gw: GatewayDep, detailed: SeesWorkersDep):
    """Families, versions, labels and manifest essentials; the workers up and their execution provider (with
    SKDCGN_API_KEYS set, worker names and PIDs only for a valid X-API-Key)."""
    workers = worker_view(live_workers(gw), detailed)
    return {"default_model": gw.settings.default_model, "models": gw.catalog.describe(refusals(workers)),
            "workers": workers}


@router.get("/models/{family}")
async def model_versions(family: str, gw: GatewayDep, detailed: SeesWorkersDep):
    """Every version of a family: creation time, teacher, metrics, noise block, labels, manifest sha256, and
    whether it can be served ("unavailable" with the reason when a worker refuses its files)."""
    try:
        return gw.catalog.describe_family(family, refusals(worker_view(live_workers(gw), detailed)))
    except UnknownModel as exc:
        raise ServiceError(404, str(exc)) from exc
