"""Real servers for the service tests: redis-server, Celery worker processes and uvicorn, on 127.0.0.1.

Every stack gets its own Redis on a free port, its own data directory and logs, and the model repository
it is given (the fixtures give it a copy), so tests may stop Redis or kill workers without touching
anything shared.
"""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import redis

from service.run_local import (
    free_port, http_status, redis_answers, service_env, start_gateway, start_redis, start_worker, stop, wait_until,
)

STARTUP_TIMEOUT_S = 60


class ServiceStack:
    """One Redis, its workers and gateways, all started and stopped by the tests."""

    def __init__(self, root: Path, models_dir: Path, **settings: str):
        self.root, self.models_dir = root, models_dir
        self.redis_port = free_port()
        self.env = service_env({
            "SKDCGN_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "SKDCGN_MODELS_DIR": str(models_dir),
            "SKDCGN_JOBS_DIR": str(root / "data" / "jobs"),
            "SKDCGN_ORT_THREADS": "1",
            "SKDCGN_WORKER_METRICS_PORT": "0",  # no fixed port shared by every test's workers
            **{f"SKDCGN_{name.upper()}": str(value) for name, value in settings.items()},
        })
        self.redis_process: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.gateways: dict[str, subprocess.Popen] = {}  # url -> process
        self.url = ""

    def log(self, name: str):
        return open(self.root / f"{name}.log", "ab")

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["SKDCGN_REDIS_URL"], decode_responses=True, socket_timeout=5)

    def start_redis(self) -> None:
        self.redis_process = start_redis(self.redis_port, self.log("redis"))
        wait_until(lambda: redis_answers(self.env["SKDCGN_REDIS_URL"]), 10, "Redis", {"redis": self.redis_process})

    def stop_redis(self) -> None:
        stop([self.redis_process])

    def start_worker(self, name: str = "worker1", **settings: str) -> subprocess.Popen:
        """A worker process; `settings` (SKDCGN_<NAME> values) are its own, e.g. a private jobs_dir."""
        env = self.env | {f"SKDCGN_{key.upper()}": str(value) for key, value in settings.items()}
        self.workers[name] = start_worker(env, self.log(name), name)
        return self.workers[name]

    def kill_worker(self, name: str = "worker1") -> None:
        """SIGKILL: no shutdown, no acknowledgement, exactly as if the machine died."""
        process = self.workers.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def start_gateway(self, **settings: str) -> str:
        port = free_port()
        env = self.env | {f"SKDCGN_{name.upper()}": str(value) for name, value in settings.items()}
        process = start_gateway("127.0.0.1", port, env, self.log(f"gateway{len(self.gateways)}"))
        url = f"http://127.0.0.1:{port}"
        self.gateways[url] = process
        wait_until(lambda: http_status(f"{url}/healthz") == 200, STARTUP_TIMEOUT_S, "the gateway", {"gateway": process})
        return url

    def stop_gateway(self, url: str) -> None:
        stop([self.gateways.pop(url)])

    def wait_ready(self, url: str) -> None:
        wait_until(lambda: http_status(f"{url}/readyz") == 200, STARTUP_TIMEOUT_S, "a ready worker",
                   {name: process for name, process in self.workers.items()})

    def start(self) -> "ServiceStack":
        self.start_redis()
        self.start_worker()
        self.url = self.start_gateway()
        self.wait_ready(self.url)
        return self

    def __enter__(self) -> "ServiceStack":
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()

    def stop(self) -> None:
        redis_server = [self.redis_process] if self.redis_process else []
        stop(list(self.gateways.values()) + list(self.workers.values()) + redis_server)
