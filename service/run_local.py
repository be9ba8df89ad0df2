"""`make run`: Redis (started only if none answers), Celery workers and the gateway on localhost, supervised.

Unless SKDCGN_CACHE_URL names one, a cache Redis of its own is always started (on a free port, bounded by
SKDCGN_CACHE_MAX_MEMORY, allkeys-lru), also when a broker Redis already answers: cache entries never take the
broker's memory, and evicting them never touches queued tasks or job records. A cache URL on this machine where
none answers is started the same way.

Prints the URL once a worker has loaded the default model. A worker that exits is restarted (with a backoff
of 1 s doubling to 30 s while it keeps crashing); the gateway or Redis exiting stops everything. SIGINT
(Ctrl-C), SIGTERM or SIGHUP, to this process or to its whole process group, stops every child within 10 s:
the children run in their own sessions, so signals to the terminal's or `make`'s process group reach only
this supervisor, which stops them all. The process helpers here are the ones the tests use to start real
servers.
Usage: python -m service.run_local [--host 127.0.0.1] [--port 8000] [--workers 1] [--logs runs/service]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import socket
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
from service.redis_memory import memory_warnings

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


def start_redis(port: int, log: IO, max_memory: str | None = None) -> subprocess.Popen:
    """A throw-away Redis on 127.0.0.1 (no persistence): a broker that never evicts, or with `max_memory` a cache
    bounded by it that evicts its least recently used keys."""
    if not shutil.which("redis-server"):
        raise StartupError("redis-server is not installed: `apt-get install redis-server`, or point "
                           "SKDCGN_REDIS_URL at a running Redis")
    memory = ["--maxmemory", max_memory, "--maxmemory-policy", "allkeys-lru"] if max_memory else \
        ["--maxmemory-policy", "noeviction"]
    return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", *memory], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    """SIGTERM all of `processes` at once (a Celery worker finishes its current task), wait up to `timeout`
    seconds in total, then SIGKILL whatever is still running."""
    processes = [process for process in processes if process is not None]
    for process in processes:
        if process.poll() is None:
            try:
                process.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        if process.poll() is None:
            try:
                process.kill()
            except ProcessLookupError:
                pass
            process.wait()


READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 8.0  # SIGTERM to SIGKILL: the whole shutdown stays within 10 s
RESTART_DELAY_S = (1.0, 30.0)  # a worker's first restart delay, doubling up to the second while it crash-loops
STABLE_AFTER_S = 60.0  # a worker up this long is not crash-looping: its next restart waits RESTART_DELAY_S[0] again
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(Exception):
    """A stop signal arrived."""


def say(message: str, stream: IO | None = None) -> None:
    """One line on stdout (or `stream`); a closed terminal or pipe must not break the supervisor."""
    try:
        print(message, file=stream or sys.stdout, flush=True)
    except (OSError, ValueError):
        pass


class Worker:
    """One supervised Celery worker: its process (None while it waits to be restarted) and its backoff."""

    def __init__(self, name: str, log: Path):
        self.name, self.log = name, log
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.restart_at = 0.0
        self.delay = RESTART_DELAY_S[0]


class Supervisor:
    """Starts Redis (when needed), the workers and the gateway; restarts workers; stops everything on a signal.

    The signal handler only records the signal: nothing is interrupted half-way (a Popen, a clean-up), and a
    second signal during the shutdown changes nothing."""

    def __init__(self, host: str, port: int, workers: int, logs: Path, settings: Settings):
        self.host, self.port, self.logs, self.settings = host, port, logs, settings
        self.url = f"http://{host}:{port}"
        self.env = service_env()
        self.workers = [Worker(f"worker{i}", logs / ("worker.log" if workers == 1 else f"worker{i}.log"))
                        for i in range(1, workers + 1)]
        self.fatal: dict[str, subprocess.Popen] = {}  # redis (when started here) and the gateway
        self.signal: int | None = None

    def on_signal(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum

    def check(self) -> None:
        if self.signal is not None:
            raise Stopped
        for name, process in self.fatal.items():
            if process.poll() is not None:
                raise StartupError(f"{name} exited with code {process.returncode}; see {self.logs / name}.log")

    def pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.signal is None and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def children(self) -> list[subprocess.Popen]:
        return [worker.process for worker in self.workers if worker.process] + list(self.fatal.values())

    def start_worker(self, worker: Worker) -> None:
        with open(worker.log, "ab") as log:
            worker.process = start_worker(self.env, log, worker.name)
        worker.started_at = time.monotonic()

    def supervise_workers(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is not None:
                if now - worker.started_at >= STABLE_AFTER_S:
                    worker.delay = RESTART_DELAY_S[0]
                say(f"{worker.name} (pid {worker.process.pid}) exited with code {worker.process.returncode}; "
                    f"restarting it in {worker.delay:g} s (log: {worker.log})")
                worker.process, worker.restart_at = None, now + worker.delay
                worker.delay = min(worker.delay * 2, RESTART_DELAY_S[1])
            elif worker.process is None and now >= worker.restart_at:
                self.start_worker(worker)
                say(f"{worker.name} restarted (pid {worker.process.pid})")

    def ensure_redis(self, name: str, url: str, max_memory: str | None = None) -> None:
        """Start Redis `name` (redis or cache) at `url` unless one answers there, only on this machine, and wait
        until it answers."""
        if redis_answers(url):
            return
        location = urlsplit(url)
        if location.hostname not in ("127.0.0.1", "localhost"):
            raise StartupError(f"no Redis answers at {url}")
        port = location.port or 6379
        with open(self.logs / f"{name}.log", "ab") as log:
            self.fatal[name] = start_redis(port, log, max_memory)
        bound = f", maxmemory {max_memory}, allkeys-lru" if max_memory else ""
        say(f"{name} started (pid {self.fatal[name].pid}, port {port}{bound})")
        deadline = time.monotonic() + 10
        while not redis_answers(url):
            self.check()
            if time.monotonic() > deadline:
                raise StartupError(f"timed out after 10 s waiting for {name}; see {self.logs}/{name}.log")
            self.pause(0.1)

    def start_redis_servers(self) -> None:
        """The broker Redis unless one answers; the cache Redis (always, unless SKDCGN_CACHE_URL names a running
        one); then a warning for each memory setting that puts queued work at risk."""
        self.ensure_redis("redis", self.settings.redis_url)
        if "SKDCGN_CACHE_URL" not in self.env:
            self.env["SKDCGN_CACHE_URL"] = f"redis://127.0.0.1:{free_port()}/0"
            self.settings = dataclasses.replace(self.settings, cache_url=self.env["SKDCGN_CACHE_URL"])
        if self.settings.cache_url != self.settings.redis_url:
            self.ensure_redis("cache", self.settings.cache_url, self.settings.cache_max_memory)
        for warning in memory_warnings(self.settings):
            say(f"warning: {warning}")

    def run(self) -> None:
        self.start_redis_servers()
        for worker in self.workers:
            self.start_worker(worker)
            say(f"{worker.name} started (pid {worker.process.pid})")
        with open(self.logs / "gateway.log", "ab") as log:
            self.fatal["gateway"] = start_gateway(self.host, self.port, self.env, log)
        say(f"gateway started (pid {self.fatal['gateway'].pid})")
        ready_by = time.monotonic() + READY_TIMEOUT_S
        ready = False
        while True:
            self.check()
            self.supervise_workers()
            if not ready:
                if http_status(f"{self.url}/readyz") == 200:
                    ready = True
                    say(f"SKDCGN service ready at {self.url} (API docs: {self.url}/docs; logs in {self.logs}/). "
                        "Ctrl-C stops it.")
                elif time.monotonic() > ready_by:
                    raise StartupError(f"timed out after {READY_TIMEOUT_S:g} s waiting for a worker to load the "
                                       f"model; see {self.workers[0].log}")
            self.pause(0.2 if not ready else 0.5)

    def shutdown(self) -> None:
        stop(self.children(), STOP_TIMEOUT_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.run_local", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes (default 1)")
    parser.add_argument("--logs", default="runs/service", help="folder for the Redis, worker and gateway logs")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    settings = Settings.from_env()
    try:
        latest_version(settings.models_dir, settings.default_model)
    except ManifestError as exc:
        print(f"error: {exc}. Train and promote a model (README), or set SKDCGN_MODELS_DIR.", file=sys.stderr)
        return 2
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(args.host, args.port, args.workers, logs, settings)
    # Installed explicitly (a shell that starts us in the background leaves SIGINT ignored), and they only
    # record the signal: `make` forwards SIGTERM to us when its process group gets one, so a second signal
    # arrives while we clean up, and it must not cut the clean-up short.
    for signum in STOP_SIGNALS:
        signal.signal(signum, supervisor.on_signal)
    try:
        supervisor.run()
    except Stopped:
        say(f"\nstopping ({signal.Signals(supervisor.signal).name}) ...")
        return 0
    except StartupError as exc:
        say(f"error: {exc}; stopping everything", sys.stderr)
        return 1
    finally:
        supervisor.shutdown()


if __name__ == "__main__":
    sys.exit(main())
