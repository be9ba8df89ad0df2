"""Every SKDCGN_* environment variable, read here and nowhere else, each with one default.

`Paths` are the folders the whole project uses (model repository, training runs, job results, MNIST, the
download cache, ../shared); `Settings` adds what the gateway and the workers must agree on (Redis, limits,
job chunking). Both sides read the same variables, so they agree as long as they share one environment.
`ClientSettings` is the client's and the `skdcgn` CLI's (the service URL and an API key).
Each setting is written once, as a dataclass field that names its variable, default and parser (`setting`); one
loop (`read_env`) reads them all. Standard library only: the gateway, the workers and the client all import it.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

PREFIX = "SKDCGN_"
REPO_ROOT = Path(__file__).resolve().parents[1]
# SKDCGN_DATA_DIR meant the MNIST root to training and the job-results root to the service; each meaning has
# its own variable now, and the old one keeps working (with a warning) until the next release.
DEPRECATED_DATA_DIR = "DATA_DIR"


class SettingsError(ValueError):
    """An SKDCGN_* variable holds a value the service cannot use."""


# --- reading one variable: each parser turns a variable's text into a value, or says what is wrong with it -----------

def _text(name: str, raw: str) -> str:
    return raw


def _path(name: str, raw: str) -> Path:
    return Path(raw)


def _home_path(name: str, raw: str) -> Path:
    return Path(raw).expanduser()


def _flag(name: str, raw: str) -> bool:
    raw = raw.strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not a flag: use 1 or 0")
    return raw in ("1", "true", "yes")


def _number(kind: type = int, minimum=None) -> Callable[[str, str], Any]:
    def parse(name: str, raw: str):
        try:
            value = kind(raw)
        except ValueError:
            raise SettingsError(f"{PREFIX}{name}={raw!r} is not a valid {kind.__name__}") from None
        if minimum is not None and value < minimum:
            raise SettingsError(f"{PREFIX}{name}={raw!r} must be at least {minimum}")
        return value
    return parse


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        raw = raw.strip().lower()
        if raw not in choices:
            raise SettingsError(f"{PREFIX}{name}={raw!r}: use one of {', '.join(choices)}")
        return raw
    return parse


def _memory(name: str, raw: str) -> str:
    raw = raw.strip().lower()
    if not re.fullmatch(r"[1-9][0-9]*(b|kb|mb|gb)?", raw):
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not a memory size: use e.g. 256mb or 2gb")
    return raw


def _keys(name: str, raw: str) -> frozenset[str]:
    return frozenset(key.strip() for key in raw.split(",") if key.strip())


def _url(name: str, raw: str) -> str:
    url = raw.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise SettingsError(f"{PREFIX}{name}={url!r} is not an http:// or https:// URL")
    return url


def _optional(name: str, raw: str) -> str | None:
    return raw.strip() or None


# --- declaring a setting once: its field, default, variable and parser in one line -----------------------------------

@dataclass(frozen=True)
class Variable:
    """Where a setting comes from: SKDCGN_<name>, its text turned into the value by `parse`. When the variable is
    unset, the text of SKDCGN_<fallback> stands in (if that is set), else the field's default holds."""

    name: str
    parse: Callable[[str, str], Any] = _text
    fallback: str | None = None


