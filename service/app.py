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
import gc
import json
import logging
import secrets
import time
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import redis.exceptions
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.routing import Match, Route, compile_path

from core.compose import MaskModifiers
from core.imageio import decode, encode, labelled_rows
from core.jobs import (
    ACTIVE_STATES, CHECKSUMS_NAME, PUBLIC_OWNER, SUCCEEDED, TAR_FORMATS, JobSpec, chunk_count,
    job_dir, job_key, jobs_index_key, now_iso, owner_of, result_files, result_paths, shard_count,
)
from core.logs import request_id
from core.manifest import ManifestError, VersionNotFound
from core.messages import (
    CHUNK_TASK, INTERACTIVE_QUEUE, JOBS_QUEUE, ChunkTask, RenderRequest,
)
from core.noise import MECHANISMS
from core.settings import Settings
from service.middleware import GatewayMiddleware
from service.redis_memory import memory_warnings
from service.repeats import REMEMBER, RepeatedRenders
from service.batcher import RenderBatcher
from service.broker import Broker, ServiceError, redis_location, refusals
from service.catalog import ModelCatalog, ResolvedModel, UnknownModel
from service.jobstore import JobStore
from service.limits import BodyLimit, clip, error_response, human_size, json_bodies, short_json
from service.metrics import GatewayMetrics
from service.schemas import (
    CounterfactualRequest, JobChecksums, JobList, JobRequest, JobState, JobStatus, Mechanism, MechanismRequest,
    RenderResponse, api_description, declare_key_requirements, error_responses,
)

logger = logging.getLogger(__name__)
RANDOM_SEED_BITS = 32  # seeds the gateway picks stay exact in JavaScript clients
STATIC_DIR = Path(__file__).resolve().parent / "static"  # the web playground served at /


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


async def sees_workers(request: Request) -> bool:
    """Whether the caller may see worker host names and PIDs: anyone without SKDCGN_API_KEYS, else a valid key.
    The header is read from the request, not through Security(API_KEY): these routes are open, and their OpenAPI
    operations must declare no security requirement."""
    keys = request.app.state.gateway.settings.api_keys
    return not keys or valid_key(keys, request.headers.get("x-api-key"))


def worker_view(workers: list[dict], detailed: bool) -> list[dict]:
    """The workers' heartbeats, or without host names and PIDs (numbered instead) for a caller without a key."""
    if detailed:
        return workers
    return [{"name": f"#{number}", **{key: value for key, value in worker.items() if key not in ("name", "pid")}}
            for number, worker in enumerate(workers, 1)]


async def generation_key(request: Request, x_api_key: str | None = Security(API_KEY)) -> None:
    """With SKDCGN_API_KEYS_FOR_GENERATION, the rendering endpoints need a key as well."""
    if request.app.state.gateway.settings.api_keys_for_generation:
        await job_owner(request, x_api_key)


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
    if len(values) > model.label_count:
        raise ServiceError(422, f"{field}: {len(values)} labels listed, more than model {model.family}'s "
                                f"{model.label_count} labels 0..{model.label_count - 1}; list each at most once")
    bad = [value for value in values if not 0 <= value < model.label_count]
    if bad:
        raise ServiceError(422, f"{field}: label {clip(bad[0])} is out of range; model {model.family} has labels "
                                f"0..{model.label_count - 1}")


def check_n(n: int, maximum: int, hint: str) -> None:
    if n > maximum:
        raise ServiceError(422, f"n={clip(n)} is over this server's maximum of {maximum}{hint}")


def check_cursor(cursor: str | None) -> None:
    if cursor is not None and len(cursor) > CURSOR_MAX:
        raise ServiceError(422, f"cursor: {clip(cursor)!r} is not a cursor this server returned (next_cursor); "
                                f"those are under {CURSOR_MAX} characters")


