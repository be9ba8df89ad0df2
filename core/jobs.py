"""Dataset jobs as the gateway and the workers both see them: Redis keys, transitions between the states of
core.vocabulary, and file layout.

A job is stored once, as a Redis hash (`skdcgn:job:<id>`) holding its status fields and its `JobSpec` as JSON;
chunk messages name only the job and the chunk. Every state change goes through one Lua script, so a job ends
exactly once and a cancelled job never moves again; a chunk counts as done only while its job is active, so
progress never rises after a cancel, and the move that ends a job folds its progress into the hash and deletes its
chunks set. Every Redis key lives under `skdcgn:` in the broker Redis (noeviction).
Files live in the result store (core.results: a folder, or an S3-compatible bucket): `<id>/chunks/*.npz` while
the job runs, then the result files (`result_file_names`): `result.npz`; or the tar shards `result-<shard>.tar` of
a png or webdataset job, a webdataset job's with `provenance.json` and `SHA256SUMS` beside them. The worker that
assembles a job records every result file's name, size and sha256 in the job hash (`files`, JSON) as the job
succeeds, so clients can verify what they download.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass

from core.vocabulary import ACTIVE_STATES, ENDED_STATES, QUEUED, RUNNING, TAR_FORMATS

PROVENANCE_NAME = "provenance.json"  # a webdataset job's provenance, beside its shards (inside for npz and png)
CHECKSUMS_NAME = "SHA256SUMS"  # a webdataset job's shard and provenance checksums, in `sha256sum -c` format
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex
PUBLIC_OWNER = "public"  # owner of the jobs submitted while no API keys are configured
# Sorted set of ended jobs scored by when they ended (epoch seconds): the retention clock. Running jobs are never in it.
JOBS_ENDED_KEY = "skdcgn:jobs:ended"

# Sets fields of a job hash only if its state is one of the allowed ones, and files the job under JOBS_ENDED_KEY
# when the move ends it; returns 1 when it did. A move that ends the job also folds its progress into the hash
# (`done_chunks`, `last_chunk_done`) and deletes its set of done chunks (KEYS[3], when given): nothing adds to the
# set once the job has ended (CHUNK_DONE_SCRIPT), so an ended job keeps only its hash in Redis besides its index
# entries. KEYS[1] the job hash, KEYS[2] JOBS_ENDED_KEY, KEYS[3] the chunks set; ARGV[1] the job id; ARGV[2] the
# ended-at score ('' when the job goes on); ARGV[3] how many allowed states follow; then the states; then field,
# value pairs.
TRANSITION_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'state')
local allowed = tonumber(ARGV[3])
for i = 4, allowed + 3 do
  if current == ARGV[i] then
    for j = allowed + 4, #ARGV, 2 do
      redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
    end
    if ARGV[2] ~= '' then
      redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
      if KEYS[3] then
        local last = tostring((tonumber(redis.call('HGET', KEYS[1], 'chunks')) or 0) - 1)
        redis.call('HSET', KEYS[1], 'done_chunks', redis.call('SCARD', KEYS[3]),
                   'last_chunk_done', redis.call('SISMEMBER', KEYS[3], last))
        redis.call('DEL', KEYS[3])
      end
    end
    return 1
  end
end
return 0
"""
# Records chunk ARGV[1] as done only while the job (KEYS[1]) is queued or running; returns how many chunks are
# done, or -1 when the job has ended (the chunk's file is then discarded, and progress stays where it was).
CHUNK_DONE_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then
  return -1
end
redis.call('SADD', KEYS[2], ARGV[1])
return redis.call('SCARD', KEYS[2])
"""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def job_key(job_id: str) -> str:
    return f"skdcgn:job:{job_id}"


def jobs_index_key(owner: str) -> str:
    """One owner's jobs, scored by creation time (epoch ms): GET /jobs pages through it, newest first."""
    return f"skdcgn:jobs:owner:{owner}"


def job_chunks_key(job_id: str) -> str:
    """The set of chunk indices whose output is on disk: progress, and the trigger for assembly."""
    return f"skdcgn:job:{job_id}:chunks"


def job_lock_key(job_id: str) -> str:
    return f"skdcgn:job:{job_id}:assemble"


def job_rate_key(owner: str, window: int) -> str:
    """How many jobs `owner` created in minute `window` (epoch seconds // 60): the creation rate limit's counter,
    one key per owner and minute, expiring soon after its minute."""
    return f"skdcgn:jobs:rate:{owner}:{window}"


