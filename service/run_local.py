"""`make run`: Redis (started only if none answers), one Celery worker and the gateway on localhost.

Prints the URL once the worker has loaded the default model; Ctrl-C stops everything it started (the
children run in their own sessions, so the terminal's Ctrl-C reaches only this supervisor, which stops
them in order). The process helpers here are the ones the tests use to start real servers.
Usage: python -m service.run_local [--host 127.0.0.1] [--port 8000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, IO
from urllib.error import URLError
from urllib.parse import urlsplit
from urllib.request import urlopen

import redis

from core.manifest import ManifestError, latest_version
from core.messages import QUEUES
from core.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent


class StartupError(RuntimeError):
    """A process did not come up; the message says which and where its log is."""


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def service_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of child processes: this one's, the repository importable, plus `overrides`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(overrides or {})
    return env


def start_redis(port: int, log: IO) -> subprocess.Popen:
    """A throw-away Redis on 127.0.0.1 (no persistence): broker, results and cache for local runs and tests."""
    if not shutil.which("redis-server"):
        raise StartupError("redis-server is not installed: `apt-get install redis-server`, or point "
                           "SKDCGN_REDIS_URL at a running Redis")
    return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_worker(env: dict[str, str], log: IO, name: str = "worker1") -> subprocess.Popen:
    """One Celery worker process (solo pool: one process per GPU), interactive queue polled first."""
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--pool", "solo", "--concurrency", "1",
         "--queues", ",".join(QUEUES), "--hostname", f"{name}@%h", "--without-gossip",
         "--without-mingle", "--loglevel", "info"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def start_gateway(host: str, port: int, env: dict[str, str], log: IO) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service", "--host", host, "--port", str(port)],
                            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def http_status(url: str) -> int | None:
    try:
        with urlopen(url, timeout=2) as response:
            return response.status
    except URLError as exc:
        return getattr(exc, "code", None)
    except OSError:
        return None


def wait_until(condition: Callable[[], bool], timeout: float, what: str, processes: dict[str, subprocess.Popen]) -> None:
    """Poll `condition`; fail early, naming the process, if one of `processes` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for name, process in processes.items():
            if process.poll() is not None:
                raise StartupError(f"{name} exited with code {process.returncode} while waiting for {what}")
        time.sleep(0.1)
    raise StartupError(f"timed out after {timeout:g} s waiting for {what}")


def stop(processes: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM (a Celery worker finishes its current task), then SIGKILL whatever is still running."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.run_local", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--logs", default="runs/service", help="folder for the Redis, worker and gateway logs")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    try:
        latest_version(settings.models_dir, settings.default_model)
    except ManifestError as exc:
        print(f"error: {exc}. Train and promote a model (README), or set SKDCGN_MODELS_DIR.", file=sys.stderr)
        return 2
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen] = []
    # Installed explicitly: a shell that starts us in the background leaves SIGINT ignored. `kill` (SIGTERM)
    # stops the children as cleanly as Ctrl-C.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        watched = {}
        if not redis_answers(settings.redis_url):
            location = urlsplit(settings.redis_url)
            if location.hostname not in ("127.0.0.1", "localhost"):
                raise StartupError(f"no Redis answers at {settings.redis_url}")
            watched["redis"] = start_redis(location.port or 6379, open(logs / "redis.log", "ab"))
            started.append(watched["redis"])
            wait_until(lambda: redis_answers(settings.redis_url), 10, "Redis", watched)
        env = service_env()
        watched["worker"] = start_worker(env, open(logs / "worker.log", "ab"))
        watched["gateway"] = start_gateway(args.host, args.port, env, open(logs / "gateway.log", "ab"))
        started += [watched["worker"], watched["gateway"]]
        url = f"http://{args.host}:{args.port}"
        wait_until(lambda: http_status(f"{url}/readyz") == 200, 120, "the worker to load the model", watched)
        print(f"SKDCGN service ready at {url} (API docs: {url}/docs; logs in {logs}/). Ctrl-C stops it.", flush=True)
        while all(process.poll() is None for process in watched.values()):
            time.sleep(0.5)
        failed = next(name for name, process in watched.items() if process.poll() is not None)
        raise StartupError(f"{failed} exited with code {watched[failed].returncode}; see {logs}/{failed}.log")
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        stop(list(reversed(started)))


if __name__ == "__main__":
    sys.exit(main())
