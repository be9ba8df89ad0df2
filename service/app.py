"""The FastAPI gateway: validation, the batch cache, admission control, Celery dispatch, jobs and downloads.

A synchronous request is validated against the model it names (resolved to a version now, so it finishes on
that version whatever LATEST says later), looked up in the batch cache, and otherwise sent to a worker
whose answer arrives on a Redis reply list. Dataset jobs are split into chunks that workers render in
parallel; their state lives in Redis and their files in the data directory. Every answer names the model
family, version and manifest sha256 it came from, in its body or, for files and PNGs, in its headers.
"""
from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import redis.exceptions
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from core.compose import MaskModifiers
from core.imageio import decode, encode, grid
from core.jobs import PUBLIC_OWNER, SUCCEEDED, JobSpec, chunk_count, now_iso, owner_of, result_paths, shard_count
from core.manifest import ManifestError, VersionNotFound
from core.messages import (
    CHUNK_TASK, INTERACTIVE_QUEUE, JOBS_QUEUE, RENDER_TASK, ChunkTask, RenderBatch, RenderRequest,
)
from core.noise import MECHANISMS
from core.settings import Settings
from service.broker import Broker, ServiceError, redis_location, refusals
from service.catalog import ModelCatalog, ResolvedModel, UnknownModel
from service.jobstore import JobStore
from service.metrics import GatewayMetrics
from service.schemas import (
    CounterfactualRequest, JobList, JobRequest, JobState, JobStatus, Mechanism, MechanismRequest, RenderResponse,
)

RANDOM_SEED_BITS = 32  # seeds the gateway picks stay exact in JavaScript clients


@dataclass
class Gateway:
    settings: Settings
    catalog: ModelCatalog
    broker: Broker
    metrics: GatewayMetrics
    jobs: JobStore


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def job_owner(request: Request, x_api_key: str | None = Header(None)) -> str:
    """Whose jobs a request sees. When SKDCGN_API_KEYS is set, job endpoints and downloads need one of its keys,
    and each key sees only its own jobs; without keys every job is public."""
    keys = gateway(request).settings.api_keys
    if not keys:
        return PUBLIC_OWNER
    if not x_api_key:
        raise ServiceError(401, "this endpoint needs an API key: send it in the X-API-Key header")
    if not any(secrets.compare_digest(x_api_key.encode(), key.encode()) for key in keys):
        raise ServiceError(403, "the X-API-Key header does not hold a valid API key")
    return owner_of(x_api_key)


def generation_key(request: Request, x_api_key: str | None = Header(None)) -> None:
    """With SKDCGN_API_KEYS_FOR_GENERATION, the rendering endpoints need a key as well."""
    if gateway(request).settings.api_keys_for_generation:
        job_owner(request, x_api_key)


# --- validation against the model and the server's limits ---------------------------------------------------------

def resolve_model(gw: Gateway, family: str | None, version: str | None) -> ResolvedModel:
    try:
        return gw.catalog.resolve(family or gw.settings.default_model, version)
    except (UnknownModel, VersionNotFound) as exc:
        raise ServiceError(404, str(exc)) from exc
    except ManifestError as exc:
        raise ServiceError(503, f"the model cannot be served: {exc}") from exc


def check_mechanisms(model: ResolvedModel, needed) -> None:
    missing = [m for m in needed if m not in model.mechanisms]
    if missing:
        raise ServiceError(404, f"model {model.family}/{model.version} has no {', '.join(missing)} mechanism; "
                                f"it has: {', '.join(model.mechanisms)}")


def check_labels(model: ResolvedModel, field: str, values) -> None:
    bad = [value for value in values if not 0 <= value < model.label_count]
    if bad:
        raise ServiceError(422, f"{field}: label {bad[0]} is out of range; model {model.family} has labels "
                                f"0..{model.label_count - 1}")


def check_n(n: int, maximum: int, hint: str) -> None:
    if n > maximum:
        raise ServiceError(422, f"n={n} is over this server's maximum of {maximum}{hint}")


def check_z(model: ResolvedModel, field: str, vectors: list[list[float]], n: int) -> None:
    if len(vectors) != n or any(len(vector) != model.noise_dim for vector in vectors):
        raise ServiceError(422, f"{field} must hold n={n} vectors of {model.noise_dim} numbers each")


def pick_seed(seed: int | None) -> int:
    return seed if seed is not None else secrets.randbits(RANDOM_SEED_BITS)


def model_headers(family: str, version: str, sha256: str) -> dict[str, str]:
    """The model behind an answer, for answers whose body is an image or a file."""
    return {"X-Model-Family": family, "X-Model-Version": version, "X-Manifest-SHA256": sha256}


