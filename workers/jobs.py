"""Dataset jobs on the worker side: render a chunk and store it, and assemble the result once every chunk is stored.

A chunk is a pure function of the job spec and its index (noise and labels come from per-sample seeds),
so rendering it twice, on any worker, writes the same file: a chunk redelivered after a crash is harmless.
Each file is written in the worker's local scratch (SKDCGN_JOBS_DIR) under a temporary name, then put in the result
store (core.results: the same folder, another one, or an S3-compatible bucket) before Redis records it, so the
worker that records the last chunk, on any host, assembles from the store. Assembly runs under a Redis lock, and the
job's state moves to `succeeded` only once, through the transition script. The result is one npz, or for png and
webdataset jobs tar shards of `shard_size` samples, streamed from the stored chunks (one tar writer), each file put
in the store as soon as it is whole.
A provenance.json names the model version, its manifest sha256, the request and the seeds of the samples:
inside the npz and each png shard; beside the webdataset shards, which hold only sample members
(`<key>.png`, `<key>.cls`, `<key>.json`), with SHA256SUMS. The sha256 of every result file is recorded in the
job hash as the job succeeds. Chunks go as soon as the job ends, whichever way; a failed job's files all go.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import redis

from core.atomic import atomic_path
from core.compose import MaskModifiers
from core.hashing import sha256_file
from core.imageio import encode
from core.jobs import (
    CHECKSUMS_NAME, JOB_ID_PATTERN, PROVENANCE_NAME, JobSpec, checksums_text, chunk_bounds, chunk_done_args, end_args, files_field,
    job_chunks_key, job_key, job_lock_key, now_iso, result_names, start_args,
)
from core.logs import NO_REQUEST, request_id
from core.messages import STATS_KEY, ChunkTask
from core.noise import draw_labels, draw_sample_noise
from core.results import ResultStore, StoreError, chunk_key, chunks_prefix, file_key, job_prefix
from core.runtime import ModelRuntime
from core.settings import Settings
from core.vocabulary import ACTIVE_STATES, FAILED, SUCCEEDED
from workers.engine import LoadedModels, counterfactual_batch
from workers.metrics import WorkerMetrics

logger = logging.getLogger(__name__)
RETRY_BACKOFF_S = 0.5  # before the second try of a failed chunk; doubles each try
CHUNK_ARRAYS = ("images", "labels", "indices")
SEED_RULE = {  # per sample i of `indices`: the entropy of its streams (numpy SeedSequence, PCG64)
    "noise": "SeedSequence([seed, i]): z for shape, texture and background, the shuffle offsets, then the "
             "mask-modifier draws",
    "labels": "SeedSequence([seed, i, 1]): shape, texture and background, each from its allowed labels",
    "groups": "with counterfactuals_per_shape k, sample i takes the shape label and shape z of sample k * (i // k)",
}


class AssemblyError(RuntimeError):
    """The chunk files on disk do not add up to the job's samples."""


def sample_inputs(model: ModelRuntime, job: JobSpec, index: int) -> tuple[dict, dict | None]:
    """Labels and z override of sample `index`: counterfactuals of one group share their first sample's shape."""
    labels = draw_labels(job.seed, index, job.labels)
    first = index - index % job.counterfactuals_per_shape
    if first == index:
        return labels, None
    labels["shape"] = draw_labels(job.seed, first, job.labels)["shape"]
    shape_z = draw_sample_noise(job.seed, first, model.noise, model.image_size).z["shape"]
    return labels, {"shape": shape_z}


def render_chunk_arrays(model: ModelRuntime, job: JobSpec, chunk: int, batch_size: int) -> dict[str, np.ndarray]:
    start, stop = chunk_bounds(chunk, job.chunk_size, job.n)
    modifiers = MaskModifiers(**job.mask)
    images, labels = [], []
    for batch_start in range(start, stop, batch_size):
        indices = range(batch_start, min(batch_start + batch_size, stop))
        inputs = [sample_inputs(model, job, index) for index in indices]
        batch_images, _, _ = counterfactual_batch(
            model, job.seed, indices, [item[0] for item in inputs], modifiers, [item[1] for item in inputs]
        )
        images.append(batch_images)
        labels += [[item[0]["shape"], item[0]["texture"], item[0]["background"]] for item in inputs]
    return {"images": np.concatenate(images), "labels": np.asarray(labels, np.int64),
            "indices": np.arange(start, stop, dtype=np.int64)}


