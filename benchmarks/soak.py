"""Soak benchmark: the service under mixed `wrk` load for --minutes, measured minute by minute.

Why: probes of ten seconds passed while the service decayed with the state it accumulated (issue 22: 707 → 152
requests/s within four minutes, a cache that could take the broker's memory). Load from benchmarks/wrk/counterfactual.lua (its mixed mode) at
concurrency 32: ~70 % cache hits over 10,000 distinct bodies (each requested once through the service beforehand),
~30 % fresh seeds, and one dataset job a minute submitted from here and polled to its end. wrk runs in one-minute
segments; after each: throughput, p50/p99, non-2xx, gateway and worker RSS, broker and cache Redis memory and keys.
`--faults` adds, mid-soak, a worker `kill -9` (restarted here, or by `make run`'s supervisor with --url) and a 5 s
SIGSTOP of the broker Redis. Outputs, from one result: benchmarks/results/soak[_faults]_<model>.json, a section of
docs/RESULTS.md and docs/soak[_faults]_<model>.png, the targets printed beside the figures. Loopback only.

    python -m benchmarks.soak                                  # 30 minutes against `make run`'s stack, started here
    python -m benchmarks.soak --minutes 2 --faults             # a short fault soak
    python -m benchmarks.soak --url http://127.0.0.1:8000 --cache-url redis://127.0.0.1:PORT/0   # a running service
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import redis

from benchmarks import host
from benchmarks.serving import (
    FINAL_STATES, WRK_SCRIPT, BenchmarkError, check_loopback, request_body, run_job, summarise, warm, wrk_json, wrk_path,
    wrk_version,
)
from core.manifest import ManifestError, latest_version
from core.settings import Settings
from service.run_local import (
    READY_TIMEOUT_S, RESTART_DELAY_S, StartupError, free_port, http_status, redis_answers, service_env, start_gateway,
    start_redis, start_worker, stop, wait_until,
)
from reporting import report
from reporting.plots import save_figure

MINUTES = 30.0
SEGMENT_S = 60  # one wrk run, one sample and one job per segment
CONCURRENCY = 32
DISTINCT = 10_000
HIT_SHARE = 0.7
JOB_N = 5000
REDIS_STOP_S = 5.0
FAULT_AT = (1 / 3, 2 / 3)  # the worker kill and the Redis stop, as fractions of the run (then mid-minute)
MISS_STRIDE = 2 ** 38  # fresh seeds of segment i start at run seed + (i + 1) * stride (wrk threads * 2^32 each)
KEYSPACE_COMMANDS = ("scan", "keys")

# Targets (the issue's), each printed beside its measured value.
STABILITY = 0.9  # throughput of the last window over the first
STABILITY_WINDOW_S = 300  # 5 minutes; runs shorter than 10 minutes compare fifths
RSS_GROWTH_MB = 50.0
# Redis evicts before each command, so a sample may exceed maxmemory by what the command being served allocates.
CACHE_SLACK = 0.01
FAULT_GRACE_S = 10.0  # non-2xx allowed this long after a fault window; 200s expected again by then


class Service:
    """The service under test: started here (what `make run` runs, on free ports: a broker Redis, a cache Redis
    bounded by `cache_max_memory` with allkeys-lru, one Celery worker and the gateway), or found at a URL."""

    def __init__(self, url: str, redis_url: str, cache_url: str, logs: Path | None = None,
                 env: dict[str, str] | None = None):
        self.url, self.redis_url, self.cache_url, self.logs, self.env = url, redis_url, cache_url, logs, env
        self.processes: dict[str, subprocess.Popen] = {}

    @classmethod
    def start(cls, logs: Path, models_dir: str, model: str, cache_max_memory: str, threads: int) -> "Service":
        redis_url, cache_url = (f"redis://127.0.0.1:{free_port()}/0" for _ in range(2))
        env = service_env({"SKDCGN_REDIS_URL": redis_url, "SKDCGN_CACHE_URL": cache_url,
                           "SKDCGN_CACHE_MAX_MEMORY": cache_max_memory, "SKDCGN_DEFAULT_MODEL": model,
                           "SKDCGN_MODELS_DIR": str(Path(models_dir).resolve()), "SKDCGN_ORT_THREADS": str(threads),
                           "SKDCGN_JOBS_DIR": str(logs / "data" / "jobs"), "SKDCGN_WORKER_METRICS_PORT": "0"})
        service = cls("", redis_url, cache_url, logs, env)
        try:
            for name, url, bound in (("redis", redis_url, None), ("cache", cache_url, cache_max_memory)):
                with open(logs / f"{name}.log", "ab") as log:
                    service.processes[name] = start_redis(urlsplit(url).port, log, bound)
                wait_until(lambda url=url: redis_answers(url), 10, name, {name: service.processes[name]})
            service.start_worker()
            port = free_port()
            with open(logs / "gateway.log", "ab") as log:
                service.processes["gateway"] = start_gateway("127.0.0.1", port, env, log)
            service.url = f"http://127.0.0.1:{port}"
            wait_until(lambda: http_status(f"{service.url}/readyz") == 200, READY_TIMEOUT_S,
                       "a worker to load the model", service.processes)
        except BaseException:
            service.stop()
            raise
        return service

    def start_worker(self) -> None:
        with open(self.logs / "worker.log", "ab") as log:
            self.processes["worker"] = start_worker(self.env, log)

    def gateway_pid(self) -> int | None:
        if self.processes:
            return self.processes["gateway"].pid
        return listening_pid(urlsplit(self.url).port)

    def worker_pids(self, client: httpx.Client) -> list[int]:
        """The worker started here, or the workers /readyz names (none where it hides their PIDs)."""
        if self.processes:
            return [self.processes["worker"].pid]
        try:
            workers = client.get("/readyz").json().get("workers", [])
        except (httpx.HTTPError, ValueError):
            return []
        return [w["pid"] for w in workers if isinstance(w.get("pid"), int) and "celery" in cmdline(w["pid"])]

    def stop(self) -> None:
        stop(list(self.processes.values()))


def listening_pid(port: int) -> int | None:
    """The process listening on TCP `port` (among those whose descriptors this user may read), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for fds in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) in inodes for fd in fds.iterdir()):
                return int(fds.parent.name)
        except OSError:
            continue
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rss_mb(pids: list[int | None]) -> float | None:
    """VmRSS of the processes, summed, in MB (10^6 bytes); None when none of them can be read."""
    total, found = 0, False
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except (OSError, TypeError):
            continue
        kb = next((int(line.split()[1]) for line in lines if line.startswith("VmRSS:")), None)
        if kb is not None:
            total, found = total + kb, True
    return total * 1024 / 1e6 if found else None


