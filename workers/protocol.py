"""What the gateway and the workers agree on: queue and task names, Redis keys, job states and transitions.

Kept free of onnxruntime so the gateway can import it. Every key lives under `skdcgn:` in the broker
Redis (noeviction); only batch-cache keys (`skdcgn:cache:`) go to the cache Redis, which may evict.
"""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

INTERACTIVE_QUEUE = "interactive"
JOBS_QUEUE = "jobs"
RENDER_TASK = "workers.tasks.render"
CHUNK_TASK = "workers.tasks.render_chunk"

CACHE_PREFIX = "skdcgn:cache:"
WORKER_PREFIX = "skdcgn:worker:"
STATS_KEY = "skdcgn:stats"

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
ACTIVE_STATES = (QUEUED, RUNNING)
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex
RESULT_NAMES = {"npz": "result.npz", "png": "result.tar"}  # job format -> result file

# Sets fields of a job hash only if its state is one of the allowed ones; returns 1 when it did.
# KEYS[1] the job hash; ARGV[1] how many allowed states follow; then the states; then field, value pairs.
TRANSITION_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'state')
local allowed = tonumber(ARGV[1])
for i = 2, allowed + 1 do
  if current == ARGV[i] then
    for j = allowed + 2, #ARGV, 2 do
      redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
    end
    return 1
  end
end
return 0
"""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def reply_key(task_id: str) -> str:
    """The list a worker pushes an interactive task's answer to; the gateway waits on it with BLPOP."""
    return f"skdcgn:reply:{task_id}"


def job_key(job_id: str) -> str:
    return f"skdcgn:job:{job_id}"


def job_chunks_key(job_id: str) -> str:
    """The set of chunk indices whose output is on disk: progress, and the trigger for assembly."""
    return f"skdcgn:job:{job_id}:chunks"


def job_lock_key(job_id: str) -> str:
    return f"skdcgn:job:{job_id}:assemble"


def chunk_task_id(job_id: str, chunk: int) -> str:
    """Deterministic, so cancelling can revoke every chunk without storing their ids."""
    return f"{job_id}-{chunk:06d}"


def transition_args(job_id: str, allowed: tuple[str, ...], fields: dict[str, str]) -> tuple:
    """Arguments for `client.eval(*args)` (sync or asyncio client) running TRANSITION_SCRIPT."""
    pairs = [item for name, value in fields.items() for item in (name, str(value))]
    return (TRANSITION_SCRIPT, 1, job_key(job_id), len(allowed), *allowed, *pairs)


def chunk_count(total: int, chunk_size: int) -> int:
    return -(-total // chunk_size)


def chunk_bounds(chunk: int, chunk_size: int, total: int) -> tuple[int, int]:
    start = chunk * chunk_size
    return start, min(start + chunk_size, total)


def done_samples(done_chunks: int, last_chunk_done: bool, chunk_size: int, total: int) -> int:
    """Samples on disk, from the count of finished chunks and whether the (shorter) last one is among them."""
    if not done_chunks:
        return 0
    last_size = total - (chunk_count(total, chunk_size) - 1) * chunk_size
    return (done_chunks - 1) * chunk_size + (last_size if last_chunk_done else chunk_size)


def job_dir(data_dir: Path, job_id: str) -> Path:
    """A job's folder under the data directory; the id is checked first so no path can escape it."""
    if not JOB_ID_PATTERN.match(job_id):
        raise ValueError(f"invalid job id {job_id!r}: job ids are 32 lowercase hex digits")
    return Path(data_dir) / "jobs" / job_id


def result_path(data_dir: Path, job_id: str, fmt: str) -> Path:
    return job_dir(data_dir, job_id) / RESULT_NAMES[fmt]