def write_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def provenance(job: JobSpec, start: int, stop: int, shard: int | None) -> dict:
    """What names the model behind samples start..stop-1 of a job, and what it takes to render them again
    (`shard` None: the whole job's, beside a webdataset job's shards)."""
    return {
        "job_id": job.id, "request": job.request, "family": job.family, "version": job.version,
        "manifest_sha256": job.manifest_sha256, "seed": job.seed, "samples": job.n,
        "indices": [start, stop], "shard": shard, "shards": job.shards, "sample_seeds": SEED_RULE,
        "counterfactuals_per_shape": job.counterfactuals_per_shape, "labels": job.labels, "mask": job.mask,
        "created": job.created, "assembled": now_iso(),
    }


def _provenance_text(job: JobSpec, start: int, stop: int, shard: int | None, **extra) -> str:
    return json.dumps(provenance(job, start, stop, shard) | extra, indent=2) + "\n"


def _samples(store: ResultStore, chunk_keys: list[str]):
    """(image, labels, index) of every sample, in index order, one chunk in memory at a time."""
    for key in chunk_keys:
        with store.open(key) as handle, np.load(handle) as chunk:
            yield from zip(chunk["images"], chunk["labels"], chunk["indices"])


def _write_npz(target: Path, store: ResultStore, chunk_keys: list[str], job: JobSpec) -> None:
    """Stream the chunks into one npz (uncompressed zip of .npy members) without holding the dataset in memory."""
    n = job.n
    with store.open(chunk_keys[0]) as handle, np.load(handle) as first:
        layout = {name: (first[name].dtype, first[name].shape[1:]) for name in CHUNK_ARRAYS}
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, (dtype, tail) in layout.items():
            rows = 0
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, *tail)}
                np.lib.format.write_array_header_1_0(member, header)
                for key in chunk_keys:
                    with store.open(key) as handle, np.load(handle) as chunk:
                        block = np.ascontiguousarray(chunk[name], dtype=dtype)
                    rows += len(block)
                    member.write(block.tobytes())
            if rows != n:
                raise AssemblyError(f"chunks hold {rows} rows of {name!r}, the job asked for {n}")
        # A plain JSON member: np.load(...)["provenance.json"] returns its bytes, unzip shows the file.
        archive.writestr("provenance.json", _provenance_text(job, 0, n, 0))


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # mtime 0: equal samples make equal members
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


