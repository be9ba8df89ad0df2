"""Dataset jobs on the worker side: render a chunk to disk, and assemble the result once every chunk is there.

A chunk is a pure function of the job spec and its index (noise and labels come from per-sample seeds),
so rendering it twice, on any worker, writes the same file: a chunk redelivered after a crash is harmless.
Chunk files are written under a temporary name and renamed; the result is assembled under a Redis lock,
and the job's state moves to `succeeded` only once, through the transition script. The result is one npz, or
for png and webdataset jobs tar shards of `shard_size` samples, streamed from the chunk files (one tar writer).
A provenance.json names the model version, its manifest sha256, the request and the seeds of the samples:
inside the npz and each png shard; beside the webdataset shards, which hold only sample members
(`<key>.png`, `<key>.cls`, `<key>.json`), with SHA256SUMS. The sha256 of every result file is recorded in the
job hash as the job succeeds. Chunk files go as soon as the job ends, whichever way.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import redis

from core.atomic import atomic_path, write_text_atomic
from core.compose import MaskModifiers
from core.hashing import sha256_file
from core.imageio import encode
from core.jobs import (
    PROVENANCE_NAME, JobSpec, checksums_text, chunk_bounds, chunk_done_args, chunk_path, discard_chunks, end_args,
    files_field, job_chunks_key, job_key, job_lock_key, now_iso, result_paths, sidecar_paths, start_args,
)
from core.logs import NO_REQUEST, request_id
from core.messages import STATS_KEY, ChunkTask
from core.noise import draw_labels, draw_sample_noise
from core.runtime import ModelRuntime
from core.settings import Settings
from core.vocabulary import ACTIVE_STATES, CANCELLED, FAILED, SUCCEEDED
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


def _samples(chunk_paths: list[Path]):
    """(image, labels, index) of every sample, in index order, one chunk file in memory at a time."""
    for path in chunk_paths:
        with np.load(path) as chunk:
            yield from zip(chunk["images"], chunk["labels"], chunk["indices"])


def _write_npz(target: Path, chunk_paths: list[Path], job: JobSpec) -> None:
    """Stream the chunks into one npz (uncompressed zip of .npy members) without holding the dataset in memory."""
    n = job.n
    with np.load(chunk_paths[0]) as first:
        layout = {name: (first[name].dtype, first[name].shape[1:]) for name in CHUNK_ARRAYS}
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, (dtype, tail) in layout.items():
            rows = 0
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, *tail)}
                np.lib.format.write_array_header_1_0(member, header)
                for path in chunk_paths:
                    with np.load(path) as chunk:
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


def _write_shards(targets: list[Path], chunk_paths: list[Path], job: JobSpec, sample_members, shard_members) -> None:
    """The one tar writer: shards of `shard_size` samples streamed from the chunk files, in index order.
    `sample_members(image, labels, index)` gives a sample's (name, bytes) members; `shard_members(shard, start,
    stop)` those that close a shard (called after its samples)."""
    samples = _samples(chunk_paths)
    for shard, target in enumerate(targets):
        start, stop = chunk_bounds(shard, job.shard_size, job.n)
        count = 0
        with atomic_path(target) as tmp, tarfile.open(tmp, "w") as archive:
            for expected, (image, labels, index) in zip(range(start, stop), samples):
                if index != expected:
                    raise AssemblyError(f"chunks hold sample {index} where sample {expected} belongs")
                for name, data in sample_members(image, labels, int(index)):
                    _add_bytes(archive, name, data)
                count += 1
            if count != stop - start:
                raise AssemblyError(f"chunks hold {start + count} samples, the job asked for {job.n}")
            for name, data in shard_members(shard, start, stop):
                _add_bytes(archive, name, data)


def _key_width(job: JobSpec) -> int:
    return max(6, len(str(job.n - 1)))


def _write_tars(targets: list[Path], chunk_paths: list[Path], job: JobSpec) -> None:
    """png jobs: PNG files, labels.csv (file, labels, seed, index) and provenance.json in each shard."""
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

    _write_shards(targets, chunk_paths, job, sample_members, shard_members)


def webdataset_sample(job: JobSpec, labels, index: int) -> dict:
    """The `<key>.json` member of a webdataset sample."""
    shape, texture, background = (int(value) for value in labels)
    return {"shape": shape, "texture": texture, "background": background, "seed": job.seed, "index": index}


def _write_webdataset(jobs_dir: Path, targets: list[Path], chunk_paths: list[Path], job: JobSpec) -> dict[Path, str]:
    """webdataset jobs: shards of sample members only (`<key>.png`, `<key>.cls` the shape label as text,
    `<key>.json` the three labels, seed and index; the key is the zero-padded index), then provenance.json and
    SHA256SUMS beside them. Returns every file's sha256."""
    width = _key_width(job)

    def sample_members(image, labels, index):
        key = f"{index:0{width}d}"
        yield f"{key}.png", encode(image)
        yield f"{key}.cls", str(int(labels[0])).encode()
        yield f"{key}.json", json.dumps(webdataset_sample(job, labels, index), separators=(",", ":")).encode()

    _write_shards(targets, chunk_paths, job, sample_members, lambda shard, start, stop: ())
    provenance_path, checksums_path = sidecar_paths(jobs_dir, job.id, job.format)
    shard_files = [{"name": target.name, "indices": list(chunk_bounds(shard, job.shard_size, job.n))}
                   for shard, target in enumerate(targets)]
    write_text_atomic(provenance_path, _provenance_text(job, 0, job.n, None, files=shard_files))
    digests = {path: sha256_file(path) for path in [*targets, provenance_path]}
    write_text_atomic(checksums_path, checksums_text({path.name: digest for path, digest in digests.items()}))
    return digests | {checksums_path: sha256_file(checksums_path)}


def assemble(jobs_dir: Path, job: JobSpec) -> dict[Path, str]:
    """The result files of a job whose chunks are all on disk, each with its sha256, in download order: one npz,
    the png job's tar shards, or the webdataset job's shards, provenance.json and SHA256SUMS."""
    paths = [chunk_path(jobs_dir, job.id, chunk) for chunk in range(job.chunks)]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise AssemblyError(f"chunk files missing: {', '.join(missing[:5])}")
    targets = result_paths(jobs_dir, job.id, job.format, job.shards)
    if job.format == "webdataset":
        return _write_webdataset(jobs_dir, targets, paths, job)
    if job.format == "npz":
        with atomic_path(targets[0]) as tmp:
            _write_npz(tmp, paths, job)
    else:
        _write_tars(targets, paths, job)
    return {path: sha256_file(path) for path in targets}


def load_spec(client: redis.Redis, job_id: str) -> JobSpec | None:
    """The job's spec while the job is active; None once it has ended or is gone (cancelled, failed, expired)."""
    state, spec = client.hmget(job_key(job_id), ["state", "spec"])
    return JobSpec.from_json(spec) if state in ACTIVE_STATES and spec else None


def run_chunk(client: redis.Redis, models: LoadedModels, settings: Settings, metrics: WorkerMetrics,
              task: ChunkTask) -> None:
    """Render one chunk unless its job has ended or the chunk is on disk already, retrying a chunk that raises
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
            done = _render_with_retries(client, models, settings, metrics, job, task.chunk)
        if done == job.chunks:
            _assemble_once(client, settings, job)
    finally:
        request_id.reset(token)


def _render_with_retries(client: redis.Redis, models: LoadedModels, settings: Settings, metrics: WorkerMetrics,
                         job: JobSpec, chunk: int) -> int | None:
    """Chunks done after rendering `chunk`; None when the job ended meanwhile or failed here."""
    for attempt in range(1, settings.chunk_attempts + 1):
        try:
            started = time.perf_counter()
            model = models.get(job.family, job.version, job.manifest_sha256)
            arrays = render_chunk_arrays(model, job, chunk, settings.batch_size)
            metrics.rendered(model, "chunk", len(arrays["images"]), time.perf_counter() - started)
            write_chunk(chunk_path(settings.jobs_dir, job.id, chunk), arrays)
            logger.info("job %s chunk %d: %d samples rendered", job.id, chunk, len(arrays["images"]))
            break
        except Exception as exc:
            if attempt < settings.chunk_attempts:
                logger.warning("job %s chunk %d failed (try %d of %d), retrying: %s", job.id, chunk, attempt,
                               settings.chunk_attempts, exc)
                time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
                continue
            logger.exception("job %s chunk %d failed %d times; the job fails", job.id, chunk, attempt)
            first, stop = chunk_bounds(chunk, job.chunk_size, job.n)
            error = (f"chunk {chunk} (samples {first}..{stop - 1}) failed {attempt} times: "
                     f"{type(exc).__name__}: {exc}")
            if client.eval(*end_args(job.id, FAILED, error=error)):
                client.hincrby(STATS_KEY, "jobs_failed", 1)
            discard_chunks(settings.jobs_dir, job.id)
            return None
    done = client.eval(*chunk_done_args(job.id, chunk))
    if done < 0:
        # Ended while this chunk rendered: whoever ended the job may have cleared the chunks before it landed.
        discard_chunks(settings.jobs_dir, job.id)
        return None
    client.hincrby(STATS_KEY, "images_generated", len(arrays["images"]))
    return done


def _assemble_once(client: redis.Redis, settings: Settings, job: JobSpec) -> None:
    """Assemble under a lock that lives while this worker does: it expires within the visibility timeout of
    the worker's death, and the redelivered chunk task then finds it free."""
    lock = client.lock(job_lock_key(job.id), timeout=settings.visibility_timeout_s, blocking=False)
    if not lock.acquire():
        return
    held = threading.Event()
    keeper = threading.Thread(target=_keep_lock, args=(lock, held, settings.visibility_timeout_s / 3), daemon=True)
    keeper.start()
    try:
        if client.hget(job_key(job.id), "state") not in ACTIVE_STATES:
            return
        results = assemble(settings.jobs_dir, job)
        files = [{"name": path.name, "bytes": path.stat().st_size, "sha256": digest}
                 for path, digest in results.items()]
        size = sum(item["bytes"] for item in files)
        if client.eval(*end_args(job.id, SUCCEEDED, result_bytes=str(size), files=files_field(files))):
            client.hincrby(STATS_KEY, "jobs_succeeded", 1)
        elif client.hget(job_key(job.id), "state") == CANCELLED:  # no result may appear for a cancelled job
            for path in results:
                path.unlink(missing_ok=True)
        discard_chunks(settings.jobs_dir, job.id)
    finally:
        held.set()
        keeper.join()
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass  # expired after all; the state transition above already guards against a second result


def _keep_lock(lock, released: threading.Event, period: float) -> None:
    while not released.wait(period):
        try:
            lock.reacquire()
        except redis.exceptions.RedisError:
            return