def redis_state(client: redis.Redis) -> dict:
    memory, stats = client.info("memory"), client.info("stats")
    return {"used_memory": memory["used_memory"], "used_memory_peak": memory["used_memory_peak"],
            "maxmemory": memory["maxmemory"], "maxmemory_policy": memory["maxmemory_policy"],
            "keys": client.dbsize(), "evicted_keys": stats["evicted_keys"]}


def keyspace_calls(client: redis.Redis) -> dict[str, int]:
    """Calls of the commands whose cost grows with the keyspace, from INFO commandstats."""
    stats = client.info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in KEYSPACE_COMMANDS}


class Jobs:
    """One dataset job per call of `submit`, each in a thread: submitted (retried while the service refuses it,
    for up to a minute), polled to its end, then deleted so that a long soak leaves no files behind."""

    def __init__(self, url: str, model: str, n: int, seed: int, timeout_s: float):
        self.url, self.model, self.n, self.seed, self.timeout_s = url, model, n, seed, timeout_s
        self.outcomes: list[dict] = []
        self.threads: list[threading.Thread] = []

    def submit(self, minute: int, offset_s: float) -> None:
        outcome = {"minute": minute, "submitted_s": offset_s, "n": self.n, "state": None}
        self.outcomes.append(outcome)
        thread = threading.Thread(target=self._run, args=(outcome,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _run(self, outcome: dict) -> None:
        give_up = time.monotonic() + 60
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while True:
                try:
                    outcome.update(run_job(client, self.model, self.n, self.seed + outcome["minute"], self.timeout_s))
                    break
                except BenchmarkError as exc:  # POST /jobs refused (a 503 while Redis is stopped)
                    outcome["refusals"] = outcome.get("refusals", 0) + 1
                    if time.monotonic() > give_up:
                        outcome["error"] = str(exc)
                        return
                    time.sleep(1)
                except httpx.HTTPError as exc:
                    outcome["error"] = f"{type(exc).__name__}: {exc}"
                    return
            if outcome["state"] in FINAL_STATES:
                client.delete(f"/jobs/{outcome['id']}")

    def wait(self) -> None:
        deadline = time.monotonic() + self.timeout_s + 90
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class Faults(threading.Thread):
    """Mid-soak: kill -9 the worker (restarted here after run_local's first backoff when started here), then stop
    the broker Redis for REDIS_STOP_S. Each fault's window runs from the fault to the service's recovery: a new
    worker ready in /readyz, or Redis continued."""

    def __init__(self, service: Service, started: float, at: tuple[float, float], redis_pid: int):
        super().__init__(daemon=True)
        self.service, self.started, self.at, self.redis_pid = service, started, at, redis_pid
        self.windows: list[dict] = []
        self.cancelled = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.service.url, timeout=5) as client:
            if self.cancelled.wait(max(0.0, self.started + self.at[0] - time.time())):
                return
            self.windows.append(self.kill_worker(client))
            if self.cancelled.wait(max(0.0, self.started + self.at[1] - time.time())):
                return
            self.windows.append(self.stop_redis())

    def kill_worker(self, client: httpx.Client) -> dict:
        pids = self.service.worker_pids(client)
        window = {"fault": "worker kill -9", "pid": pids[0] if pids else None, "start": time.time(), "end": None}
        if not pids:
            window["error"] = "no worker PID found (from /readyz)"
            return window
        os.kill(pids[0], signal.SIGKILL)
        if self.service.processes:
            self.service.processes["worker"].wait()
            time.sleep(RESTART_DELAY_S[0])
            self.service.start_worker()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and not self.cancelled.is_set():
            try:
                ready = client.get("/readyz")
                if ready.status_code == 200 and any(w.get("pid") not in (None, pids[0])
                                                    for w in ready.json().get("workers", [])):
                    window["end"] = time.time()
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        return window

    def stop_redis(self) -> dict:
        window = {"fault": f"broker Redis SIGSTOP {REDIS_STOP_S:g} s", "pid": self.redis_pid, "start": time.time()}
        os.kill(self.redis_pid, signal.SIGSTOP)
        try:
            time.sleep(REDIS_STOP_S)
        finally:
            os.kill(self.redis_pid, signal.SIGCONT)
        window["end"] = time.time()
        return window


def fault_times(seconds: float) -> tuple[float, float]:
    """Seconds into the run of the two faults: at FAULT_AT of the run, moved to the middle of their minute (away
    from the segment boundaries, where jobs are submitted and samples taken), and at least 15 s before the end."""
    return tuple(min((math.floor(f * seconds / SEGMENT_S) + 0.5) * SEGMENT_S, seconds - 15) for f in FAULT_AT)


def segments(minutes: float) -> list[int]:
    total = round(minutes * 60)
    return [SEGMENT_S] * (total // SEGMENT_S) + ([total % SEGMENT_S] if total % SEGMENT_S else [])


def soak(service: Service, model: str, minutes: float = MINUTES, concurrency: int = CONCURRENCY,
         distinct: int = DISTINCT, hit_share: float = HIT_SHARE, job_n: int = JOB_N, faults: bool = False,
         wrk_threads: int = 1, wrk_timeout_s: float = 35.0, job_timeout_s: float = 600.0,
         models_dir: str | None = None, cache_max_memory: str | None = None, threads: int | None = None) -> dict:
    """Warm the distinct bodies, then the segments with their jobs (and faults), sampling after each."""
    for location in (service.url, service.redis_url, service.cache_url):
        check_loopback(location)
    run_seed = secrets.randbits(40)  # fresh seeds per run: misses miss whatever the cache holds
    broker, cache = (redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2, socket_timeout=10)
                     for url in (service.redis_url, service.cache_url))
    result: dict = {
        "model": model, "url": service.url, "started_here": bool(service.processes), "minutes": minutes,
        "segment_s": SEGMENT_S, "concurrency": concurrency, "distinct": distinct, "hit_share": hit_share,
        "job_n": job_n, "host": host.start(),
        "wrk": {"version": wrk_version(), "threads": wrk_threads, "timeout_s": wrk_timeout_s,
                "script": str(WRK_SCRIPT.relative_to(WRK_SCRIPT.parents[2]))},
    }
    if service.processes:
        result["service"] = {"cache_max_memory": cache_max_memory, "onnxruntime_threads": threads,
                             "latest": latest_version(models_dir, model), "workers": 1}
    client = httpx.Client(base_url=service.url, timeout=30)
    try:
        answers, result["warm"] = warm(service.url, [request_body(model, run_seed + i) for i in range(distinct)])
        result["version"] = ", ".join(sorted({json.loads(answer)["version"] for answer in answers}))

        def sample() -> dict:
            return {"gateway_rss_mb": rss_mb([service.gateway_pid()]),
                    "worker_rss_mb": rss_mb(service.worker_pids(client)),
                    "broker": redis_state(broker), "cache": redis_state(cache)}

        result["before"], keyspace_before = sample(), keyspace_calls(broker)
        plan = segments(minutes)
        started = time.time()
        jobs = Jobs(service.url, model, job_n, run_seed, job_timeout_s)
        injector = None
        if faults:
            injector = Faults(service, started, fault_times(sum(plan)), broker.info("server")["process_id"])
            injector.start()
        rows, ok_by_second, other_by_second = [], {}, {}
        try:
            for minute, seconds in enumerate(plan):
                offset = time.time() - started
                jobs.submit(minute, offset)
                raw = wrk_json(service.url, WRK_SCRIPT, ["mixed", model, str(run_seed), str(distinct),
                                                         str(hit_share),
                                                         str(run_seed + (minute + 1) * MISS_STRIDE)],
                               concurrency, seconds, wrk_threads, wrk_timeout_s)
                for into, counts in ((ok_by_second, raw["ok_by_second"]), (other_by_second, raw["other_by_second"])):
                    for second, count in counts.items():
                        into[int(second)] = into.get(int(second), 0) + int(count)
                row = {"minute": minute + 1, "start_s": offset, **summarise(raw, concurrency), **sample()}
                del row["concurrency"]
                rows.append(row)
                print(minute_line(row), flush=True)
        finally:
            if injector is not None:
                injector.cancelled.set()
                injector.join()
        jobs.wait()
        result["per_minute"] = rows
        result["jobs"] = jobs.outcomes
        result["after"] = sample()
        keyspace_after = keyspace_calls(broker)
        result["keyspace_calls"] = {"during": {k: keyspace_after[k] - keyspace_before[k] for k in KEYSPACE_COMMANDS},
                                    "total": keyspace_after}
        first = min(ok_by_second.keys() | other_by_second.keys())
        last = max(ok_by_second.keys() | other_by_second.keys())
        result["timeline"] = {"start": first - started,
                              "ok": [ok_by_second.get(t, 0) for t in range(first, last + 1)],
                              "non_2xx": [other_by_second.get(t, 0) for t in range(first, last + 1)]}
        result["faults"] = None if injector is None else [
            dict(w, start=w["start"] - started, end=None if w["end"] is None else w["end"] - started)
            for w in injector.windows]
    finally:
        client.close()
        broker.close()
        cache.close()
    result["host"] = host.finish(result["host"])
    result["targets"] = targets(result)
    return result


# --- targets, Markdown, plot ---------------------------------------------------------------------------------------

def fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def mb(value) -> str:
    return "–" if value is None else f"{value / 1e6:,.1f}"


def minute_line(row: dict) -> str:
    broker, cache = row["broker"], row["cache"]
    return (f"minute {row['minute']}: {row['ok_per_second']:,.0f} 2xx/s, p50 {fmt(row['p50_ms'])} ms, "
            f"p99 {fmt(row['p99_ms'])} ms, {row['non_2xx']} non-2xx, {sum(row['socket_errors'].values())} socket "
            f"errors, {fmt(hit_percent(row), 0)} % hits; RSS gateway {fmt(row['gateway_rss_mb'])} MB, worker "
            f"{fmt(row['worker_rss_mb'])} MB; broker Redis {mb(broker['used_memory'])} MB, {broker['keys']:,} keys; "
            f"cache Redis {mb(cache['used_memory'])} MB, {cache['keys']:,} keys")


def hit_percent(row: dict) -> float | None:
    answered = sum(row["x_cache"].values())
    return 100 * row["x_cache"].get("hit", 0) / answered if answered else None


def windows(result: dict) -> tuple[float, float, int, str]:
    """2xx/s over the first and the last window of the run's whole seconds, the window's seconds and its name."""
    ok = result["timeline"]["ok"][1:-1]  # the first and last seconds are partly outside the run
    if len(ok) >= 2 * STABILITY_WINDOW_S:
        span, name = STABILITY_WINDOW_S, f"{STABILITY_WINDOW_S // 60} minutes"
    else:
        span, name = max(1, len(ok) // 5), "fifth"
    return sum(ok[:span]) / span, sum(ok[-span:]) / span, span, name


def touches(second: float, begin: float, end: float) -> bool:
    """Whether the timeline's one-second bucket starting at `second` overlaps the interval (begin, end)."""
    return second + 1 > begin and second < end


def fault_findings(result: dict) -> list[dict]:
    """Per fault window: non-2xx inside it (+ FAULT_GRACE_S), how long after its end the last non-2xx came (before
    the next fault), and the 2xx answered in the FAULT_GRACE_S after the grace (a silent service answers none)."""
    timeline, faults, found = result["timeline"], result["faults"], []
    buckets = [(timeline["start"] + i, ok, bad) for i, (ok, bad) in enumerate(zip(timeline["ok"], timeline["non_2xx"]))]
    for index, window in enumerate(faults):
        end = window["end"]
        if end is None:
            found.append(dict(window, non_2xx=None, last_non_2xx_after_end_s=None, ok_after_grace=0, met=False))
            continue
        following = faults[index + 1]["start"] if index + 1 < len(faults) else math.inf
        inside = sum(bad for t, _, bad in buckets if bad and touches(t, window["start"], end + FAULT_GRACE_S))
        later = [t + 1 - end for t, _, bad in buckets if bad and touches(t, end, following)]
        ok_after = sum(ok for t, ok, _ in buckets if end + FAULT_GRACE_S <= t < end + 2 * FAULT_GRACE_S)
        last = max(later) if later else None
        found.append(dict(window, non_2xx=inside, last_non_2xx_after_end_s=last, ok_after_grace=ok_after,
                          met=(last is None or last <= FAULT_GRACE_S) and ok_after > 0))
    return found


def outside_faults(result: dict) -> tuple[int, int]:
    """Non-2xx answers outside every fault window (+ grace), and socket errors of minutes that overlap none."""
    spans = [(w["start"], (w["end"] if w["end"] is not None else math.inf) + FAULT_GRACE_S) for w in result["faults"]]
    timeline = result["timeline"]
    stray = sum(bad for i, bad in enumerate(timeline["non_2xx"])
                if bad and not any(touches(timeline["start"] + i, a, b) for a, b in spans))
    socket = sum(sum(row["socket_errors"].values()) for row in result["per_minute"]
                 if not any(row["start_s"] < b and a < row["start_s"] + row["seconds"] for a, b in spans))
    return stray, socket


def target(name: str, value, shown: str, met) -> dict:
    return {"target": name, "value": value, "shown": shown, "met": met}


def targets(result: dict) -> list[dict]:
    rows, jobs, found = result["per_minute"], result["jobs"], []
    first, last, span, name = windows(result)
    ratio = last / first if first else None
    found.append(target(f"2xx/s of the last {name} ≥ {STABILITY:g}× the first's", ratio,
                        f"{fmt(ratio, 2)}× ({last:,.0f} vs {first:,.0f} /s over {span} s)",
                        None if ratio is None else ratio >= STABILITY))
    non_2xx = sum(row["non_2xx"] for row in rows)
    socket = sum(sum(row["socket_errors"].values()) for row in rows)
    answered = sum(row["answered"] for row in rows)
    if result["faults"] is None:
        statuses = {}
        for row in rows:
            for status, count in row["statuses"].items():
                statuses[status] = statuses.get(status, 0) + count
        found.append(target("0 errors (non-2xx and socket errors)", non_2xx + socket,
                            f"{non_2xx:,} non-2xx, {socket:,} socket errors of {answered:,} answers ("
                            + ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items())) + ")",
                            non_2xx + socket == 0 and answered > 0))
    else:
        stray, stray_socket = outside_faults(result)
        found.append(target(f"non-2xx only inside the fault windows (+{FAULT_GRACE_S:g} s)", stray + stray_socket,
                            f"{stray:,} non-2xx and {stray_socket:,} socket errors outside them; {non_2xx:,} non-2xx "
                            f"and {socket:,} socket errors in all, of {answered:,} answers",
                            stray + stray_socket == 0 and answered > 0))
        for fault in fault_findings(result):
            shown = ("never recovered" if fault["end"] is None else
                     f"{fault['non_2xx']:,} non-2xx in the window; last one "
                     + ("–" if fault["last_non_2xx_after_end_s"] is None
                        else f"{fault['last_non_2xx_after_end_s']:.0f} s after it")
                     + f"; {fault['ok_after_grace']:,} 2xx in the {FAULT_GRACE_S:g} s after the grace")
            found.append(target(f"{fault['fault']}: every answer 200 again within {FAULT_GRACE_S:g} s",
                                fault["last_non_2xx_after_end_s"], shown, fault["met"]))
    before, after = result["before"]["gateway_rss_mb"], result["after"]["gateway_rss_mb"]
    growth = after - before if before is not None and after is not None else None
    found.append(target(f"gateway RSS growth < {RSS_GROWTH_MB:g} MB", growth,
                        "–" if growth is None else f"{growth:+,.1f} MB ({before:,.1f} → {after:,.1f} MB)",
                        None if growth is None else growth < RSS_GROWTH_MB))
    samples = [result["before"]["cache"]] + [row["cache"] for row in rows] + [result["after"]["cache"]]
    bound, peak = samples[-1]["maxmemory"], max(s["used_memory"] for s in samples)
    evicted = samples[-1]["evicted_keys"] - samples[0]["evicted_keys"]
    found.append(target(f"cache Redis memory within its bound (+{CACHE_SLACK:.0%})", peak,
                        f"at most {mb(peak)} MB of {mb(bound) if bound else 'no bound'} MB "
                        f"({samples[-1]['maxmemory_policy']}; {evicted:,} keys evicted)",
                        bool(bound) and peak <= bound * (1 + CACHE_SLACK)))
    succeeded = sum(job["state"] == "succeeded" for job in jobs)
    found.append(target(f"every job succeeded (n = {result['job_n']:,}, one a minute)", succeeded,
                        f"{succeeded} of {len(jobs)}" + "".join(f"; minute {job['minute'] + 1}: {job['state']}"
                                                                for job in jobs if job["state"] != "succeeded"),
                        bool(jobs) and succeeded == len(jobs)))
    calls = result["keyspace_calls"]["during"]
    found.append(target("no SCAN or KEYS on the broker Redis during the soak", sum(calls.values()),
                        ", ".join(f"{name.upper()}: {count:,}" for name, count in calls.items()),
                        sum(calls.values()) == 0))
    return found