class ResultFiles:
    """A job's result files as they are finished: each written in the worker's scratch under a temporary name,
    checksummed, then put in the store (which removes it from scratch, unless the store is that folder)."""

    def __init__(self, store: ResultStore, job: JobSpec):
        self.store, self.job = store, job
        self.folder = store.scratch / job.id
        self.files: list[dict] = []  # {"name", "bytes", "sha256"} in download order

    @contextlib.contextmanager
    def write(self, name: str) -> Iterator[Path]:
        path = self.folder / name
        with atomic_path(path) as tmp:
            yield tmp
        self.files.append({"name": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        self.store.put(path, file_key(self.job.id, name))

    def write_text(self, name: str, text: str) -> None:
        with self.write(name) as tmp:
            tmp.write_text(text, encoding="utf-8")


def _write_shards(result: ResultFiles, chunk_keys: list[str], sample_members, shard_members) -> None:
    """The one tar writer: shards of `shard_size` samples streamed from the chunks, in index order, each put in the
    store as soon as it is whole. `sample_members(image, labels, index)` gives a sample's (name, bytes) members;
    `shard_members(shard, start, stop)` those that close a shard (called after its samples)."""
    job = result.job
    samples = _samples(result.store, chunk_keys)
    for shard, name in enumerate(result_names(job.format, job.shards)):
        start, stop = chunk_bounds(shard, job.shard_size, job.n)
        count = 0
        with result.write(name) as tmp, tarfile.open(tmp, "w") as archive:
            for expected, (image, labels, index) in zip(range(start, stop), samples):
                if index != expected:
                    raise AssemblyError(f"chunks hold sample {index} where sample {expected} belongs")
                for member, data in sample_members(image, labels, int(index)):
                    _add_bytes(archive, member, data)
                count += 1
            if count != stop - start:
                raise AssemblyError(f"chunks hold {start + count} samples, the job asked for {job.n}")
            for member, data in shard_members(shard, start, stop):
                _add_bytes(archive, member, data)


def _key_width(job: JobSpec) -> int:
    return max(6, len(str(job.n - 1)))


def _write_tars(result: ResultFiles, chunk_keys: list[str]) -> None:
    """png jobs: PNG files, labels.csv (file, labels, seed, index) and provenance.json in each shard."""
    job = result.job
    width, rows = _key_width(job), []

    def sample_members(image, labels, index):
        name = f"images/{index:0{width}d}.png"
        shape, texture, background = (int(value) for value in labels)
        rows.append(f"{name},{shape},{texture},{background},{job.seed},{index}")
        yield name, encode(image)

    def shard_members(shard, start, stop):
        table = "\n".join(["file,shape,texture,background,seed,index", *rows]) + "\n"
        rows.clear()
        yield "labels.csv", table.encode()
        yield PROVENANCE_NAME, _provenance_text(job, start, stop, shard).encode()

    _write_shards(result, chunk_keys, sample_members, shard_members)


def webdataset_sample(job: JobSpec, labels, index: int) -> dict:
    """The `<key>.json` member of a webdataset sample."""
    shape, texture, background = (int(value) for value in labels)
    return {"shape": shape, "texture": texture, "background": background, "seed": job.seed, "index": index}


def _write_webdataset(result: ResultFiles, chunk_keys: list[str]) -> None:
    """webdataset jobs: shards of sample members only (`<key>.png`, `<key>.cls` the shape label as text,
    `<key>.json` the three labels, seed and index; the key is the zero-padded index), then provenance.json and
    SHA256SUMS beside them."""
    job = result.job
    width = _key_width(job)

    def sample_members(image, labels, index):
        key = f"{index:0{width}d}"
        yield f"{key}.png", encode(image)
        yield f"{key}.cls", str(int(labels[0])).encode()
        yield f"{key}.json", json.dumps(webdataset_sample(job, labels, index), separators=(",", ":")).encode()

    _write_shards(result, chunk_keys, sample_members, lambda shard, start, stop: ())
    shard_files = [{"name": name, "indices": list(chunk_bounds(shard, job.shard_size, job.n))}
                   for shard, name in enumerate(result_names(job.format, job.shards))]
    result.write_text(PROVENANCE_NAME, _provenance_text(job, 0, job.n, None, files=shard_files))
    result.write_text(CHECKSUMS_NAME, checksums_text({item["name"]: item["sha256"] for item in result.files}))


def assemble(store: ResultStore, job: JobSpec) -> list[dict]:
    """Write and store the result files of a job whose chunks are all in the store; returns each file's name,
    size and sha256, in download order: one npz, the png job's tar shards, or the webdataset job's shards,
    provenance.json and SHA256SUMS."""
    chunk_keys = [chunk_key(job.id, chunk) for chunk in range(job.chunks)]
    missing = [key.rsplit("/", 1)[1] for key in chunk_keys if store.size(key) is None]
    if missing:
        raise AssemblyError(f"chunk files missing from {store.describe(job.id)}: {', '.join(missing[:5])}")
    result = ResultFiles(store, job)
    if job.format == "webdataset":
        _write_webdataset(result, chunk_keys)
    elif job.format == "npz":
        (name,) = result_names(job.format, job.shards)
        with result.write(name) as tmp:
            _write_npz(tmp, store, chunk_keys, job)
    else:
        _write_tars(result, chunk_keys)
    return result.files


def discard(store: ResultStore, job_id: str, prefix: str) -> None:
    """Remove what a job left under `prefix` in the store (its chunks, or all of it) and in this worker's scratch. A
    store that cannot remove them now leaves them to the retention cleanup, which removes an ended job's files."""
    store.discard_scratch(job_id)
    try:
        store.remove(prefix)
    except StoreError as exc:
        logger.warning("job %s: %s stays in the store until the retention cleanup: %s", job_id, prefix, exc)


def load_spec(client: redis.Redis, job_id: str) -> JobSpec | None:
    """The job's spec while the job is active; None once it has ended or is gone (cancelled, failed, expired)."""
    state, spec = client.hmget(job_key(job_id), ["state", "spec"])
    return JobSpec.from_json(spec) if state in ACTIVE_STATES and spec else None


def run_chunk(client: redis.Redis, models: LoadedModels, settings: Settings, store: ResultStore,
              metrics: WorkerMetrics, task: ChunkTask) -> None:
    """Render one chunk unless its job has ended or the chunk is stored already, retrying a chunk that raises
    (`chunk_attempts` tries, with backoff) before the job fails with an error naming the chunk and the cause.
    Whoever records the last chunk assembles the result; a redelivered task of a finished chunk re-checks that,
    so a worker killed while assembling only delays the result."""
    job = load_spec(client, task.job_id)
    if job is None:
        return  # ended (cancelled, failed, succeeded) or expired
    token = request_id.set(job.request_id or NO_REQUEST)
    try:
        if client.sismember(job_chunks_key(job.id), task.chunk):
            done = client.scard(job_chunks_key(job.id))
        else:
            client.eval(*start_args(job.id))
            done = _render_stored(client, models, settings, store, metrics, job, task.chunk)
        if done == job.chunks:
            _assemble_once(client, settings, store, job)
    finally:
        request_id.reset(token)


def _tried(settings: Settings, job: JobSpec, what: str, action):
    """`action()`, tried `chunk_attempts` times with a doubling backoff; the last try's exception propagates."""
    for attempt in range(1, settings.chunk_attempts + 1):
        try:
            return action()
        except Exception as exc:
            if attempt == settings.chunk_attempts:
                raise
            logger.warning("job %s: %s failed (try %d of %d), retrying: %s", job.id, what, attempt,
                           settings.chunk_attempts, exc)
            time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))