CURSOR_MAX = 80
# A cursor as OpenAPI declares it: service.jobstore.CURSOR_PATTERN, or empty (the first page, as when omitted).
CURSOR_SPEC_PATTERN = "^([0-9]+:[0-9a-f]{32})?$"
DISK_MARGIN_BYTES = 64 << 20  # free space a job leaves untouched in the jobs directory
SAMPLE_ARRAYS_BYTES = 4 * 8  # a sample's labels (3 int64) and index (int64) in the result
TAR_MEMBER_BYTES = 1024 + 64  # a png job's tar header and padding per PNG, and its labels.csv row
TAR_SAMPLE_BYTES = {"png": TAR_MEMBER_BYTES, "webdataset": 3 * 1024 + 128}  # webdataset: 3 members and the JSON
MAX_SHARDS = 10_000  # tar shards per job: a smaller shard_size is refused (422)
ACTIVE_SCAN = 500  # newest entries of a key's job index among which its active jobs are counted
ACTIVE_RETRY_AFTER_S = 10


def free_bytes(path: Path) -> int:
    """Free space of the file system holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def sample_bytes(model: ResolvedModel, fmt: str) -> int:
    """A sample's share of a job's result: its 3·H·W uint8 image (a PNG is about that or less), labels and index."""
    return 3 * model.image_size ** 2 + SAMPLE_ARRAYS_BYTES + TAR_SAMPLE_BYTES.get(fmt, 0)


def check_disk(gw: Gateway, model: ResolvedModel, n: int, fmt: str) -> None:
    """507 when the job's result, with the chunk files it is assembled from and a margin, would not fit."""
    per_sample = 2 * sample_bytes(model, fmt)  # chunk files and the result coexist while the result is written
    needed, free = n * per_sample + DISK_MARGIN_BYTES, free_bytes(gw.settings.jobs_dir)
    if needed > free:
        fits = max(0, (free - DISK_MARGIN_BYTES) // per_sample)
        raise ServiceError(507, f"a job of n={n} needs about {human_size(needed)} in the jobs directory (its result, "
                                f"the chunk files it is assembled from and a {human_size(DISK_MARGIN_BYTES)} "
                                f"margin), and {human_size(free)} are free: ask for n ≤ {fits}, or retry once "
                                "space is freed (DELETE /jobs/{id} removes an ended job's files)")


async def check_active_jobs(gw: Gateway, owner: str) -> None:
    """429 when the API key already has SKDCGN_MAX_ACTIVE_JOBS_PER_KEY queued or running jobs, counted among its
    newest ACTIVE_SCAN jobs (its index, newest first). Without API keys there is no key to count for."""
    cap = gw.settings.max_active_jobs_per_key
    if not gw.settings.api_keys:
        return
    newest = await gw.jobs.redis.zrevrange(jobs_index_key(owner), 0, ACTIVE_SCAN - 1)
    if len(newest) < cap:
        return
    pipe = gw.jobs.redis.pipeline()
    for job_id in newest:
        pipe.hget(job_key(job_id), "state")
    active = sum(state in ACTIVE_STATES for state in await pipe.execute())
    if active >= cap:
        raise ServiceError(429, f"this API key has {active} queued or running jobs, the maximum per key "
                                f"(SKDCGN_MAX_ACTIVE_JOBS_PER_KEY={cap}); retry once one has ended, or cancel one "
                                "(DELETE /jobs/{id})", {"Retry-After": str(ACTIVE_RETRY_AFTER_S)})


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


PNG_SCALE_MAX = 16
# 8 Mpx (24 MiB of RGB, about 0.1 s of one core to draw): a larger scale × grid is refused (422) before it is drawn;
# n = 64 at scale 8 or n = 16 at scale 16 fit (32×32 images).
PNG_MAX_PIXELS = 1 << 23
PNG_THREADS = 2  # the pool that draws PNG answers: at most this many at once, the rest wait their turn
GRID_PAD = 2  # pixels between the images of a PNG grid (core.imageio.grid's default)


@dataclass(frozen=True)
class PngLayout:
    """How a PNG answer lays out its images: each upscaled `scale`× (nearest neighbour), `nrow` per row."""
    scale: int = 1
    nrow: Optional[int] = None


async def png_layout(scale: int = Query(1, ge=1, le=PNG_SCALE_MAX,
                                        description="with Accept: image/png: upscale each image this many times "
                                                    "(nearest neighbour)"),
                     nrow: Optional[int] = Query(None, ge=1, description="with Accept: image/png: images per row of "
                                                                         "the grid (at most n are used); ⌈√n⌉ when "
                                                                         "omitted"),
                     ) -> PngLayout:
    return PngLayout(scale, nrow)


def png_picture(images: np.ndarray, layout: PngLayout) -> np.ndarray:
    """uint8 [N, H, W, C] images as one picture: the image itself when N = 1, else a grid of `nrow` per row;
    422 when it would be over PNG_MAX_PIXELS."""
    count, height, width, _ = images.shape
    columns = min(layout.nrow or int(np.ceil(np.sqrt(count))), count)
    rows, pad = -(-count // columns), GRID_PAD if count > 1 else 0
    out_height = rows * height * layout.scale + (rows + 1) * pad
    out_width = columns * width * layout.scale + (columns + 1) * pad
    if out_height * out_width > PNG_MAX_PIXELS:
        raise ServiceError(422, f"scale={layout.scale} makes a {out_width}×{out_height} PNG of {count} images, over "
                                f"this server's {PNG_MAX_PIXELS} pixels; ask for a smaller scale or n")
    return labelled_rows([images], columns, scale=layout.scale, pad=pad)


def png_answer(payload: str, layout: PngLayout) -> bytes:
    """The payload's images as one PNG laid out as `layout` says: decoding, upscaling and encoding, CPU work for
    the PNG pool, never the event loop."""
    images = np.stack([decode(base64.b64decode(image)) for image in json.loads(payload)["images"]])
    return encode(png_picture(images, layout))


async def render_response(gw: Gateway, request: RenderRequest, payload: str, cached: bool, accept: str,
                          layout: PngLayout = PngLayout()) -> Response:
    """The answer to a render: the payload's JSON text as it was cached (with `cached` added), or one PNG laid out
    as `layout` says, drawn in the PNG pool."""
    headers = {"X-Cache": "hit" if cached else "miss", "X-Seed": str(request.seed),
               **model_headers(request.family, request.version, request.manifest_sha256)}
    if wants_png(accept):
        drawn = asyncio.get_running_loop().run_in_executor(gw.png_pool, png_answer, payload, layout)
        try:
            png = await asyncio.wait_for(drawn, gw.settings.sync_timeout_s)
        except asyncio.TimeoutError:
            raise ServiceError(504, f"drawing the PNG took over {gw.settings.sync_timeout_s:g} s; the gateway is "
                                    "overloaded: retry later, or ask for a smaller scale or n") from None
        return Response(png, media_type="image/png", headers=headers)
    body = f'{payload[:-1]},"cached":{"true" if cached else "false"}}}'  # the payload is a JSON object
    return Response(body, media_type="application/json", headers=headers)


async def render(gw: Gateway, request: RenderRequest, route: str, accept: str,
                 layout: PngLayout = PngLayout()) -> Response:
    """From the batch cache, or rendered by a worker in a batch with other requests (service.batcher)."""
    started = time.perf_counter()
    key = request.cache_key()
    payload = await gw.broker.cache_get(key)
    cached = payload is not None
    if not cached:
        await gw.broker.admit(INTERACTIVE_QUEUE, gw.settings.queue_bound, f"{request.family}/{request.version}")
        reply = await gw.batcher.render(request)
        if reply.error is not None:
            raise ServiceError(reply.status, reply.error)
        payload = json.dumps(reply.payload, allow_nan=False, separators=(",", ":"))
        gw.background(gw.broker.cache_set(key, payload))  # only successful, encodable answers are cached
    response = await render_response(gw, request, payload, cached, accept, layout)
    count_render(gw, request, route, cached, started)
    return response


def count_render(gw: Gateway, request: RenderRequest, route: str, cached: bool, started: float) -> None:
    """The render metrics of one answered request, labelled by route, model and version."""
    labels = (route, request.family, request.version)
    (gw.metrics.cache_hits if cached else gw.metrics.cache_misses).labels(*labels).inc()
    source = "hit" if cached else "miss"
    gw.metrics.render_latency.labels(*labels, source).observe(time.perf_counter() - started)
    gw.metrics.images_served.labels(request.family, request.version, source).inc(request.n)


def remember(request: Request, task: RenderRequest, asked_version: str | None, seeded: bool) -> None:
    """Let service.repeats answer byte-identical requests from the cache (only seeded ones without explicit z)."""
    if seeded and task.z is None:
        request.scope[REMEMBER] = (task, asked_version)


PNG_RESPONSES = {200: {"content": {"image/png": {}}, "description": "JSON, or one PNG (a grid when n > 1, "
                                                                     "?scale= and ?nrow= lay it out) with "
                                                                     "Accept: image/png"}}
router = APIRouter()
COUNTERFACTUAL_ROUTE, GENERATE_ROUTE = "/counterfactual", "/generate/{mechanism}"


@router.post("/counterfactual", response_model=RenderResponse, responses=PNG_RESPONSES,
             dependencies=[Depends(generation_key)])
async def counterfactual(body: CounterfactualRequest, request: Request, gw: Gateway = Depends(gateway),
                         layout: PngLayout = Depends(png_layout)):
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
                         body.return_noise, request_id.get())
    response = await render(gw, task, COUNTERFACTUAL_ROUTE, request.headers.get("accept", ""), layout)
    remember(request, task, body.version, body.seed is not None)
    return response


@router.post("/generate/{mechanism}", response_model=RenderResponse, responses=PNG_RESPONSES,
             dependencies=[Depends(generation_key)])
async def generate(mechanism: Mechanism, body: MechanismRequest, request: Request, gw: Gateway = Depends(gateway),
                   layout: PngLayout = Depends(png_layout)):
    """One mechanism's raw output: masks (shape), foreground textures or backgrounds of a label."""
    model = resolve_model(gw, body.model, body.version)
    check_mechanisms(model, [mechanism])
    check_labels(model, "label", [body.label])
    check_n(body.n, gw.settings.max_n, "; use POST /jobs for datasets")
    if body.z is not None:
        check_z(model, "z", body.z, body.n)
    task = RenderRequest("mechanism", model.family, model.version, model.manifest_sha256, {mechanism: body.label},
                         body.n, pick_seed(body.seed), MaskModifiers().to_dict(),
                         {mechanism: body.z} if body.z is not None else None, return_noise=body.return_noise,
                         request_id=request_id.get())
    response = await render(gw, task, GENERATE_ROUTE, request.headers.get("accept", ""), layout)
    remember(request, task, body.version, body.seed is not None)
    return response


# --- dataset jobs --------------------------------------------------------------------------------------------------

def check_shard_size(shard_size: int | None, fmt: str, n: int, maximum: int) -> int:
    """Samples per tar shard: the request's (png and webdataset jobs), at most SKDCGN_JOB_SHARD_SIZE and at most
    MAX_SHARDS shards; the server's when omitted."""
    if shard_size is None:
        return maximum
    if fmt not in TAR_FORMATS:
        raise ServiceError(422, f"shard_size: a {fmt} result is one file; shard_size applies to "
                                f"{' and '.join(TAR_FORMATS)} jobs")
    if shard_size > maximum:
        raise ServiceError(422, f"shard_size={clip(shard_size)} is over this server's maximum of {maximum} "
                                "(SKDCGN_JOB_SHARD_SIZE)")
    if chunk_count(n, shard_size) > MAX_SHARDS:
        raise ServiceError(422, f"shard_size={shard_size} makes {chunk_count(n, shard_size)} shards of n={n} "
                                f"samples, more than {MAX_SHARDS}; ask for shard_size ≥ {-(-n // MAX_SHARDS)}")
    return shard_size


@router.post("/jobs", status_code=202, response_model=JobStatus)
async def create_job(body: JobRequest, gw: Gateway = Depends(gateway), owner: str = Depends(job_owner)):
    """Queue a counterfactual dataset; poll GET /jobs/{id}, then download GET /jobs/{id}/result."""
    model = resolve_model(gw, body.model, body.version)
    check_mechanisms(model, MECHANISMS)
    check_n(body.n, gw.settings.max_job_n, "")
    choices, listed = {}, {}
    for mechanism in MECHANISMS:
        allowed = getattr(body.labels, mechanism)
        if allowed is not None:
            check_labels(model, f"labels.{mechanism}", allowed)
            listed[mechanism] = sorted(set(allowed))  # duplicates dropped, in the spec and the stored request
        choices[mechanism] = listed.get(mechanism, list(range(model.label_count)))
    shard_size = check_shard_size(body.shard_size, body.format, body.n, gw.settings.job_shard_size)
    check_disk(gw, model, body.n, body.format)
    await check_active_jobs(gw, owner)
    await gw.broker.admit(JOBS_QUEUE, gw.settings.job_queue_bound, f"{model.family}/{model.version}")
    await gw.jobs.admit_creation(owner, gw.settings.job_create_rate, bool(gw.settings.api_keys))
    seed = pick_seed(body.seed)
    chunk_size = gw.settings.chunk_size_for(model.image_size)
    # shard_size only when asked for: requests of earlier releases (and their provenance) stay as they were
    request = body.model_dump(exclude={"shard_size"} if body.shard_size is None else None) | {
        "model": model.family, "version": model.version, "seed": seed,
        "labels": {mechanism: listed.get(mechanism) for mechanism in MECHANISMS}}
    spec = JobSpec(id=uuid.uuid4().hex, family=model.family, version=model.version,
                   manifest_sha256=model.manifest_sha256, n=body.n, chunk_size=chunk_size,
                   chunks=chunk_count(body.n, chunk_size), shard_size=shard_size,
                   shards=shard_count(body.format, body.n, shard_size), seed=seed,
                   counterfactuals_per_shape=body.counterfactuals_per_shape, labels=choices,
                   mask=body.mask.model_dump(), format=body.format, created=now_iso(), request=request,
                   request_id=request_id.get())
    await gw.jobs.create(spec, owner)
    queued = time.time()
    tasks = [ChunkTask(spec.id, chunk, queued) for chunk in range(spec.chunks)]
    await gw.broker.send(CHUNK_TASK, [(task.task_id, task.to_dict()) for task in tasks])
    return JSONResponse(await gw.jobs.status(spec.id, owner), status_code=202, headers={"Location": f"/jobs/{spec.id}"})


@router.get("/jobs", response_model=JobList)
async def list_jobs(state: Optional[JobState] = Query(None, description="only jobs in this state"),
                    limit: int = Query(20, ge=1, le=100, description="jobs per page"),
                    cursor: Optional[str] = Query(None, description="next_cursor of the previous page",
                                                  json_schema_extra={"pattern": CURSOR_SPEC_PATTERN,
                                                                     "maxLength": CURSOR_MAX}),
                    gw: Gateway = Depends(gateway), owner: str = Depends(job_owner)):
    """Your jobs, newest first, a page at a time; ended jobs stay listed until SKDCGN_JOB_RETENTION_S expires."""
    check_cursor(cursor)
    return await gw.jobs.page(owner, state, limit, cursor)


@router.get("/jobs/{job_id}", response_model=JobStatus)
async def get_job(job_id: str, gw: Gateway = Depends(gateway), owner: str = Depends(job_owner)):
    """State, progress (samples done of total), model, timestamps and error of a job."""
    return await gw.jobs.status(job_id, owner)


RESULT_MEDIA = {".npz": "application/octet-stream", ".tar": "application/x-tar", ".json": "application/json"}


async def succeeded_status(gw: Gateway, job_id: str, owner: str) -> dict:
    """The job's status; 409 unless it has succeeded."""
    status = await gw.jobs.status(job_id, owner)
    if status["state"] != SUCCEEDED:
        progress = status["progress"]
        raise ServiceError(409, f"job {job_id} is {status['state']} ({progress['done']}/{progress['total']} samples); "
                                "its result exists once it has succeeded")
    return status


def result_file_names(gw: Gateway, status: dict) -> list[str]:
    """Names of every file of a succeeded job's result (from its record; from the layout for a job assembled
    before the record listed them)."""
    if status["files"] is not None:
        return [item["name"] for item in status["files"]]
    return [path.name for path in result_files(gw.settings.jobs_dir, status["id"], status["format"], status["shards"])]


@router.get("/jobs/{job_id}/result",
            responses={200: {"content": {"application/octet-stream": {}, "application/x-tar": {},
                                         "application/json": {}, "text/plain": {}}},
                       206: {"description": "the byte range asked for with a Range header"}})
async def get_job_result(job_id: str, shard: Optional[int] = Query(None, ge=0, description="tar shard of a png or "
                                                                                          "webdataset job"),
                         file: Optional[str] = Query(None, max_length=100,
                                                     description="any file of the result by name, as `files` in the "
                                                                 "job's status lists them (e.g. provenance.json)"),
                         gw: Gateway = Depends(gateway), owner: str = Depends(job_owner)):
    """The dataset: result.npz (images, labels, indices, provenance.json), a png job's tar shard of PNGs with
    labels.csv and provenance.json, or a webdataset job's tar shard of samples; `?file=` names any file of the
    result, a webdataset job's provenance.json and SHA256SUMS included. Range requests resume a download (206)."""
    status = await succeeded_status(gw, job_id, owner)
    shards = status["shards"]
    if file is not None:
        if shard is not None:
            raise ServiceError(422, "ask for ?shard= or ?file=, not both")
        names = result_file_names(gw, status)
        if file not in names:
            raise ServiceError(404, f"job {job_id} has no file {clip(file)!r}; its files are {', '.join(names)}")
        path, filename = job_dir(gw.settings.jobs_dir, job_id) / file, file
    else:
        if shard is None and shards > 1:
            raise ServiceError(422, f"shard: job {job_id}'s result is {shards} tar shards; ask for "
                                    f"?shard=0 .. {shards - 1}")
        if (shard or 0) >= shards:
            raise ServiceError(404, f"job {job_id} has no shard {shard}; its shards are 0 .. {shards - 1}")
        path = result_paths(gw.settings.jobs_dir, job_id, status["format"], shards)[shard or 0]
        filename = f"{job_id}{path.suffix}" if shards == 1 else f"{job_id}-{shard:05d}{path.suffix}"
    if not path.is_file():
        raise ServiceError(410, f"the result file {path.name} of job {job_id} is gone from the data directory")
    media = "text/plain" if path.name == CHECKSUMS_NAME else RESULT_MEDIA.get(path.suffix, "application/octet-stream")
    return FileResponse(path, media_type=media, filename=filename,
                        headers=model_headers(status["model"], status["version"], status["manifest_sha256"]))


@router.get("/jobs/{job_id}/checksums", response_model=JobChecksums)
async def get_job_checksums(job_id: str, gw: Gateway = Depends(gateway), owner: str = Depends(job_owner)):
    """The sha256 of every file of a succeeded job's result, as the worker that assembled it computed them:
    {"id", "algorithm": "sha256", "files": {name: hex digest}}."""
    status = await succeeded_status(gw, job_id, owner)
    if status["files"] is None:
        raise ServiceError(404, f"job {job_id} was assembled by a release that recorded no checksums")
    return {"id": job_id, "algorithm": "sha256", "files": {item["name"]: item["sha256"] for item in status["files"]}}


@router.delete("/jobs/{job_id}", response_model=JobStatus, responses={204: {"description": "the ended job is deleted"}})
async def delete_job(job_id: str, gw: Gateway = Depends(gateway), owner: str = Depends(job_owner)):
    """Cancel a queued or running job (its remaining chunks are skipped); delete an ended job, with its result
    files."""
    record = await gw.jobs.record(job_id, owner)
    if not await gw.jobs.cancel(job_id):
        await gw.jobs.delete(record)
        return Response(status_code=204)
    # No Celery revoke: each queued chunk checks its job's state before rendering and skips it, and a revoke made
    # every worker read and write a result-backend key per chunk (core.celery_config).
    return await gw.jobs.status(job_id, owner)


# --- health, models, metrics ---------------------------------------------------------------------------------------

@router.get("/healthz")
async def healthz():
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(gw: Gateway = Depends(gateway), detailed: bool = Depends(sees_workers)):
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


def live_workers(gw: Gateway) -> list[dict]:
    """The workers as of the probe's last reading, which admission uses too; none while Redis is down (the model
    listing still answers from the files)."""
    return gw.broker.view.workers if gw.broker.down_reason is None else []


@router.get("/models")
async def models(gw: Gateway = Depends(gateway), detailed: bool = Depends(sees_workers)):
    """Families, versions, labels and manifest essentials; the workers up and their execution provider (with
    SKDCGN_API_KEYS set, worker names and PIDs only for a valid X-API-Key)."""
    workers = worker_view(live_workers(gw), detailed)
    return {"default_model": gw.settings.default_model, "models": gw.catalog.describe(refusals(workers)),
            "workers": workers}


@router.get("/models/{family}")
async def model_versions(family: str, gw: Gateway = Depends(gateway), detailed: bool = Depends(sees_workers)):
    """Every version of a family: creation time, teacher, metrics, noise block, labels, manifest sha256, and
    whether it can be served ("unavailable" with the reason when a worker refuses its files)."""
    try:
        return gw.catalog.describe_family(family, refusals(worker_view(live_workers(gw), detailed)))
    except UnknownModel as exc:
        raise ServiceError(404, str(exc)) from exc


@router.get("/metrics", response_class=PlainTextResponse)  # declared text/plain in OpenAPI, as it answers
async def metrics(gw: Gateway = Depends(gateway)):
    """Prometheus text format."""
    try:
        snapshot = await gw.broker.snapshot((INTERACTIVE_QUEUE, JOBS_QUEUE))
    except (redis.exceptions.RedisError, OSError):
        snapshot = None
    return Response(gw.metrics.render(snapshot), media_type=CONTENT_TYPE_LATEST)


# --- the application -----------------------------------------------------------------------------------------------

ERRORS_REPORTED = 10  # a 422 lists the first few invalid fields, however many the body has
MESSAGE_CHARS = 200


def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(error["type"] == "json_invalid" for error in errors):
        detail = "; ".join(clip(error.get("ctx", {}).get("error", error["msg"]), MESSAGE_CHARS) for error in errors)
        return error_response(400, f"the request body is not valid JSON: {detail}")
    shown = jsonable(errors[:ERRORS_REPORTED])
    more = f" (and {len(errors) - len(shown)} more)" if len(errors) > len(shown) else ""
    summary = "; ".join(f"{clip('.'.join(str(part) for part in error['loc'][1:]) or error['loc'][0])}: "
                        f"{error['msg']}" for error in shown)
    return error_response(422, f"invalid request: {summary}{more}", detail=shown)


def jsonable(errors: list[dict]) -> list[dict]:
    """Validation errors as JSON can carry them, echoing at most a short prefix of any input."""
    def field(key: str, value):
        if key == "ctx":
            return {k: clip(v) for k, v in value.items()}
        if key == "loc":
            return [part if isinstance(part, int) else clip(part) for part in value]
        if key == "msg":
            return clip(value, MESSAGE_CHARS)
        return short_json(value) if key == "input" else value

    return [{key: field(key, value) for key, value in error.items() if key in ("type", "loc", "msg", "input", "ctx")}
            for error in errors]


def allowed_methods(request: Request) -> list[str]:
    """Every method the request's path takes, from the OpenAPI paths (a path has a route per method) and the
    documentation routes outside them."""
    path, methods = request.scope["path"], set()
    for template, operations in request.app.openapi()["paths"].items():
        if compile_path(template)[0].match(path):
            methods |= {method.upper() for method in operations if method.upper() in HTTP_METHODS}
    for route in request.app.router.routes:  # /docs, /openapi.json, ...
        if isinstance(route, Route) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors (unknown route, method not allowed, unreadable body) in ErrorBody form."""
    where = f"{clip(request.method)} {clip(request.url.path)}"
    if exc.status_code == 404:
        templates = request.app.openapi()["paths"]
        path, hint = request.url.path, ""
        bare = path.rstrip("/")
        if bare != path and bare and any(compile_path(template)[0].match(bare) for template in templates):
            # No redirect to the path without the slash: a redirect built from the request would carry its Host.
            hint = f" (routes take no trailing slash: {clip(bare)})"
        return error_response(404, f"no route {where}{hint}; the routes are {', '.join(templates)} "
                                   "(GET /docs describes them)")
    if exc.status_code == 405:
        allowed = allowed_methods(request)
        return error_response(405, f"{clip(request.method)} is not allowed on {clip(request.url.path)}; it takes "
                                   f"{', '.join(allowed)}", {"Allow": ", ".join(allowed)})
    if exc.status_code == 400:
        return error_response(400, f"the request body could not be read as JSON ({clip(exc.detail)})")
    return error_response(exc.status_code, clip(exc.detail, MESSAGE_CHARS), exc.headers)


def internal_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"the gateway failed unexpectedly ({type(exc).__name__}); retry, and report it if it "
                               "persists")


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
                 JobStore(broker.redis, settings.jobs_dir), RenderBatcher(broker, settings, metrics))
    broker.on_down.append(gw.batcher.fail_all)
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
    app.include_router(router)
    generated_openapi = app.openapi  # FastAPI's, cached after its first call
    app.openapi = lambda: declare_key_requirements(generated_openapi(), settings)
    # The web playground: plain HTML, CSS and JavaScript, no build step.
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def playground():
        """The web playground (service/static/index.html)."""
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    async def answer_repeat(task: RenderRequest, payload: str) -> Response:
        started = time.perf_counter()
        response = await render_response(gw, task, payload, True, "application/json")
        route = COUNTERFACTUAL_ROUTE if task.kind == "counterfactual" else GENERATE_ROUTE
        count_render(gw, task, route, True, started)
        return response

    # Outermost first: request id, admission and metrics around everything; repeated renders before FastAPI.
    app.add_middleware(RepeatedRenders, resolve=gw.catalog.resolve, cached=broker.cache_get, answer=answer_repeat,
                       enabled=lambda: not settings.api_keys_for_generation)
    app.add_middleware(GatewayMiddleware, max_in_flight=settings.max_in_flight, metrics=gw.metrics)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError):
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def redis_down(_: Request, exc: redis.exceptions.RedisError):
        return error_response(503, f"Redis at {redis_location(settings.redis_url)} is unreachable ({exc}); "
                                   "retry shortly", {"Retry-After": "5"})

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    return app
