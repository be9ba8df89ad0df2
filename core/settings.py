"""Every SKDCGN_* environment variable, read here and nowhere else, each with one default.

`Paths` are the folders the whole project uses (model repository, training runs, job results, MNIST, the
download cache, ../shared); `Settings` adds what the gateway and the workers must agree on (Redis, limits,
job chunking). Both sides read the same variables, so they agree as long as they share one environment.
`ClientSettings` is the client's and the `skdcgn` CLI's (the service URL and an API key).
Imports nothing heavy: the gateway, the workers and the client all import it.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "SKDCGN_"
REPO_ROOT = Path(__file__).resolve().parents[1]
# SKDCGN_DATA_DIR meant the MNIST root to training and the job-results root to the service; each meaning has
# its own variable now, and the old one keeps working (with a warning) until the next release.
DEPRECATED_DATA_DIR = "DATA_DIR"


class SettingsError(ValueError):
    """An SKDCGN_* variable holds a value the service cannot use."""


def _env(name: str, default: str) -> str:
    return os.environ.get(PREFIX + name, default)


def _flag(name: str, default: bool) -> bool:
    raw = _env(name, "1" if default else "0").strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not a flag: use 1 or 0")
    return raw in ("1", "true", "yes")


def _deprecated_data_dir(replacement: str) -> str | None:
    value = os.environ.get(PREFIX + DEPRECATED_DATA_DIR)
    if value:
        warnings.warn(f"{PREFIX}{DEPRECATED_DATA_DIR} is deprecated and will be removed in the next release: "
                      f"set {PREFIX}{replacement} instead", FutureWarning, stacklevel=3)
    return value


@dataclass(frozen=True)
class Paths:
    models_dir: Path = Path("models")  # the model repository: <family>/<version>/ and <family>/LATEST
    runs_dir: Path = Path("runs")  # distillation work folders, sample banks, service logs
    jobs_dir: Path = Path("data") / "jobs"  # dataset-job outputs, shared by the gateway and the workers
    mnist_dir: Path = Path("~/.cache/skdcgn/data").expanduser()  # MNIST IDX files (or <dir>/mnist/)
    cache_dir: Path = Path("~/.cache/skdcgn").expanduser()  # downloaded teachers
    shared_dir: Path = REPO_ROOT.parent / "shared"  # the official teachers, t10k and textures beside the checkout

    @classmethod
    def from_env(cls) -> "Paths":
        legacy = _deprecated_data_dir("MNIST_DIR / SKDCGN_JOBS_DIR")
        return cls(
            models_dir=Path(_env("MODELS_DIR", str(cls.models_dir))),
            runs_dir=Path(_env("RUNS_DIR", str(cls.runs_dir))),
            jobs_dir=Path(_env("JOBS_DIR", str(Path(legacy) / "jobs" if legacy else cls.jobs_dir))),
            mnist_dir=Path(_env("MNIST_DIR", legacy or str(cls.mnist_dir))).expanduser(),
            cache_dir=Path(_env("CACHE", str(cls.cache_dir))).expanduser(),
            shared_dir=Path(_env("SHARED", str(cls.shared_dir))),
        )


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = _env(name, default).strip().lower()
    if raw not in choices:
        raise SettingsError(f"{PREFIX}{name}={raw!r}: use one of {', '.join(choices)}")
    return raw


def _number(name: str, default, kind=int, minimum=None):
    raw = _env(name, str(default))
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not a valid {kind.__name__}") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{PREFIX}{name}={raw!r} must be at least {minimum}")
    return value


def _memory(name: str, default: str) -> str:
    raw = _env(name, default).strip().lower()
    if not re.fullmatch(r"[1-9][0-9]*(b|kb|mb|gb)?", raw):
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not a memory size: use e.g. 256mb or 2gb")
    return raw


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The batch cache; in production a separate Redis with allkeys-lru so eviction never touches broker keys.
    cache_url: str = "redis://127.0.0.1:6379/0"
    # The bound of the cache Redis `make run` starts when SKDCGN_CACHE_URL is unset (redis-server's maxmemory).
    cache_max_memory: str = "256mb"
    paths: Paths = field(default_factory=Paths)
    default_model: str = "double_colored_mnist"
    max_n: int = 64  # images per synchronous request
    max_job_n: int = 1_000_000
    max_body_bytes: int = 2 << 20  # request bodies: explicit z for max_n samples of a 128-d noise model fits
    max_active_jobs_per_key: int = 8  # with api_keys: queued or running jobs per key before POST /jobs answers 429
    job_create_rate: int = 60  # jobs one API key (without keys: all clients together) may create a minute; more: 429
    queue_bound: int = 64  # interactive tasks waiting before the gateway answers 429
    job_queue_bound: int = 10_000  # job chunks waiting before POST /jobs answers 429
    sync_timeout_s: float = 30.0
    cache_ttl_s: int = 3600
    cache_max_entry_bytes: int = 4 << 20
    api_keys: frozenset[str] = field(default_factory=frozenset)
    api_keys_for_generation: bool = False  # with api_keys set: /counterfactual and /generate need a key too
    # A task unacknowledged this long (its worker died) goes back to its queue: chunks are sized to take a few
    # seconds, far below it, so a killed worker's chunk is redone within a minute, with no setting changed.
    visibility_timeout_s: int = 30
    job_chunk_size: int = 1000  # samples per chunk at 32×32; a larger image size gets proportionally fewer
    chunk_attempts: int = 3  # tries of a chunk that raises (with backoff) before its job fails
    batch_window_ms: float = 1.0  # how long a miss waits for others under load (1 ms beat 2, 4, 8 at 32 clients)
    max_batch_samples: int = 256  # images per batched render task
    max_in_flight: int = 256  # requests one gateway process serves at once; more are answered 429
    redis_timeout_s: float = 1.0  # every non-blocking Redis call and the health probe: Redis frozen → 503 fast
    job_shard_size: int = 100_000  # samples per tar shard of a png job's result
    job_retention_s: float = 7 * 24 * 3600.0  # an ended job's record and files live this long after it ended
    cleanup_interval_s: float = 300.0  # how often the gateway removes expired jobs
    batch_size: int = 256  # samples per onnxruntime call inside a job chunk
    heartbeat_ttl_s: float = 10.0
    # onnxruntime intra-op threads per worker process (0 lets onnxruntime decide): one suits small, shared CPUs.
    ort_threads: int = 1
    models_loaded_max: int = 3  # versions a worker keeps loaded (LRU)
    log_format: str = "text"  # or "json": one object per line, with the request id
    worker_metrics_port: int = 9101  # each worker's Prometheus endpoint (0: none; a busy port is logged, not fatal)
    require_gpu: bool = False  # a worker refuses to start unless onnxruntime's CUDA provider runs (GPU workers)

    @classmethod
    def from_env(cls) -> "Settings":
        redis_url = _env("REDIS_URL", cls.redis_url)
        return cls(
            redis_url=redis_url,
            cache_url=_env("CACHE_URL", redis_url),
            cache_max_memory=_memory("CACHE_MAX_MEMORY", cls.cache_max_memory),
            paths=Paths.from_env(),
            default_model=_env("DEFAULT_MODEL", cls.default_model),
            max_n=_number("MAX_N", cls.max_n, minimum=1),
            max_job_n=_number("MAX_JOB_N", cls.max_job_n, minimum=1),
            max_body_bytes=_number("MAX_BODY_BYTES", cls.max_body_bytes, minimum=1),
            max_active_jobs_per_key=_number("MAX_ACTIVE_JOBS_PER_KEY", cls.max_active_jobs_per_key, minimum=1),
            job_create_rate=_number("JOB_CREATE_RATE", cls.job_create_rate, minimum=1),
            queue_bound=_number("QUEUE_BOUND", cls.queue_bound, minimum=0),
            job_queue_bound=_number("JOB_QUEUE_BOUND", cls.job_queue_bound, minimum=0),
            sync_timeout_s=_number("SYNC_TIMEOUT_S", cls.sync_timeout_s, float, minimum=0.1),
            cache_ttl_s=_number("CACHE_TTL_S", cls.cache_ttl_s, minimum=0),
            cache_max_entry_bytes=_number("CACHE_MAX_ENTRY_BYTES", cls.cache_max_entry_bytes, minimum=0),
            api_keys=frozenset(key.strip() for key in _env("API_KEYS", "").split(",") if key.strip()),
            api_keys_for_generation=_flag("API_KEYS_FOR_GENERATION", cls.api_keys_for_generation),
            visibility_timeout_s=_number("VISIBILITY_TIMEOUT_S", cls.visibility_timeout_s, minimum=1),
            job_chunk_size=_number("JOB_CHUNK_SIZE", cls.job_chunk_size, minimum=1),
            chunk_attempts=_number("CHUNK_ATTEMPTS", cls.chunk_attempts, minimum=1),
            batch_window_ms=_number("BATCH_WINDOW_MS", cls.batch_window_ms, float, minimum=0.0),
            max_batch_samples=_number("MAX_BATCH_SAMPLES", cls.max_batch_samples, minimum=1),
            max_in_flight=_number("MAX_IN_FLIGHT", cls.max_in_flight, minimum=1),
            redis_timeout_s=_number("REDIS_TIMEOUT_S", cls.redis_timeout_s, float, minimum=0.05),
            job_shard_size=_number("JOB_SHARD_SIZE", cls.job_shard_size, minimum=1),
            job_retention_s=_number("JOB_RETENTION_S", cls.job_retention_s, float, minimum=0.1),
            cleanup_interval_s=_number("CLEANUP_INTERVAL_S", cls.cleanup_interval_s, float, minimum=0.1),
            batch_size=_number("BATCH_SIZE", cls.batch_size, minimum=1),
            heartbeat_ttl_s=_number("HEARTBEAT_TTL_S", cls.heartbeat_ttl_s, float, minimum=1.0),
            ort_threads=_number("ORT_THREADS", cls.ort_threads, minimum=0),
            models_loaded_max=_number("MODELS_LOADED_MAX", cls.models_loaded_max, minimum=1),
            log_format=_choice("LOG_FORMAT", cls.log_format, ("text", "json")),
            worker_metrics_port=_number("WORKER_METRICS_PORT", cls.worker_metrics_port, minimum=0),
            require_gpu=_flag("REQUIRE_GPU", cls.require_gpu),
        )

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

    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None

    @classmethod
    def from_env(cls) -> "ClientSettings":
        url = _env("URL", cls.url).strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise SettingsError(f"{PREFIX}URL={url!r} is not an http:// or https:// URL")
        return cls(url=url, api_key=_env("API_KEY", "").strip() or None)