def _fail(client: redis.Redis, store: ResultStore, job: JobSpec, what: str, tries: int, exc: Exception) -> None:
    """End the job as failed, its error naming what failed and why, and remove everything it stored."""
    logger.error("job %s: %s failed %d times; the job fails", job.id, what, tries, exc_info=exc)
    if client.eval(*end_args(job.id, FAILED, error=f"{what} failed {tries} times: {type(exc).__name__}: {exc}")):
        client.hincrby(STATS_KEY, "jobs_failed", 1)
    discard(store, job.id, job_prefix(job.id))


def _render_stored(client: redis.Redis, models: LoadedModels, settings: Settings, store: ResultStore,
                   metrics: WorkerMetrics, job: JobSpec, chunk: int) -> int | None:
    """Render `chunk` in scratch and put it in the store, then record it: the chunks done, or None when the job
    ended meanwhile or failed here."""
    def render_and_store() -> int:
        started = time.perf_counter()
        model = models.get(job.family, job.version, job.manifest_sha256)
        arrays = render_chunk_arrays(model, job, chunk, settings.batch_size)
        metrics.rendered(model, "chunk", len(arrays["images"]), time.perf_counter() - started)
        local = store.scratch / chunk_key(job.id, chunk)
        write_chunk(local, arrays)
        store.put(local, chunk_key(job.id, chunk))
        logger.info("job %s chunk %d: %d samples rendered and stored", job.id, chunk, len(arrays["images"]))
        return len(arrays["images"])

    first, stop = chunk_bounds(chunk, job.chunk_size, job.n)
    what = f"chunk {chunk} (samples {first}..{stop - 1})"
    try:
        rendered = _tried(settings, job, what, render_and_store)
    except Exception as exc:
        _fail(client, store, job, what, settings.chunk_attempts, exc)
        return None
    done = client.eval(*chunk_done_args(job.id, chunk))
    if done < 0:
        # Ended while this chunk rendered: whoever ended the job may have cleared the chunks before it landed.
        discard(store, job.id, job_prefix(job.id))
        return None
    client.hincrby(STATS_KEY, "images_generated", rendered)
    return done


def _assemble_once(client: redis.Redis, settings: Settings, store: ResultStore, job: JobSpec) -> None:
    """Assemble under a lock that lives while this worker does: it expires within the visibility timeout of
    the worker's death, and the redelivered chunk task then finds it free. Assembly that keeps failing ends the
    job as failed, with the cause; it never leaves the job running."""
    lock = client.lock(job_lock_key(job.id), timeout=settings.visibility_timeout_s, blocking=False)
    if not lock.acquire():
        return
    held = threading.Event()
    keeper = threading.Thread(target=_keep_lock, args=(lock, held, settings.visibility_timeout_s / 3), daemon=True)
    keeper.start()
    try:
        if client.hget(job_key(job.id), "state") not in ACTIVE_STATES:
            return
        try:
            files = _tried(settings, job, "assembly", lambda: assemble(store, job))
        except Exception as exc:
            _fail(client, store, job, "assembling the result", settings.chunk_attempts, exc)
            return
        size = sum(item["bytes"] for item in files)
        if client.eval(*end_args(job.id, SUCCEEDED, result_bytes=str(size), files=files_field(files))):
            client.hincrby(STATS_KEY, "jobs_succeeded", 1)
            discard(store, job.id, chunks_prefix(job.id))
        else:  # cancelled meanwhile: no result may appear for it
            discard(store, job.id, job_prefix(job.id))
    finally:
        held.set()
        keeper.join()
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass  # expired after all; the state transition above already guards against a second result


def sweep_scratch(client: redis.Redis, store: ResultStore) -> int:
    """Remove the scratch folders of jobs that are no longer active (a worker killed between writing a file and
    storing it leaves its copy behind); none when the store is the scratch folder, whose files are the results.
    Runs as a worker starts: the cost is one Redis read per folder left on this host."""
    if store.in_place or not store.scratch.is_dir():
        return 0
    removed = 0
    for entry in store.scratch.iterdir():
        if entry.is_dir() and JOB_ID_PATTERN.match(entry.name) and load_spec(client, entry.name) is None:
            store.discard_scratch(entry.name)
            removed += 1
    return removed


def _keep_lock(lock, released: threading.Event, period: float) -> None:
    while not released.wait(period):
        try:
            lock.reacquire()
        except redis.exceptions.RedisError:
            return