# --- synchronous rendering -----------------------------------------------------------------------------------------

def wants_png(accept: str) -> bool:
    """The first of image/png or JSON named in Accept wins; JSON when neither is."""
    for item in accept.split(","):
        media = item.split(";")[0].strip().lower()
        if media in ("image/png", "image/*"):
            return True
        if media in ("application/json", "application/*", "*/*"):
            return False
    return False


def render_response(payload: dict, cached: bool, accept: str) -> Response:
    headers = {"X-Cache": "hit" if cached else "miss", "X-Seed": str(payload["seed"]),
               **model_headers(payload["model"], payload["version"], payload["manifest_sha256"])}
    if wants_png(accept):
        images = [decode(base64.b64decode(image)) for image in payload["images"]]
        picture = images[0] if len(images) == 1 else grid(np.stack(images))
        return Response(encode(picture), media_type="image/png", headers=headers)
    return JSONResponse({**payload, "cached": cached}, headers=headers)


async def render(gw: Gateway, request: RenderRequest, endpoint: str, accept: str) -> Response:
    key = request.cache_key()
    payload = await gw.broker.cache_get(key)
    cached = payload is not None
    if cached:
        gw.metrics.cache_hits.labels(endpoint).inc()
    else:
        gw.metrics.cache_misses.labels(endpoint).inc()
        await gw.broker.admit(INTERACTIVE_QUEUE, gw.settings.queue_bound, f"{request.family}/{request.version}")
        task_id = uuid.uuid4().hex
        # Expiring with the timeout: a worker that reaches the task after the caller gave up skips it.
        batch = RenderBatch([request], [task_id])
        await gw.broker.send(RENDER_TASK, [(task_id, batch.to_dict())], expires=gw.settings.sync_timeout_s)
        reply = await gw.broker.wait_reply(task_id)
        if reply.error is not None:
            raise ServiceError(reply.status, reply.error)
        payload = reply.payload
        await gw.broker.cache_set(key, payload)
    return render_response(payload, cached, accept)


PNG_RESPONSES = {200: {"content": {"image/png": {}}, "description": "JSON, or one PNG (a grid when n > 1) "
                                                                     "with Accept: image/png"}}
router = APIRouter()


@router.post("/counterfactual", response_model=RenderResponse, responses=PNG_RESPONSES,
             dependencies=[Depends(generation_key)])
async def counterfactual(body: CounterfactualRequest, request: Request, gw: Gateway = Depends(gateway)):
    """Counterfactual images: the shape of one label, the texture of another, the background of a third."""
    model = resolve_model(gw, body.model, body.version)
    check_mechanisms(model, MECHANISMS)
    labels = {"shape": body.shape, "texture": body.texture, "background": body.background}
    for name, value in labels.items():
        check_labels(model, name, [value])
    check_n(body.n, gw.settings.max_n, "; use POST /jobs for datasets")
    for mechanism, vectors in (body.z or {}).items():
        check_z(model, f"z.{mechanism}", vectors, body.n)
    task = RenderRequest("counterfactual", model.family, model.version, model.manifest_sha256, labels, body.n,
                         pick_seed(body.seed), body.mask.model_dump(), body.z, body.return_components,
                         body.return_noise)
    return await render(gw, task, "counterfactual", request.headers.get("accept", ""))


@router.post("/generate/{mechanism}", response_model=RenderResponse, responses=PNG_RESPONSES,
             dependencies=[Depends(generation_key)])
async def generate(mechanism: Mechanism, body: MechanismRequest, request: Request, gw: Gateway = Depends(gateway)):
    """One mechanism's raw output: masks (shape), foreground textures or backgrounds of a label."""
    model = resolve_model(gw, body.model, body.version)
    check_mechanisms(model, [mechanism])
    check_labels(model, "label", [body.label])
    check_n(body.n, gw.settings.max_n, "; use POST /jobs for datasets")
    if body.z is not None:
        check_z(model, "z", body.z, body.n)
    task = RenderRequest("mechanism", model.family, model.version, model.manifest_sha256, {mechanism: body.label},
                         body.n, pick_seed(body.seed), MaskModifiers().to_dict(),
                         {mechanism: body.z} if body.z is not None else None, return_noise=body.return_noise)
    return await render(gw, task, f"generate/{mechanism}", request.headers.get("accept", ""))


# --- dataset jobs --------------------------------------------------------------------------------------------------

