"""The FastAPI gateway's factory: `create_app` builds the Gateway, its routes (service.api), middleware, error
handlers (service.errors) and the web playground; `python -m service` serves `service.app:create_app`.

A synchronous request is validated against the model it names (resolved to a version now, so it finishes on
that version whatever LATEST says later), looked up in the batch cache, and otherwise sent to a worker
whose answer arrives on a Redis reply list. Dataset jobs are split into chunks that workers render in
parallel; their state lives in Redis and their files in the data directory. Every answer names the model
family, version and manifest sha256 it came from, in its body or, for files and PNGs, in its headers.
"""
from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware import Middleware

from core.results import store_for
from core.settings import Settings
from service.api import api_router
from service.batcher import RenderBatcher
from service.broker import Broker, redis_location
from service.catalog import ModelCatalog
from service.errors import add_error_handlers
from service.gateway import Gateway
from service.jobstore import JobStore
from service.limits import BodyLimit, json_bodies
from service.metrics import GatewayMetrics
from service.middleware import GatewayMiddleware
from service.redis_memory import memory_warnings
from service.repeats import RepeatedRenders
from service.routes.render import answer_repeat
from service.schemas import api_description, declare_key_requirements, error_responses

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"  # the web playground served at /
GC_THRESHOLDS = (50_000, 20, 100)  # allocations before a young collection (default 700), then the older ones


def calm_garbage_collector() -> None:
    """Fewer, cheaper garbage collections: the startup heap (FastAPI's routes and schemas, pydantic's validators)
    moves to the permanent generation and young collections run every 50,000 allocations. With the defaults, a
    full collection walked that heap every few thousand requests and was the gateway's p99 at 32 concurrent
    clients (33 ms against a 6 ms p50; 6-8 ms with these)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    broker = Broker(settings)
    metrics = GatewayMetrics()
    gw = Gateway(settings, ModelCatalog(settings.models_dir), broker, metrics,
                 JobStore(broker.redis, store_for(settings), settings.results_url_ttl_s), RenderBatcher(broker, settings, metrics))
    broker.on_down.append(gw.batcher.fail_all)
    broker.on_worker_lost.append(gw.batcher.resend_lost)
    metrics.render_waiting.set_function(gw.batcher.waiting)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        cleanup = asyncio.create_task(gw.jobs.cleanup_forever(settings.job_retention_s, settings.cleanup_interval_s))
        broker.start_probe()
        for warning in await asyncio.to_thread(memory_warnings, settings):
            logger.warning(warning)
        calm_garbage_collector()
        yield
        cleanup.cancel()
        await gw.broker.close()
        gw.png_pool.shutdown(wait=False, cancel_futures=True)

    # redirect_slashes=False: `GET /jobs/` is a 404 in the one error shape, never a redirect whose Location copies
    # the request's Host header.
    app = FastAPI(title="SKDCGN counterfactual service", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                  description=api_description(settings), responses=error_responses(settings),
                  dependencies=[Depends(json_bodies)],
                  middleware=[Middleware(BodyLimit, max_bytes=settings.max_body_bytes)])
    app.state.gateway = gw
    app.include_router(api_router)
    generated_openapi = app.openapi  # FastAPI's, cached after its first call
    app.openapi = lambda: declare_key_requirements(generated_openapi(), settings)
    # The web playground: plain HTML, CSS and JavaScript, no build step.
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def playground():
        """The web playground (service/static/index.html)."""
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    # Outermost first: request id, admission and metrics around everything; repeated renders before FastAPI.
    app.add_middleware(RepeatedRenders, resolve=gw.catalog.resolve, cached=broker.cache_get,
                       answer=partial(answer_repeat, gw), enabled=lambda: not settings.api_keys_for_generation)
    app.add_middleware(GatewayMiddleware, max_in_flight=settings.max_in_flight, metrics=gw.metrics)
    add_error_handlers(app, redis_location(settings.redis_url))
    return app