def owner_of(api_key: str | None) -> str:
    """Jobs are filed under a hash of the API key that submitted them, never the key itself."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else PUBLIC_OWNER


def transition_args(job_id: str, allowed: tuple[str, ...], fields: dict[str, str]) -> tuple:
    """Arguments for `client.eval(*args)` (sync or asyncio client) running TRANSITION_SCRIPT."""
    pairs = [item for name, value in fields.items() for item in (name, str(value))]
    ended = repr(time.time()) if fields.get("state") in ENDED_STATES else ""
    return (TRANSITION_SCRIPT, 3, job_key(job_id), JOBS_ENDED_KEY, job_chunks_key(job_id), job_id, ended,
            len(allowed), *allowed, *pairs)


def start_args(job_id: str) -> tuple:
    """queued → running, stamped."""
    return transition_args(job_id, (QUEUED,), {"state": RUNNING, "started": now_iso()})


def end_args(job_id: str, state: str, **fields: str) -> tuple:
    """An active job → `state` (succeeded, failed or cancelled), stamped; a job that has ended stays as it is."""
    return transition_args(job_id, ACTIVE_STATES, {"state": state, "finished": now_iso(), **fields})


def chunk_done_args(job_id: str, chunk: int) -> tuple:
    """Arguments for `client.eval(*args)` running CHUNK_DONE_SCRIPT."""
    return (CHUNK_DONE_SCRIPT, 2, job_key(job_id), job_chunks_key(job_id), chunk)


def chunk_count(total: int, chunk_size: int) -> int:
    return -(-total // chunk_size)


def chunk_bounds(chunk: int, chunk_size: int, total: int) -> tuple[int, int]:
    start = chunk * chunk_size
    return start, min(start + chunk_size, total)


def recorded_progress(record: dict) -> tuple[int, bool] | None:
    """(done chunks, whether the last one is among them) as the job hash recorded them when the job ended; None for
    a job still active (its chunks set holds them), or one that ended before its hash recorded them."""
    if record.get("done_chunks") is None:
        return None
    return int(record["done_chunks"]), record.get("last_chunk_done") == "1"


def done_samples(done_chunks: int, last_chunk_done: bool, chunk_size: int, total: int) -> int:
    """Samples on disk, from the count of finished chunks and whether the (shorter) last one is among them."""
    if not done_chunks:
        return 0
    last_size = total - (chunk_count(total, chunk_size) - 1) * chunk_size
    return (done_chunks - 1) * chunk_size + (last_size if last_chunk_done else chunk_size)


def shard_count(fmt: str, total: int, shard_size: int) -> int:
    """An npz result is one file; a png or webdataset result is a tar per `shard_size` samples."""
    return chunk_count(total, shard_size) if fmt in TAR_FORMATS else 1


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to render any chunk of a job; stored once, in the job's record."""

    id: str
    family: str
    version: str
    manifest_sha256: str
    n: int
    chunk_size: int
    chunks: int
    shard_size: int
    shards: int
    seed: int
    counterfactuals_per_shape: int
    labels: dict[str, list[int]]  # mechanism -> the labels a sample may draw
    mask: dict[str, float]  # core.compose.MaskModifiers as a dict
    format: str
    created: str
    request: dict  # the request as accepted (labels deduplicated, model, version and seed filled in)
    request_id: str = ""  # of the HTTP request that created the job: the workers' log lines about it carry it

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        return cls(**json.loads(text))


def check_job_id(job_id: str) -> str:
    """The id, checked before it names a folder or a key, so no path can escape the job's own."""
    if not JOB_ID_PATTERN.match(job_id):
        raise ValueError(f"invalid job id {job_id!r}: job ids are 32 lowercase hex digits")
    return job_id


def result_names(fmt: str, shards: int) -> list[str]:
    """The data files of a job's result: result.npz, or its tar shards (`?shard=i` of GET /jobs/{id}/result)."""
    if fmt == "npz":
        return ["result.npz"]
    return [f"result-{shard:05d}.tar" for shard in range(shards)]


def sidecar_names(fmt: str) -> list[str]:
    """Files beside the data files: a webdataset job's provenance.json and SHA256SUMS (the shards hold samples only)."""
    return [PROVENANCE_NAME, CHECKSUMS_NAME] if fmt == "webdataset" else []


def result_file_names(fmt: str, shards: int) -> list[str]:
    """Every file of a job's result, in the order a client downloads them."""
    return result_names(fmt, shards) + sidecar_names(fmt)


def checksums_text(digests: dict[str, str]) -> str:
    """`<sha256>  <name>` lines, as `sha256sum` writes and `sha256sum -c` reads them."""
    return "".join(f"{digest}  {name}\n" for name, digest in digests.items())


def files_field(files: list[dict]) -> str:
    """The job hash's `files` field: [{"name", "bytes", "sha256"}] of every result file, as JSON."""
    return json.dumps([{"name": f["name"], "bytes": int(f["bytes"]), "sha256": f["sha256"]} for f in files],
                      separators=(",", ":"))


def parse_files(text: str | None) -> list[dict] | None:
    """The `files` field of a job hash; None for a job without one (not succeeded, or assembled by an older
    release)."""
    return json.loads(text) if text else None