@router.post("/jobs", status_code=202, response_model=JobStatus)
async def create_job(body: JobRequest, gw: Gateway = Depends(gateway), owner: str = Depends(job_owner)):
    """Queue a counterfactual dataset; poll GET /jobs/{id}, then download GET /jobs/{id}/result."""
    model = resolve_model(gw, body.model, body.version)
    check_mechanisms(model, MECHANISMS)
    check_n(body.n, gw.settings.max_job_n, "")
    choices = {}
    for mechanism in MECHANISMS:
        allowed = getattr(body.labels, mechanism)
        if allowed is not None:
            check_labels(model, f"labels.{mechanism}", allowed)
        choices[mechanism] = sorted(set(allowed)) if allowed is not None else list(range(model.label_count))
    await gw.broker.admit(JOBS_QUEUE, gw.settings.job_queue_bound, f"{model.family}/{model.version}")
    seed = pick_seed(body.seed)
    chunk_size, shard_size = gw.settings.job_chunk_size, gw.settings.job_shard_size
    request = body.model_dump() | {"model": model.family, "version": model.version, "seed": seed}
    spec = JobSpec(id=uuid.uuid4().hex, family=model.family, version=model.version,
                   manifest_sha256=model.manifest_sha256, n=body.n, chunk_size=chunk_size,
                   chunks=chunk_count(body.n, chunk_size), shard_size=shard_size,
                   shards=shard_count(body.format, body.n, shard_size), seed=seed,
                   counterfactuals_per_shape=body.counterfactuals_per_shape, labels=choices,
                   mask=body.mask.model_dump(), format=body.format, created=now_iso(), request=request)
    await gw.jobs.create(spec, owner)
    tasks = [ChunkTask(spec.id, chunk) for chunk in range(spec.chunks)]
    await gw.broker.send(CHUNK_TASK, [(task.task_id, task.to_dict()) for task in tasks])
    return JSONResponse(await gw.jobs.status(spec.id, owner), status_code=202, headers={"Location": f"/jobs/{spec.id}"})


@router.get("/jobs", response_model=JobList)
async def list_jobs(state: Optional[JobState] = Query(None, description="only jobs in this state"),
                    limit: int = Query(20, ge=1, le=100, description="jobs per page"),
                    cursor: Optional[str] = Query(None, description="next_cursor of the previous page"),
                    gw: Gateway = Depends(gateway), owner: str = Depends(job_owner)):
    """Your jobs, newest first, a page at a time; ended jobs stay listed until SKDCGN_JOB_RETENTION_S expires."""
    return await gw.jobs.page(owner, state, limit, cursor)


@router.get("/jobs/{job_id}", response_model=JobStatus)
async def get_job(job_id: str, gw: Gateway = Depends(gateway), owner: str = Depends(job_owner)):
    """State, progress (samples done of total), model, timestamps and error of a job."""
    return await gw.jobs.status(job_id, owner)


@router.get("/jobs/{job_id}/result",
            responses={200: {"content": {"application/octet-stream": {}, "application/x-tar": {}}}})
async def get_job_result(job_id: str, shard: Optional[int] = Query(None, ge=0, description="tar shard of a png job"),
                         gw: Gateway = Depends(gateway), owner: str = Depends(job_owner)):
    """The dataset: result.npz (images, labels, indices, provenance.json), or a png job's tar shard of PNGs with
    labels.csv and provenance.json."""
    status = await gw.jobs.status(job_id, owner)
    if status["state"] != SUCCEEDED:
        progress = status["progress"]
        raise ServiceError(409, f"job {job_id} is {status['state']} ({progress['done']}/{progress['total']} samples); "
                                "its result exists once it has succeeded")
    shards = status["shards"]
    if shard is None and shards > 1:
        raise ServiceError(422, f"shard: job {job_id}'s result is {shards} tar shards; ask for ?shard=0 .. {shards - 1}")
    if (shard or 0) >= shards:
        raise ServiceError(404, f"job {job_id} has no shard {shard}; its shards are 0 .. {shards - 1}")
    path = result_paths(gw.settings.jobs_dir, job_id, status["format"], shards)[shard or 0]
    if not path.is_file():
        raise ServiceError(410, f"the result file of job {job_id} is gone from the data directory")
    media = "application/x-tar" if status["format"] == "png" else "application/octet-stream"
    filename = f"{job_id}{path.suffix}" if shards == 1 else f"{job_id}-{shard:05d}{path.suffix}"
    return FileResponse(path, media_type=media, filename=filename,
                        headers=model_headers(status["model"], status["version"], status["manifest_sha256"]))


