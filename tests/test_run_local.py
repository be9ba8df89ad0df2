"""`python -m service.run_local` (what `make run` starts) supervises its children: real processes on 127.0.0.1.

A SIGKILLed worker is restarted while the gateway and Redis stay the same processes; SIGTERM to the process
group (as `kill -TERM -<pgid>` of `make run` sends, followed by the SIGTERM that make forwards) stops every
child within 10 s.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.settings import Settings
from service import run_local
from service.run_local import Supervisor, free_port, service_env, start_redis, stop
from tests.model_helpers import copy_models
from tests.paths import REPO

STARTUP_TIMEOUT_S = 60
RESTART_TIMEOUT_S = 40
STOP_TIMEOUT_S = 10

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")


def parent_of(pid: int) -> int | None:
    """The parent pid of a live (non-zombie) process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return None if state in ("Z", "X") else int(ppid)


def wait_for(check, timeout: float, what: str, supervisor: subprocess.Popen, output: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if supervisor.poll() is not None:
            raise AssertionError(f"run_local exited with {supervisor.returncode} while waiting for {what}:\n"
                                 f"{output.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{output.read_text()}")


def started_pids(text: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"^(\w+) started \(pid (\d+)", text, re.MULTILINE)}


@pytest.mark.timeout(120)
def test_run_local_restarts_a_killed_worker_and_stops_everything_on_sigterm(tmp_path):
    models = copy_models(tmp_path / "models")
    logs, output = tmp_path / "logs", tmp_path / "run_local.out"
    port = free_port()
    env = service_env({
        "SKDCGN_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "SKDCGN_MODELS_DIR": str(models),
        "SKDCGN_JOBS_DIR": str(tmp_path / "data" / "jobs"),
        "SKDCGN_ORT_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    with open(output, "wb") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "service.run_local", "--port", str(port), "--logs", str(logs)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    children: dict[str, int] = {}
    try:
        wait_for(lambda: "ready at" in output.read_text(), STARTUP_TIMEOUT_S, "ready", supervisor, output)
        children = started_pids(output.read_text())
        assert set(children) == {"redis", "cache", "worker1", "gateway"}, output.read_text()
        for name, pid in children.items():
            assert parent_of(pid) == supervisor.pid, f"{name} (pid {pid}) is not a child of run_local"

        old_worker = children["worker1"]
        os.kill(old_worker, signal.SIGKILL)
        restarted = wait_for(lambda: re.search(r"^worker1 restarted \(pid (\d+)\)", output.read_text(), re.MULTILINE),
                             RESTART_TIMEOUT_S, "the worker's restart", supervisor, output)
        new_worker = int(restarted.group(1))
        children["worker1 (restarted)"] = new_worker
        assert new_worker != old_worker
        assert f"worker1 (pid {old_worker}) exited with code -9; restarting it in" in output.read_text()
        assert parent_of(new_worker) == supervisor.pid

        def ready_with_new_worker() -> bool:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            except httpx.HTTPError:
                return False
            return response.status_code == 200 and any(w["pid"] == new_worker for w in response.json()["workers"])

        wait_for(ready_with_new_worker, RESTART_TIMEOUT_S, "/readyz 200 from the restarted worker", supervisor, output)
        for name in ("redis", "cache", "gateway"):
            assert parent_of(children[name]) == supervisor.pid, f"{name} did not survive the worker's death"

        # The whole process group, then a second SIGTERM during the shutdown (what make forwards to its child).
        stopping_at = time.monotonic()
        os.killpg(supervisor.pid, signal.SIGTERM)
        time.sleep(0.2)
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=STOP_TIMEOUT_S) == 0, output.read_text()
        left = [name for name, pid in children.items() if parent_of(pid) is not None]
        elapsed = time.monotonic() - stopping_at
        assert not left, f"still running after SIGTERM: {left}\n{output.read_text()}"
        assert elapsed < STOP_TIMEOUT_S
        assert "stopping (SIGTERM)" in output.read_text()
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        for pid in list(children.values()) + list(started_pids(output.read_text()).values()):
            if parent_of(pid) is not None:
                os.kill(pid, signal.SIGKILL)


def test_the_cache_gets_a_bounded_redis_of_its_own_beside_a_running_broker(tmp_path, monkeypatch, capsys):
    """A broker Redis already answers (as on these machines), and evicts: run_local still starts a cache Redis of
    its own, bounded by SKDCGN_CACHE_MAX_MEMORY with allkeys-lru, and warns that the broker may evict job records."""
    import redis

    broker_port = free_port()
    with open(tmp_path / "broker.log", "wb") as log:
        broker = start_redis(broker_port, log, max_memory="64mb")  # allkeys-lru: what a broker must not run
    monkeypatch.delenv("SKDCGN_CACHE_URL", raising=False)
    settings = Settings(redis_url=f"redis://127.0.0.1:{broker_port}/0", cache_max_memory="3mb")
    supervisor = Supervisor("127.0.0.1", 0, 1, tmp_path, settings)
    try:
        run_local.wait_until(lambda: run_local.redis_answers(settings.redis_url), 10, "the broker", {})
        supervisor.start_redis_servers()
        assert set(supervisor.fatal) == {"cache"}  # the broker answered: only the cache was started
        cache_url = supervisor.env["SKDCGN_CACHE_URL"]
        assert cache_url != settings.redis_url and supervisor.settings.cache_url == cache_url
        config = redis.Redis.from_url(cache_url, decode_responses=True).config_get("maxmemory*")
        assert config["maxmemory"] == str(3 << 20) and config["maxmemory-policy"] == "allkeys-lru"
        out = capsys.readouterr().out
        assert "maxmemory 3mb, allkeys-lru" in out
        assert "warning: the broker Redis evicts keys (maxmemory-policy allkeys-lru)" in out
        assert "shares the broker" not in out
    finally:
        supervisor.shutdown()
        stop([broker])


class FakeProcess:
    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        return self.returncode


def test_a_crash_looping_worker_is_restarted_with_a_bounded_backoff(tmp_path, monkeypatch, capsys):
    pids = iter(range(1000, 2000))
    monkeypatch.setattr(run_local, "start_worker", lambda env, log, name: FakeProcess(next(pids)))
    supervisor = Supervisor("127.0.0.1", 0, 2, tmp_path, Settings())
    assert [w.name for w in supervisor.workers] == ["worker1", "worker2"]
    assert [w.log.name for w in supervisor.workers] == ["worker1.log", "worker2.log"]
    worker = supervisor.workers[0]
    supervisor.start_worker(worker)
    supervisor.start_worker(supervisor.workers[1])
    delays = []
    for _ in range(8):
        worker.process.returncode = 1
        supervisor.supervise_workers()
        assert worker.process is None
        delays.append(round(worker.restart_at - time.monotonic()))
        worker.restart_at = 0  # due now
        supervisor.supervise_workers()
        assert worker.process is not None
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    worker.started_at -= run_local.STABLE_AFTER_S  # up long enough: the backoff starts over
    worker.process.returncode = -9
    supervisor.supervise_workers()
    assert round(worker.restart_at - time.monotonic()) == 1
    assert supervisor.workers[1].process.pid == 1001  # the other worker is left alone
    out = capsys.readouterr().out
    assert "worker1 (pid 1000) exited with code 1; restarting it in 1 s" in out
    assert "worker1 restarted (pid 1002)" in out
