"""Dataset jobs: POST /jobs, GET /jobs, GET and DELETE /jobs/{id}, GET /jobs/{id}/result and /checksums.

A job is checked before it is queued (the model and its labels, n, shard size, the disk its result needs, the
key's active jobs, the jobs queue and the key's creation rate), then split into chunks that workers render in
parallel. Its state lives in Redis (service.jobstore) and its files in the result store (a folder or an S3-compatible
bucket); each result file streams through the gateway with the headers naming its model, and Range requests resume
a download. With SKDCGN_API_KEYS set,
every route here needs a key, and each key sees only its own jobs.
"""
from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse, Response

from core.jobs import (
    CHECKSUMS_NAME, JobSpec, chunk_count, job_key, jobs_index_key, now_iso, result_file_names, result_names,
    shard_count,
)
from core.results import file_key
from core.logs import request_id
from core.messages import CHUNK_TASK, JOBS_QUEUE, ChunkTask
from core.vocabulary import ACTIVE_STATES, MECHANISMS, SUCCEEDED, TAR_FORMATS
from service.catalog import ResolvedModel
from service.checks import check_labels, check_mechanisms, check_n, model_headers, pick_seed, resolve_model
from service.downloads import stored_file
from service.errors import ServiceError, clip, human_size
from service.gateway import Gateway, GatewayDep, OwnerDep
from service.jobstore import in_store
from service.schemas import JobChecksums, JobList, JobRequest, JobState, JobStatus

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
RESULT_MEDIA = {".npz": "application/octet-stream", ".tar": "application/x-tar", ".json": "application/json"}


def check_cursor(cursor: str | None) -> None:
    if cursor is not None and len(cursor) > CURSOR_MAX:
        raise ServiceError(422, f"cursor: {clip(cursor)!r} is not a cursor this server returned (next_cursor); "
                                f"those are under {CURSOR_MAX} characters")


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
    """507 when the job's result, with the chunk files it is assembled from and a margin, would not fit in a folder
    store. A bucket has no free space to measure: its quota is the store's business, and each worker's scratch holds
    one chunk and one result file at a time."""
    if gw.jobs.results.kind != "local":
        return
    per_sample = 2 * sample_bytes(model, fmt)  # chunk files and the result coexist while the result is written
    needed, free = n * per_sample + DISK_MARGIN_BYTES, free_bytes(gw.jobs.results.root)
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


async def succeeded_status(gw: Gateway, job_id: str, owner: str) -> dict:
    """The job's status; 409 unless it has succeeded."""
    status = await gw.jobs.status(job_id, owner)
    if status["state"] != SUCCEEDED:
        progress = status["progress"]
        raise ServiceError(409, f"job {job_id} is {status['state']} ({progress['done']}/{progress['total']} samples); "
                                "its result exists once it has succeeded")
    return status


def listed_names(status: dict) -> list[str]:
    """Names of every file of a succeeded job's result (from its record; from the layout for a job assembled
    before the record listed them)."""
    if status["files"] is not None:
        return [item["name"] for item in status["files"]]
    return result_file_names(status["format"], status["shards"])


router = APIRouter()


@router.post("/jobs", status_code=202, response_model=JobStatus)
async def create_job(body: JobRequest, gw: GatewayDep, owner: OwnerDep):
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
async def list_jobs(gw: GatewayDep, owner: OwnerDep,
                    state: Optional[JobState] = Query(None, description="only jobs in this state"),
                    limit: int = Query(20, ge=1, le=100, description="jobs per page"),
                    cursor: Optional[str] = Query(None, description="next_cursor of the previous page",
                                                  json_schema_extra={"pattern": CURSOR_SPEC_PATTERN,
                                                                     "maxLength": CURSOR_MAX})):
    """Your jobs, newest first, a page at a time; ended jobs stay listed until SKDCGN_JOB_RETENTION_S expires."""
    check_cursor(cursor)
    return await gw.jobs.page(owner, state, limit, cursor)