@router.delete("/jobs/{job_id}", response_model=JobStatus, responses={204: {"description": "the ended job is deleted"}})
async def delete_job(job_id: str, gw: Gateway = Depends(gateway), owner: str = Depends(job_owner)):
    """Cancel a queued or running job (its remaining chunks are revoked and skipped); delete an ended job, with its
    result files."""
    record = await gw.jobs.record(job_id, owner)
    if not await gw.jobs.cancel(job_id):
        await gw.jobs.delete(record)
        return Response(status_code=204)
    # Chunks also check the job's state before rendering, so a revoke that misses a worker costs nothing.
    await gw.broker.revoke([ChunkTask(job_id, chunk).task_id for chunk in range(int(record["chunks"]))])
    return await gw.jobs.status(job_id, owner)


# --- health, models, metrics ---------------------------------------------------------------------------------------

@router.get("/healthz")
async def healthz():
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(gw: Gateway = Depends(gateway)):
    """Ready when Redis answers and a worker has loaded the default model."""
    default = gw.settings.default_model
    workers = await gw.broker.workers()
    serving = [w for w in workers if any(name.startswith(default + "/") for name in w["loaded"])]
    body = {"ready": bool(serving), "redis": "ok", "default_model": default, "workers": workers}
    if not serving:
        body["reason"] = f"no worker has loaded {default} yet" if workers else "no worker is up"
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    return body


async def live_workers(gw: Gateway) -> list[dict]:
    """The workers' heartbeats; none when Redis is down (the model listing still answers from the files)."""
    try:
        return await gw.broker.workers()
    except redis.exceptions.ConnectionError:
        return []


@router.get("/models")
async def models(gw: Gateway = Depends(gateway)):
    """Families, versions, labels and manifest essentials; the workers up and their execution provider."""
    workers = await live_workers(gw)
    return {"default_model": gw.settings.default_model, "models": gw.catalog.describe(refusals(workers)),
            "workers": workers}


@router.get("/models/{family}")
async def model_versions(family: str, gw: Gateway = Depends(gateway)):
    """Every version of a family: creation time, teacher, metrics, noise block, labels, manifest sha256, and
    whether it can be served ("unavailable" with the reason when a worker refuses its files)."""
    try:
        return gw.catalog.describe_family(family, refusals(await live_workers(gw)))
    except UnknownModel as exc:
        raise ServiceError(404, str(exc)) from exc


@router.get("/metrics")
async def metrics(gw: Gateway = Depends(gateway)):
    """Prometheus text format."""
    try:
        snapshot = await gw.broker.snapshot((INTERACTIVE_QUEUE, JOBS_QUEUE))
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        snapshot = None
    return Response(gw.metrics.render(snapshot), media_type=CONTENT_TYPE_LATEST)


# --- the application -----------------------------------------------------------------------------------------------

def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(error["type"] == "json_invalid" for error in errors):
        detail = "; ".join(str(error.get("ctx", {}).get("error", error["msg"])) for error in errors)
        return JSONResponse({"error": f"the request body is not valid JSON: {detail}"}, status_code=400)
    summary = "; ".join(f"{'.'.join(str(part) for part in error['loc'][1:]) or error['loc'][0]}: {error['msg']}"
                        for error in errors)
    return JSONResponse({"error": f"invalid request: {summary}", "detail": jsonable(errors)}, status_code=422)


def json_safe(value):
    """`value`, or its repr where JSON cannot carry it (a NaN or an infinity the client sent)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


def jsonable(errors: list[dict]) -> list[dict]:
    def field(key: str, value):
        if key == "ctx":
            return {k: str(v) for k, v in value.items()}
        return json_safe(value) if key == "input" else value

    return [{key: field(key, value) for key, value in error.items() if key in ("type", "loc", "msg", "input", "ctx")}
            for error in errors]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    broker = Broker(settings)
    gw = Gateway(settings, ModelCatalog(settings.models_dir), broker, GatewayMetrics(),
                 JobStore(broker.redis, settings.jobs_dir))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        cleanup = asyncio.create_task(gw.jobs.cleanup_forever(settings.job_retention_s, settings.cleanup_interval_s))
        yield
        cleanup.cancel()
        await gw.broker.close()

    app = FastAPI(title="SKDCGN counterfactual service", version="0.1.0", lifespan=lifespan,
                  description="Counterfactual images from distilled CGN students: single requests, single "
                              "mechanisms and bulk dataset jobs.")
    app.state.gateway = gw
    app.include_router(router)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        gw.metrics.observe(route.path if route else "unmatched", request.method, response.status_code,
                           time.perf_counter() - started)
        return response

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def redis_down(_: Request, exc: redis.exceptions.RedisError):
        return JSONResponse({"error": f"Redis at {redis_location(settings.redis_url)} is unreachable ({exc}); "
                                      "retry shortly"}, status_code=503, headers={"Retry-After": "5"})

    app.add_exception_handler(RequestValidationError, validation_error)
    return app
