"""What every route shares: the Gateway (settings, catalog, Redis, metrics, job records, batcher) and its
dependencies: the gateway itself, whose jobs a request sees, whether rendering needs a key, and whether the caller
may see worker names.

A route takes them as `Annotated` aliases (`gw: GatewayDep`, `owner: OwnerDep`, `detailed: SeesWorkersDep`).
With SKDCGN_API_KEYS set, job endpoints need a key and each key sees only its own jobs; without keys every job is
public. Keys are compared in constant time.
"""
from __future__ import annotations

import asyncio
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from core.jobs import PUBLIC_OWNER, owner_of
from core.settings import Settings
from service.batcher import RenderBatcher
from service.broker import Broker
from service.catalog import ModelCatalog
from service.errors import ServiceError
from service.jobstore import JobStore
from service.metrics import GatewayMetrics

PNG_THREADS = 2  # the pool that draws PNG answers: at most this many at once, the rest wait their turn


@dataclass
class Gateway:
    settings: Settings
    catalog: ModelCatalog
    broker: Broker
    metrics: GatewayMetrics
    jobs: JobStore
    batcher: RenderBatcher
    tasks: set = field(default_factory=set)
    png_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(PNG_THREADS, "png"))

    def background(self, coroutine) -> None:
        """Run `coroutine` after the answer is sent (a reference is kept until it is done)."""
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


# Dependencies are coroutines: FastAPI runs plain functions in a thread pool, a thread hop on every request.
async def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


API_KEY = APIKeyHeader(name="X-API-Key", scheme_name="APIKey", auto_error=False,
                       description="One of SKDCGN_API_KEYS. When keys are set, the job endpoints need one (each key "
                                   "sees only its jobs), the rendering endpoints too with "
                                   "SKDCGN_API_KEYS_FOR_GENERATION, and /readyz and /models name worker hosts "
                                   "only to a valid key.")


def valid_key(keys, x_api_key: str | None) -> bool:
    return bool(x_api_key) and any(secrets.compare_digest(x_api_key.encode(), key.encode()) for key in keys)


async def job_owner(request: Request, x_api_key: str | None = Security(API_KEY)) -> str:
    """Whose jobs a request sees. When SKDCGN_API_KEYS is set, job endpoints and downloads need one of its keys,
    and each key sees only its own jobs; without keys every job is public."""
    keys = request.app.state.gateway.settings.api_keys
    if not keys:
        return PUBLIC_OWNER
    if not x_api_key:
        raise ServiceError(401, "this endpoint needs an API key: send it in the X-API-Key header")
    if not valid_key(keys, x_api_key):
        raise ServiceError(403, "the X-API-Key header does not hold a valid API key")
    return owner_of(x_api_key)


async def generation_key(request: Request, x_api_key: str | None = Security(API_KEY)) -> None:
    """With SKDCGN_API_KEYS_FOR_GENERATION, the rendering endpoints need a key as well."""
    if request.app.state.gateway.settings.api_keys_for_generation:
        await job_owner(request, x_api_key)


async def sees_workers(request: Request) -> bool:
    """Whether the caller may see worker host names and PIDs: anyone without SKDCGN_API_KEYS, else a valid key.
    The header is read from the request, not through Security(API_KEY): these routes are open, and their OpenAPI
    operations must declare no security requirement."""
    keys = request.app.state.gateway.settings.api_keys
    return not keys or valid_key(keys, request.headers.get("x-api-key"))


GatewayDep = Annotated[Gateway, Depends(gateway)]
OwnerDep = Annotated[str, Depends(job_owner)]
SeesWorkersDep = Annotated[bool, Depends(sees_workers)]


def live_workers(gw: Gateway) -> list[dict]:
    """The workers as of the probe's last reading, which admission uses too; none while Redis is down (the model
    listing still answers from the files)."""
    return gw.broker.view.workers if gw.broker.down_reason is None else []


def worker_view(workers: list[dict], detailed: bool) -> list[dict]:
    """The workers' heartbeats, or without host names and PIDs (numbered instead) for a caller without a key."""
    if detailed:
        return workers
    return [{"name": f"#{number}", **{key: value for key, value in worker.items() if key not in ("name", "pid")}}
            for number, worker in enumerate(workers, 1)]