def setting(name: str, default: Any = MISSING, parse: Callable[[str, str], Any] = _text, *,
            default_factory: Any = MISSING, fallback: str | None = None) -> Any:
    """A dataclass field read from SKDCGN_<name> by `from_env` (see `read_env`)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"variable": Variable(name, parse, fallback)})


def read_env(cls, stand_ins: Mapping[str, str] | None = None, **given):
    """An instance of the settings dataclass `cls`: every field declared with `setting` from its variable when that
    is set, else from `stand_ins` (variable name -> text, in place of an unset variable), else its default; `given`
    fills the fields that are not read from one variable."""
    values = {}
    for item in fields(cls):
        variable = item.metadata.get("variable")
        if variable is None:
            continue
        raw = os.environ.get(PREFIX + variable.name)
        if raw is None and variable.fallback:
            raw = os.environ.get(PREFIX + variable.fallback)
        if raw is None and stand_ins:
            raw = stand_ins.get(variable.name)
        if raw is not None:
            values[item.name] = variable.parse(variable.name, raw)
    return cls(**values, **given)


def _deprecated_data_dir(replacement: str) -> str | None:
    value = os.environ.get(PREFIX + DEPRECATED_DATA_DIR)
    if value:
        warnings.warn(f"{PREFIX}{DEPRECATED_DATA_DIR} is deprecated and will be removed in the next release: "
                      f"set {PREFIX}{replacement} instead", FutureWarning, stacklevel=3)
    return value


@dataclass(frozen=True)
class Paths:
    # the model repository: <family>/<version>/ and <family>/LATEST
    models_dir: Path = setting("MODELS_DIR", Path("models"), _path)
    runs_dir: Path = setting("RUNS_DIR", Path("runs"), _path)  # distillation work folders, sample banks, service logs
    # dataset-job outputs, shared by the gateway and the workers
    jobs_dir: Path = setting("JOBS_DIR", Path("data") / "jobs", _path)
    # MNIST IDX files (or <dir>/mnist/)
    mnist_dir: Path = setting("MNIST_DIR", Path("~/.cache/skdcgn/data").expanduser(), _home_path)
    cache_dir: Path = setting("CACHE", Path("~/.cache/skdcgn").expanduser(), _home_path)  # downloaded teachers
    # the official teachers, t10k and textures beside the checkout
    shared_dir: Path = setting("SHARED", REPO_ROOT.parent / "shared", _path)

    @classmethod
    def from_env(cls) -> "Paths":
        legacy = _deprecated_data_dir("MNIST_DIR / SKDCGN_JOBS_DIR")
        return read_env(cls, {"JOBS_DIR": str(Path(legacy) / "jobs"), "MNIST_DIR": legacy} if legacy else None)


@dataclass(frozen=True)
class Settings:
    redis_url: str = setting("REDIS_URL", "redis://127.0.0.1:6379/0")
    # The batch cache; in production a separate Redis with allkeys-lru so eviction never touches broker keys.
    # Unset, it is the broker's (SKDCGN_REDIS_URL).
    cache_url: str = setting("CACHE_URL", "redis://127.0.0.1:6379/0", fallback="REDIS_URL")
    # The bound of the cache Redis `make run` starts when SKDCGN_CACHE_URL is unset (redis-server's maxmemory).
    cache_max_memory: str = setting("CACHE_MAX_MEMORY", "256mb", _memory)
    paths: Paths = field(default_factory=Paths)  # Paths.from_env
    default_model: str = setting("DEFAULT_MODEL", "double_colored_mnist")
    max_n: int = setting("MAX_N", 64, _number(minimum=1))  # images per synchronous request
    max_job_n: int = setting("MAX_JOB_N", 1_000_000, _number(minimum=1))
    # request bodies: explicit z for max_n samples of a 128-d noise model fits
    max_body_bytes: int = setting("MAX_BODY_BYTES", 2 << 20, _number(minimum=1))
    # with api_keys: queued or running jobs per key before POST /jobs answers 429
    max_active_jobs_per_key: int = setting("MAX_ACTIVE_JOBS_PER_KEY", 8, _number(minimum=1))
    # jobs one API key (without keys: all clients together) may create a minute; more: 429
    job_create_rate: int = setting("JOB_CREATE_RATE", 60, _number(minimum=1))
    queue_bound: int = setting("QUEUE_BOUND", 64, _number(minimum=0))  # interactive tasks waiting before 429
    job_queue_bound: int = setting("JOB_QUEUE_BOUND", 10_000, _number(minimum=0))  # job chunks waiting before 429
    sync_timeout_s: float = setting("SYNC_TIMEOUT_S", 30.0, _number(float, minimum=0.1))
    cache_ttl_s: int = setting("CACHE_TTL_S", 3600, _number(minimum=0))
    cache_max_entry_bytes: int = setting("CACHE_MAX_ENTRY_BYTES", 4 << 20, _number(minimum=0))
    api_keys: frozenset[str] = setting("API_KEYS", parse=_keys, default_factory=frozenset)  # comma-separated
    # with api_keys set: /counterfactual and /generate need a key too
    api_keys_for_generation: bool = setting("API_KEYS_FOR_GENERATION", False, _flag)
    # A task unacknowledged this long (its worker died) goes back to its queue: chunks are sized to take a few
    # seconds, far below it, so a killed worker's chunk is redone within a minute, with no setting changed.
    visibility_timeout_s: int = setting("VISIBILITY_TIMEOUT_S", 30, _number(minimum=1))
    # samples per chunk at 32×32; a larger image size gets proportionally fewer
    job_chunk_size: int = setting("JOB_CHUNK_SIZE", 1000, _number(minimum=1))
    # tries of a chunk that raises (with backoff) before its job fails
    chunk_attempts: int = setting("CHUNK_ATTEMPTS", 3, _number(minimum=1))
    # how long a miss waits for others under load (1 ms beat 2, 4, 8 at 32 clients)
    batch_window_ms: float = setting("BATCH_WINDOW_MS", 1.0, _number(float, minimum=0.0))
    max_batch_samples: int = setting("MAX_BATCH_SAMPLES", 256, _number(minimum=1))  # images per batched render task
    # requests one gateway process serves at once; more are answered 429
    max_in_flight: int = setting("MAX_IN_FLIGHT", 256, _number(minimum=1))
    # every non-blocking Redis call and the health probe: Redis frozen → 503 fast
    redis_timeout_s: float = setting("REDIS_TIMEOUT_S", 1.0, _number(float, minimum=0.05))
    # samples per tar shard of a png job's result
    job_shard_size: int = setting("JOB_SHARD_SIZE", 100_000, _number(minimum=1))
    # where job results live: empty for SKDCGN_JOBS_DIR itself, another folder, or s3://bucket/prefix (an S3-compatible
    # store; endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)
    results_url: str = setting("RESULTS_URL", "")
    # how long the presigned store URLs in a job's status stay valid (0: none; a folder store has none anyway)
    results_url_ttl_s: int = setting("RESULTS_URL_TTL_S", 3600, _number(minimum=0))
    # the store's endpoint as clients reach it, when they reach it under another name than the gateway (compose)
    results_public_endpoint: str | None = setting("RESULTS_PUBLIC_ENDPOINT", None, _optional)
    # an ended job's record and files live this long after it ended
    job_retention_s: float = setting("JOB_RETENTION_S", 7 * 24 * 3600.0, _number(float, minimum=0.1))
    # how often the gateway removes expired jobs
    cleanup_interval_s: float = setting("CLEANUP_INTERVAL_S", 300.0, _number(float, minimum=0.1))
    # samples per onnxruntime call inside a job chunk. 16: among the co-designed students' best batches at one thread
    # on a 2-core CPU (benchmarks.models' "Worker layout": 16–32; at 256 activations spill out of L2); GPUs want more
    batch_size: int = setting("BATCH_SIZE", 16, _number(minimum=1))
    heartbeat_ttl_s: float = setting("HEARTBEAT_TTL_S", 10.0, _number(float, minimum=1.0))
    # onnxruntime intra-op threads per worker process (0 lets onnxruntime decide). One, with one worker per core:
    # a second thread adds little to these small graphs (benchmarks.models, like for like at 1 and 2 threads).
    ort_threads: int = setting("ORT_THREADS", 1, _number(minimum=0))
    models_loaded_max: int = setting("MODELS_LOADED_MAX", 3, _number(minimum=1))  # versions a worker keeps loaded (LRU)
    # or "json": one object per line, with the request id
    log_format: str = setting("LOG_FORMAT", "text", _choice("text", "json"))
    # each worker's Prometheus endpoint (0: none; a busy port is logged, not fatal)
    worker_metrics_port: int = setting("WORKER_METRICS_PORT", 9101, _number(minimum=0))
    # a worker refuses to start unless onnxruntime's CUDA provider runs (GPU workers)
    require_gpu: bool = setting("REQUIRE_GPU", False, _flag)

    @classmethod
    def from_env(cls) -> "Settings":
        return read_env(cls, paths=Paths.from_env())

    @property
    def models_dir(self) -> Path:
        return self.paths.models_dir

    @property
    def jobs_dir(self) -> Path:
        return self.paths.jobs_dir

    def chunk_size_for(self, image_size: int) -> int:
        """Samples per job chunk for a model's image size: about the same seconds of work at any resolution."""
        return max(1, self.job_chunk_size * 32 * 32 // (image_size * image_size))


@dataclass(frozen=True)
class ClientSettings:
    """What the client and the `skdcgn` CLI read: the service's URL and the API key they send (X-API-Key).

    SKDCGN_API_KEY (one key, the client's) is not SKDCGN_API_KEYS (the keys a gateway accepts).
    """

    url: str = setting("URL", "http://127.0.0.1:8000", _url)
    api_key: str | None = setting("API_KEY", None, _optional)

    @classmethod
    def from_env(cls) -> "ClientSettings":
        return read_env(cls)