def names(model: str, faults: bool) -> tuple[str, str]:
    """The result's file stem (JSON and plot) and its section of docs/RESULTS.md."""
    kind = "soak_faults" if faults else "soak"
    return f"{kind}_{model}", f"bench-{kind.replace('_', '-')}-{model}"


def markdown(result: dict) -> str:
    stem, _ = names(result["model"], result["faults"] is not None)
    wrk, warmed, service = result["wrk"], result["warm"], result.get("service")
    jobs = {job["minute"] + 1: job for job in result["jobs"]}
    rows = []
    for row in result["per_minute"]:
        broker, cache, job = row["broker"], row["cache"], jobs.get(row["minute"])
        rows.append([row["minute"] if row["seconds"] > result["segment_s"] - 1 else
                     f"{row['minute']} ({row['seconds']:.0f} s)",
                     fmt(row["ok_per_second"], 0), fmt(row["p50_ms"]), fmt(row["p99_ms"]), f"{row['non_2xx']:,}",
                     f"{sum(row['socket_errors'].values()):,}", f"{fmt(hit_percent(row), 0)} %",
                     fmt(row["gateway_rss_mb"]), fmt(row["worker_rss_mb"]),
                     f"{mb(broker['used_memory'])} ({broker['keys']:,})",
                     f"{mb(cache['used_memory'])} ({cache['keys']:,})",
                     "–" if job is None else f"{job['state']}" + (f", {job['seconds']:.1f} s" if "seconds" in job
                                                                  else "")])
    where = (f"the stack `make run` runs, started here on free ports: a broker Redis (noeviction), a cache Redis "
             f"bounded at {service['cache_max_memory']} (allkeys-lru), one Celery worker "
             f"({service['onnxruntime_threads']} onnxruntime thread(s)) and the gateway" if service
             else f"`{result['url']}`")
    lines = [
        f"### Soak{' with faults' if result['faults'] is not None else ''}: {result['model']}/{result['version']}, "
        f"{result['minutes']:g} min",
        "",
        f"`{wrk['version']}` ({wrk['threads']} thread(s), script `{wrk['script']}`, concurrency "
        f"{result['concurrency']}, timeout {wrk['timeout_s']:g} s) against {where}, in {result['segment_s']} s "
        f"segments. POST /counterfactual with n = 1: {result['hit_share']:.0%} of requests one of "
        f"{result['distinct']:,} distinct bodies, each requested once through the service beforehand "
        f"({warmed['seconds']:.1f} s at concurrency {warmed['concurrency']}), the rest fresh seeds; one npz job of "
        f"n = {result['job_n']:,} submitted at the start of each minute and polled to its end. Memory in MB "
        f"(10^6 bytes), keys in brackets; RSS and Redis sampled at the end of each minute. Host: "
        f"{result['host']['cpus']} CPUs, {host.describe(result['host'])}; the load generator shares them.",
        "",
        report.table(["minute", "2xx/s", "p50 ms", "p99 ms", "non-2xx", "socket errors", "cache hits",
                      "gateway RSS MB", "worker RSS MB", "broker Redis", "cache Redis", "job"], rows),
    ]
    if result["faults"] is not None:
        fault_rows = [[f["fault"], f"{f['start']:.1f}", fmt(f["end"]),
                       "–" if f["end"] is None else f"{f['end'] - f['start']:.1f}", fmt(f["non_2xx"], 0),
                       "–" if f["last_non_2xx_after_end_s"] is None else f"{f['last_non_2xx_after_end_s']:.0f}"]
                      for f in fault_findings(result)]
        lines += ["", f"Fault windows, seconds into the soak (a worker kill's window ends when a new worker is "
                      f"ready; non-2xx are counted to {FAULT_GRACE_S:g} s after the window):", "",
                  report.table(["fault", "start s", "end s", "window s", "non-2xx", "last non-2xx, s after end"],
                               fault_rows)]
    verdict = {True: "pass", False: "**fail**", None: "not measured"}
    lines += ["", report.table(["target", "measured", "met"],
                               [[t["target"], t["shown"], verdict[t["met"]]] for t in result["targets"]])]
    lines += ["", f"![per-minute throughput, p99, RSS and Redis memory]({stem}.png)"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["per_minute"]
    x = [(row["start_s"] + row["seconds"]) / 60 for row in rows]  # each minute's figures at its end
    with_start = [0.0] + x
    samples = [result["before"]] + rows
    fig, ((rate, latency), (rss, memory)) = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    timeline = result["timeline"]
    # wrk runs in one-minute segments: the seconds at a segment's edges are partly idle (wrk stopping and starting),
    # so they are left out of the per-second line rather than drawn as dips the service never had.
    edges = [edge for row in rows for edge in (row["start_s"], row["start_s"] + row["seconds"])]
    seconds = [(timeline["start"] + i) / 60 for i in range(len(timeline["ok"]))]
    inside = [count if min(abs(60 * t - edge) for edge in edges) >= 1.5 else float("nan")
              for t, count in zip(seconds, timeline["ok"])]
    rate.plot(seconds, inside, color="tab:blue", lw=0.5, alpha=0.4, label="2xx per second")
    if any(timeline["non_2xx"]):
        rate.plot(seconds, timeline["non_2xx"], color="tab:red", lw=0.8, label="non-2xx per second")
    rate.plot(x, [row["ok_per_second"] for row in rows], "o-", color="tab:blue", label="2xx/s, minute (at its end)")
    first, _, span, _ = windows(result)
    rate.axhline(STABILITY * first, color="black", lw=1, ls=":",
                 label=f"target: {STABILITY:g}× the first {span} s")
    for fault in result["faults"] or []:
        for ax in (rate, latency, rss, memory):
            ax.axvspan(fault["start"] / 60, (fault["end"] if fault["end"] is not None else fault["start"]) / 60,
                       color="tab:red", alpha=0.15)
    rate.set_ylabel("answers / s")
    rate.set_title("throughput")
    latency.plot(x, [row["p50_ms"] for row in rows], "o-", label="p50")
    latency.plot(x, [row["p99_ms"] for row in rows], "s--", label="p99")
    latency.set_yscale("log")
    latency.set_ylabel("latency (ms)")
    latency.set_title("latency per minute")
    rss.plot(with_start, [row["gateway_rss_mb"] for row in samples], "o-", label="gateway")
    rss.plot(with_start, [row["worker_rss_mb"] for row in samples], "s-", label="worker")
    before = result["before"]["gateway_rss_mb"]
    if before is not None:
        rss.axhline(before + RSS_GROWTH_MB, color="tab:blue", lw=1, ls=":",
                    label=f"gateway at start + {RSS_GROWTH_MB:g} MB")
    rss.set_ylabel("RSS (MB)")
    rss.set_title("process memory")
    memory.plot(with_start, [row["broker"]["used_memory"] / 1e6 for row in samples], "o-", label="broker Redis")
    memory.plot(with_start, [row["cache"]["used_memory"] / 1e6 for row in samples], "s-", label="cache Redis")
    bound = result["after"]["cache"]["maxmemory"]
    if bound:
        memory.axhline(bound / 1e6, color="tab:orange", lw=1, ls=":", label="cache maxmemory")
    memory.set_ylabel("used_memory (MB)")
    memory.set_title("Redis memory")
    for ax in (rate, latency, rss, memory):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in (rss, memory):
        ax.set_xlabel("minutes into the soak")
    fig.suptitle(f"Soak{' with faults' if result['faults'] is not None else ''}: {result['model']}/"
                 f"{result['version']}, concurrency {result['concurrency']}, {result['hit_share']:.0%} hits over "
                 f"{result['distinct']:,} bodies, a job of {result['job_n']:,} a minute")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=MINUTES)
    parser.add_argument("--faults", action="store_true",
                        help="kill -9 the worker and SIGSTOP the broker Redis for 5 s mid-soak")
    parser.add_argument("--url", help="a running service on loopback (default: start one here, as `make run` does)")
    parser.add_argument("--redis-url", default=settings.redis_url, help="with --url: its broker Redis")
    parser.add_argument("--cache-url", default=settings.cache_url, help="with --url: its cache Redis")
    parser.add_argument("--model", default=settings.default_model)
    parser.add_argument("--models-dir", default=str(settings.paths.models_dir), help="the started service's models")
    parser.add_argument("--cache-max-memory", default=settings.cache_max_memory,
                        help="the started cache Redis's maxmemory (default SKDCGN_CACHE_MAX_MEMORY)")
    parser.add_argument("--threads", type=int, default=settings.ort_threads,
                        help="onnxruntime threads of the started worker (default SKDCGN_ORT_THREADS)")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="wrk connections")
    parser.add_argument("--distinct", type=int, default=DISTINCT, help="distinct cached bodies the hits draw from")
    parser.add_argument("--hit-share", type=float, default=HIT_SHARE, help="share of requests for a cached body")
    parser.add_argument("--job-n", type=int, default=JOB_N, help="samples of the job submitted each minute")
    parser.add_argument("--job-timeout", type=float, default=600.0)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--wrk-timeout", type=float, default=settings.sync_timeout_s + 5,
                        help="seconds before wrk counts a request as timed out")
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--results-md", default="docs/RESULTS.md", help="its folder also receives the plot")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or (args.faults and args.minutes < 2):
        parser.error("--minutes must be positive, and at least 2 with --faults")
    if min(args.concurrency, args.distinct, args.job_n) < 1 or not 0 <= args.hit_share <= 1:
        parser.error("--concurrency, --distinct and --job-n must be at least 1, --hit-share within 0..1")
    service, logs = None, Path(tempfile.mkdtemp(prefix="skdcgn-soak-"))
    try:
        wrk_path()
        if args.url:
            check_loopback(args.url)
            service = Service(args.url, args.redis_url, args.cache_url)
            wait_until(lambda: http_status(f"{args.url}/readyz") == 200, READY_TIMEOUT_S, "a ready service", {})
        else:
            latest_version(args.models_dir, args.model)
            service = Service.start(logs, args.models_dir, args.model, args.cache_max_memory, args.threads)
        result = soak(service, args.model, args.minutes, args.concurrency, args.distinct, args.hit_share, args.job_n,
                      args.faults, args.wrk_threads, args.wrk_timeout, args.job_timeout, args.models_dir,
                      args.cache_max_memory, args.threads)
    except (BenchmarkError, StartupError, ManifestError, httpx.HTTPError, redis.RedisError) as exc:
        print(f"error: {exc} (logs of what was started here: {logs})", file=sys.stderr)
        return 1
    finally:
        if service is not None and service.processes:
            service.stop()
    stem, section = names(args.model, args.faults)
    plot(result, Path(args.results_md).parent / f"{stem}.png")
    report.publish(result, Path(args.results_dir) / f"{stem}.json", args.results_md, section, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