@router.get("/jobs/{job_id}", response_model=JobStatus)
async def get_job(job_id: str, gw: GatewayDep, owner: OwnerDep):
    """State, progress (samples done of total), model, timestamps and error of a job."""
    return await gw.jobs.status(job_id, owner)


@router.get("/jobs/{job_id}/result",
            responses={200: {"content": {"application/octet-stream": {}, "application/x-tar": {},
                                         "application/json": {}, "text/plain": {}}},
                       206: {"description": "the byte range asked for with a Range header"}})
async def get_job_result(job_id: str, gw: GatewayDep, owner: OwnerDep,
                         range_header: Optional[str] = Header(None, alias="Range", include_in_schema=False),
                         shard: Optional[int] = Query(None, ge=0, description="tar shard of a png or webdataset job"),
                         file: Optional[str] = Query(None, max_length=100,
                                                     description="any file of the result by name, as `files` in the "
                                                                 "job's status lists them (e.g. provenance.json)")):
    """The dataset: result.npz (images, labels, indices, provenance.json), a png job's tar shard of PNGs with
    labels.csv and provenance.json, or a webdataset job's tar shard of samples; `?file=` names any file of the
    result, a webdataset job's provenance.json and SHA256SUMS included. Range requests resume a download (206)."""
    status = await succeeded_status(gw, job_id, owner)
    shards = status["shards"]
    if file is not None:
        if shard is not None:
            raise ServiceError(422, "ask for ?shard= or ?file=, not both")
        names = listed_names(status)
        if file not in names:
            raise ServiceError(404, f"job {job_id} has no file {clip(file)!r}; its files are {', '.join(names)}")
        name, filename = file, file
    else:
        if shard is None and shards > 1:
            raise ServiceError(422, f"shard: job {job_id}'s result is {shards} tar shards; ask for "
                                    f"?shard=0 .. {shards - 1}")
        if (shard or 0) >= shards:
            raise ServiceError(404, f"job {job_id} has no shard {shard}; its shards are 0 .. {shards - 1}")
        name = result_names(status["format"], shards)[shard or 0]
        suffix = Path(name).suffix
        filename = f"{job_id}{suffix}" if shards == 1 else f"{job_id}-{shard:05d}{suffix}"
    key = file_key(job_id, name)
    size = await in_store(gw.jobs.results.size, key)
    if size is None:
        raise ServiceError(410, f"the result file {name} of job {job_id} is gone from the result store")
    media = "text/plain" if name == CHECKSUMS_NAME else RESULT_MEDIA.get(Path(name).suffix, "application/octet-stream")
    recorded = {item["name"]: item["sha256"] for item in status["files"] or []}
    return stored_file(gw.jobs.results, key, size, range_header, media, filename,
                       model_headers(status["model"], status["version"], status["manifest_sha256"]),
                       recorded.get(name))


@router.get("/jobs/{job_id}/checksums", response_model=JobChecksums)
async def get_job_checksums(job_id: str, gw: GatewayDep, owner: OwnerDep):
    """The sha256 of every file of a succeeded job's result, as the worker that assembled it computed them:
    {"id", "algorithm": "sha256", "files": {name: hex digest}}."""
    status = await succeeded_status(gw, job_id, owner)
    if status["files"] is None:
        raise ServiceError(404, f"job {job_id} was assembled by a release that recorded no checksums")
    return {"id": job_id, "algorithm": "sha256", "files": {item["name"]: item["sha256"] for item in status["files"]}}


@router.delete("/jobs/{job_id}", response_model=JobStatus, responses={204: {"description": "the ended job is deleted"}})
async def delete_job(job_id: str, gw: GatewayDep, owner: OwnerDep):
    """Cancel a queued or running job (its remaining chunks are skipped); delete an ended job, with its result
    files."""
    record = await gw.jobs.record(job_id, owner)
    if not await gw.jobs.cancel(job_id):
        await gw.jobs.delete(record)
        return Response(status_code=204)
    # No Celery revoke: each queued chunk checks its job's state before rendering and skips it, and a revoke made
    # every worker read and write a result-backend key per chunk (core.celery_config).
    return await gw.jobs.status(job_id, owner)

