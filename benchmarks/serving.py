"""Serving benchmark: `wrk` (a compiled load generator) against the HTTP API on loopback, beside the raw engine.

A Python client saturates a core before the gateway does, so the load comes from `wrk` (Debian package `wrk`)
driven by benchmarks/wrk/counterfactual.lua, whose `done` hook prints latency percentiles, status counts,
429s carrying Retry-After and X-Cache counts as JSON. For each concurrency (1, 8, 32, 128 by default), each
point lasting --duration seconds:

* miss: POST /counterfactual, n = 1, a fresh seed per request (so every request is rendered by a worker);
* hit: the same body every request (requested once beforehand, so every answer comes from the batch cache; the
  gateway's repeats memo answers a repeated body before FastAPI, so this is the best case);
* minimal: the same requests against benchmarks/minimal_endpoint.py (FastAPI + a sha256 of the body + one Redis
  GET of the stored cache-hit answer for that body), started here under uvicorn on a free port, against the
  service's cache Redis;
* hit_distinct: each request one of --distinct (default 10,000) distinct bodies, a seed drawn at random per
  request; every one of them was requested once beforehand through the service (concurrent n = 1 requests, so
  the cache entries are the service's own), so every answer is a cache hit over that many cached requests;
* minimal_distinct: the same distinct bodies against the minimal endpoint, which holds each body's real answer
  under the hash of that body.

Past admission, once per run: misses at --overload-concurrency (512) against a second gateway process over the
same Redis and workers, started here with SKDCGN_MAX_IN_FLIGHT lowered to --overload-max-in-flight (64; 0 sends
the point to the service itself): the target is 429 with Retry-After and never a 5xx, and it is not met unless
429s were observed.

Also measured in the same run: the raw engine (the same students' fused graph through
core.runtime.ModelRuntime.run_fused at the workers' batch and onnxruntime thread count, with and
without noise drawing, composition and uint8), and one bulk POST /jobs timed from submission to `succeeded`.
Every figure is printed beside its target; the result names the family and version it measured (and the
repository's LATEST then). Outputs: benchmarks/results/serving_<model>.json, a section of docs/RESULTS.md and
docs/serving_concurrency.png, all from the same result. Only loopback URLs are accepted. The keys stored for the
minimal endpoint are deleted at the end.

    python -m benchmarks.serving --start                              # Redis + worker + gateway, started here
    python -m benchmarks.serving --url http://127.0.0.1:8000          # a service already running (its Redis:
                                                                      #   --redis-url, default SKDCGN_REDIS_URL)
    python -m benchmarks.serving --start --duration 2 --concurrency 1,32 --distinct 500 \
        --results-dir /tmp/bench --results-md /tmp/bench/RESULTS.md  # a quick check of the harness
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import redis
import urllib3

from benchmarks.minimal_endpoint import body_key
from core.compose import compose_samples
from core.imageio import to_uint8
from core.manifest import ManifestError, latest_version
from core.messages import INTERACTIVE_QUEUE
from core.noise import draw_sample_noise
from core.vocabulary import ENDED_STATES, MECHANISMS
from core.runtime import ModelRuntime
from core.settings import Settings
from service.run_local import free_port
from reporting import report
from reporting.plots import save_figure

REPO_ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "counterfactual.lua"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CONCURRENCY = (1, 8, 32, 128)
KINDS = ("miss", "hit", "minimal", "hit_distinct", "minimal_distinct")
DISTINCT = 10_000  # distinct cached bodies of the hit_distinct and minimal_distinct points
WARM_CONCURRENCY = 32  # concurrent n = 1 requests that put the distinct bodies in the cache beforehand
MINIMAL_TTL_S = 3600  # the minimal endpoint's keys expire even if a run dies before deleting them
JSON_HEADERS = {"Content-Type": "application/json"}
FINAL_STATES = set(ENDED_STATES)
PERCENTILES = {"p50_ms": "50", "p90_ms": "90", "p99_ms": "99", "p999_ms": "99.9"}
PLOT_NAME = "serving_concurrency.png"

# Targets (the issue's): each is reported with its measured value and met / not met / not measured.
TARGET_CONCURRENCY = 32
OVERLOAD_CONCURRENCY = 512  # wrk connections of the point past admission
OVERLOAD_MAX_IN_FLIGHT = 64  # SKDCGN_MAX_IN_FLIGHT of the gateway that point runs against
MISS_TARGET, MISS_AIM = 0.40, 0.50  # n = 1 misses/s over the raw engine's images/s (noise + composition)
HIT_TARGET = 0.50  # cache hits/s over the minimal endpoint's answers/s (one body, and over the distinct bodies)
BULK_TARGET = 0.70  # bulk-job images/s over the raw engine (noise + composition)
CACHE_HIT_P50_TARGET_MS = 5.0  # at concurrency 1


class BenchmarkError(RuntimeError):
    """wrk is missing, the service is not reachable or not on loopback, or a phase failed."""


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise BenchmarkError(f"refusing to load {url}: the benchmark only targets loopback "
                             f"({', '.join(sorted(LOOPBACK))})")


def wrk_path() -> str:
    found = shutil.which("wrk")
    if not found:
        raise BenchmarkError("wrk is not installed: `apt-get install wrk` (the Debian package); the serving benchmark "
                             "needs a compiled load generator")
    return found


def wrk_version() -> str:
    run = subprocess.run([wrk_path(), "--version"], capture_output=True, text=True)
    return (run.stdout or run.stderr).splitlines()[0].strip() if (run.stdout or run.stderr) else "unknown"


def parse_wrk(stdout: str) -> dict:
    """The JSON line the Lua `done` hook prints ("WRK_JSON {...}")."""
    for line in stdout.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])
    raise BenchmarkError(f"wrk printed no WRK_JSON line; its output ends with: {stdout[-500:]!r}")


def summarise(raw: dict, concurrency: int) -> dict:
    """One load point from the `done` hook's JSON: counts, rates and latency percentiles in ms."""
    seconds = raw["duration_us"] / 1e6
    statuses = {str(k): int(v) for k, v in sorted(raw["statuses"].items())}
    answered = sum(statuses.values())
    ok = sum(v for k, v in statuses.items() if k.startswith("2"))
    errors = {k: int(raw["errors"].get(k, 0)) for k in ("connect", "read", "write", "timeout")}
    latency = raw["latency_us"]
    point = {
        "concurrency": concurrency, "seconds": seconds, "answered": answered, "ok": ok, "non_2xx": answered - ok,
        "statuses": statuses, "share_429": statuses.get("429", 0) / answered if answered else None,
        "retry_after_429": int(raw["retry_after"]), "socket_errors": errors,
        "x_cache": {str(k): int(v) for k, v in raw["x_cache"].items()},
        "requests_per_second": answered / seconds, "ok_per_second": ok / seconds,
        "bytes": int(raw["bytes"]),
    }
    for key, pct in PERCENTILES.items():
        point[key] = latency["percentiles"][pct] / 1000 if answered else None
    point["mean_ms"] = latency["mean"] / 1000 if answered else None
    point["max_ms"] = latency["max"] / 1000 if answered else None
    point["p99_over_p50"] = point["p99_ms"] / point["p50_ms"] if answered and point["p50_ms"] else None
    return point


def wrk_json(url: str, script: Path, script_args: list[str], concurrency: int, duration_s: float,
             threads: int = 1, timeout_s: float = 30.0) -> dict:
    """wrk with a Lua `script` (and its arguments) against url/counterfactual: the JSON its `done` hook prints."""
    check_loopback(url)
    command = [wrk_path(), f"-t{max(1, min(threads, concurrency))}", f"-c{concurrency}", f"-d{duration_s:g}s",
               "--timeout", f"{timeout_s:g}s", "-s", str(script), f"{url.rstrip('/')}/counterfactual",
               "--", *script_args]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + timeout_s + 60)
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(f"wrk did not finish: {' '.join(command)}") from exc
    if run.returncode != 0:
        raise BenchmarkError(f"wrk exited with {run.returncode}: {run.stderr.strip()[-500:]}")
    return parse_wrk(run.stdout)


def run_wrk(url: str, mode: str, model: str, seed: int, concurrency: int, duration_s: float, threads: int = 1,
            timeout_s: float = 30.0, count: int | None = None) -> dict:
    """wrk with the counterfactual script: `mode` "miss" (fresh seeds from `seed` on), "hit" (the body of `seed`,
    every request) or "distinct" (one of the `count` bodies of seeds `seed` .. `seed + count - 1`, drawn at random
    per request)."""
    if mode == "distinct" and not count:
        raise BenchmarkError("wrk's distinct mode needs the number of distinct bodies (count)")
    script_args = [mode, model, str(seed)] + ([str(count)] if mode == "distinct" else [])
    return summarise(wrk_json(url, WRK_SCRIPT, script_args, concurrency, duration_s, threads, timeout_s), concurrency)


def hit_body(model: str, seed: int) -> dict:
    """The body the Lua script sends for `seed` (labels cycle with the seed)."""
    return {"model": model, "shape": seed % 10, "texture": (seed // 10) % 10, "background": (seed // 100) % 10,
            "n": 1, "seed": seed}


def request_body(model: str, seed: int) -> bytes:
    """The exact bytes the Lua script's `body_for` sends for `seed`: the minimal endpoint keys its answers by them."""
    body = hit_body(model, seed)
    return json.dumps(body, separators=(",", ":")).encode()


def raw_engine(models_dir: str, family: str, threads: int, batch: int, min_seconds: float = 3.0) -> dict:
    """The same students without the service, through the workers' ModelRuntime at batch `batch` with the
    worker's onnxruntime thread count: the fused graph only, and with noise drawing, composition and uint8
    as a job does. Each variant repeats whole batches for at least `min_seconds` (after one warm-up)."""
    students = ModelRuntime.from_repository(models_dir, family, threads=threads)
    spec, shuffle, size = students.noise, students.texture_shuffle, students.image_size
    rng = np.random.default_rng(0)
    labels = {m: rng.integers(0, 10, batch).astype(np.int64) for m in MECHANISMS}
    z = {m: rng.standard_normal((batch, spec.dim)).astype(np.float32) for m in MECHANISMS}

    def fused(_: int) -> None:
        students.run_fused(z, labels)

    def composed(b: int) -> None:
        noises = [draw_sample_noise(1, b * batch + i, spec, size) for i in range(batch)]
        out = students.run_fused({m: np.stack([s.z[m] for s in noises]) for m in MECHANISMS}, labels)
        to_uint8(compose_samples(out["shape"], out["texture"], out["background"], noises, shuffle)[0])

    result = {"version": students.version, "batch": batch, "onnxruntime_threads": threads,
              "provider": students.provider}
    for name, step in (("fused", fused), ("with_noise_and_composition", composed)):
        step(0)  # warm-up
        batches, started = 0, time.perf_counter()
        while batches == 0 or time.perf_counter() - started < min_seconds:
            step(batches)
            batches += 1
        elapsed = time.perf_counter() - started
        result[f"{name}_images_per_second"] = batches * batch / elapsed
        result[f"{name}_images"] = batches * batch
    return result


def wait_ready(client: httpx.Client, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise BenchmarkError(f"{client.base_url} did not become ready within {timeout_s:g} s")


def wait_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BenchmarkError(f"{url} exited with code {process.returncode} before answering /healthz")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise BenchmarkError(f"{url} did not answer /healthz within {timeout_s:g} s")


def drain(redis_url: str, timeout_s: float) -> float:
    """Wait until the interactive queue is empty (the tasks a miss point left behind are done or expired), so
    they do not run into the next point. Returns the seconds waited."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout_s and client.llen(INTERACTIVE_QUEUE) > 0:
            time.sleep(0.1)
    finally:
        client.close()
    time.sleep(0.5)  # the worker's last task, and the gateway's replies to callers wrk already left
    return time.monotonic() - started


def run_job(client: httpx.Client, model: str, n: int, seed: int, timeout_s: float) -> dict:
    """Submit a bulk npz job and poll it to a final state: images/s from submission to `succeeded`."""
    started = time.perf_counter()
    response = client.post("/jobs", json={"model": model, "n": n, "seed": seed, "format": "npz"})
    if response.status_code != 202:
        raise BenchmarkError(f"POST /jobs answered {response.status_code}: {response.text[:300]}")
    job_id = response.json()["id"]
    status: dict = {}
    while time.perf_counter() - started < timeout_s:
        status = client.get(f"/jobs/{job_id}").json()
        if status.get("state") in FINAL_STATES:
            break
        time.sleep(0.1)
    elapsed = time.perf_counter() - started
    state = status.get("state")
    return {"id": job_id, "n": n, "state": state, "seconds": elapsed,
            "images_per_second": n / elapsed if state == "succeeded" else None}


def warm(url: str, bodies: list[bytes], concurrency: int = WARM_CONCURRENCY, timeout_s: float = 600.0,
         request_timeout_s: float = 60.0) -> tuple[list[bytes], dict]:
    """POST each of `bodies` to url/counterfactual once, `concurrency` connections at a time, until each is answered
    200 (a 429 or 503 is retried after its Retry-After, at most 1 s), so that the service itself puts every answer
    in its cache. Returns the answers, each as a cache hit would be answered (`"cached":true`), and what it took.
    urllib3 in threads, not httpx: httpx's own overhead made the client, not the service, set the pace."""
    check_loopback(url)
    answers: list[bytes | None] = [None] * len(bodies)
    statuses: collections.Counter = collections.Counter()
    x_cache: collections.Counter = collections.Counter()
    deadline = time.monotonic() + timeout_s
    pool = urllib3.PoolManager(maxsize=concurrency, timeout=request_timeout_s, retries=False)

    def send(index: int) -> None:
        while True:
            if time.monotonic() > deadline:
                raise BenchmarkError(f"warming {len(bodies):,} distinct bodies took more than {timeout_s:g} s")
            try:
                answer = pool.request("POST", f"{url.rstrip('/')}/counterfactual", body=bodies[index],
                                      headers=JSON_HEADERS)
            except urllib3.exceptions.HTTPError as exc:
                raise BenchmarkError(f"warming: POST {url}/counterfactual failed: {exc!r}") from exc
            statuses[str(answer.status)] += 1
            if answer.status == 200:
                x_cache[answer.headers.get("x-cache", "none")] += 1
                answers[index] = as_cache_hit(answer.data)
                return
            if answer.status not in (429, 503):
                raise BenchmarkError(f"warming: POST /counterfactual answered {answer.status}: {answer.data[:300]!r}")
            try:
                wait = float(answer.headers.get("retry-after", "0.2"))
            except ValueError:
                wait = 0.2
            time.sleep(min(max(wait, 0.05), 1.0))

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max(1, min(concurrency, len(bodies)))) as senders:
            list(senders.map(send, range(len(bodies))))
    finally:
        pool.clear()
    seconds = time.perf_counter() - started
    return answers, {"bodies": len(bodies), "concurrency": concurrency, "seconds": seconds,
                     "answers_per_second": len(bodies) / seconds if seconds else None,
                     "statuses": dict(sorted(statuses.items())), "x_cache": dict(sorted(x_cache.items()))}


def as_cache_hit(answer: bytes) -> bytes:
    """A JSON answer as the gateway answers it from the cache: it ends `,"cached":false}` on a miss."""
    miss_tail = b',"cached":false}'
    return answer[:-len(miss_tail)] + b',"cached":true}' if answer.endswith(miss_tail) else answer


def store_minimal(cache_url: str, bodies: list[bytes], answers: list[bytes], ttl_s: int = MINIMAL_TTL_S) -> list[str]:
    """Store each answer under the minimal endpoint's key for its body; check they are all there. Returns the keys
    (remove_minimal deletes them)."""
    keys = [body_key(body) for body in bodies]
    store = redis.Redis.from_url(cache_url, socket_connect_timeout=2, socket_timeout=10)
    try:
        for start in range(0, len(keys), 1000):
            with store.pipeline(transaction=False) as pipe:
                for key, answer in zip(keys[start:start + 1000], answers[start:start + 1000]):
                    pipe.set(key, answer, ex=ttl_s)
                pipe.execute()
        held = sum(store.exists(*keys[start:start + 1000]) for start in range(0, len(keys), 1000))
    finally:
        store.close()
    if held != len(set(keys)):
        raise BenchmarkError(f"the cache Redis {cache_url} kept {held:,} of the minimal endpoint's {len(keys):,} "
                             "answers (evicted? its maxmemory is too small for this run)")
    return keys


def remove_minimal(cache_url: str, keys: list[str]) -> None:
    store = redis.Redis.from_url(cache_url, socket_connect_timeout=2, socket_timeout=10)
    try:
        for start in range(0, len(keys), 1000):
            store.delete(*keys[start:start + 1000])
    finally:
        store.close()


def start_service(models_dir: str, logs: Path, threads: int,
                  extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, str, str]:
    """`python -m service.run_local` on free ports, laid out as `make run` lays it out: a broker Redis and a cache
    Redis of its own (bounded by SKDCGN_CACHE_MAX_MEMORY, allkeys-lru), both started by run_local; stop it with
    stop_process. `extra_env` adds or overrides SKDCGN_* settings. Returns the process, the gateway URL, the broker
    Redis URL and the cache Redis URL."""
    port = free_port()
    redis_url, cache_url = (f"redis://127.0.0.1:{free_port()}/0" for _ in range(2))
    env = dict(os.environ, SKDCGN_MODELS_DIR=str(Path(models_dir).resolve()), SKDCGN_ORT_THREADS=str(threads),
               SKDCGN_REDIS_URL=redis_url, SKDCGN_CACHE_URL=cache_url, SKDCGN_JOBS_DIR=str(logs / "data" / "jobs"),
               **(extra_env or {}))
    process = subprocess.Popen([sys.executable, "-m", "service.run_local", "--port", str(port), "--logs", str(logs)],
                               cwd=REPO_ROOT, env=env, stdout=open(logs / "run_local.log", "ab"),
                               stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", redis_url, cache_url


def start_healthy(module: str, args: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m module --port <free> args...` from the repository, healthy (GET /healthz) when it returns."""
    port = free_port()
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args], cwd=REPO_ROOT, env=env,
                               stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 60, process)
    except BenchmarkError:
        stop_process(process)
        raise
    return process, url


def start_minimal(cache_url: str, logs: Path) -> tuple[subprocess.Popen, str]:
    """benchmarks/minimal_endpoint.py under uvicorn on a free port, reading `cache_url`."""
    return start_healthy("benchmarks.minimal_endpoint", ["--redis-url", cache_url], dict(os.environ),
                         logs / "minimal_endpoint.log")


def start_gateway(models_dir: str, redis_url: str, cache_url: str, logs: Path,
                  settings: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """One more gateway process (`python -m service`) on a free port over the same Redis, cache and workers, with
    SKDCGN_* `settings` (e.g. {"MAX_IN_FLIGHT": "64"}) on top of this environment; healthy when it returns."""
    env = dict(os.environ, SKDCGN_MODELS_DIR=str(Path(models_dir).resolve()), SKDCGN_REDIS_URL=redis_url,
               SKDCGN_CACHE_URL=cache_url, **{f"SKDCGN_{name}": str(value) for name, value in (settings or {}).items()})
    return start_healthy("service", [], env, logs / "gateway-overload.log")


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM (run_local stops its gateway, worker and Redis in order), SIGKILL after 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def host_info() -> dict:
    return {"cpus": os.cpu_count(), "load_average": list(os.getloadavg())}


def benchmark(url: str, redis_url: str, cache_url: str, model: str, models_dir: str, logs: Path,
              concurrencies=CONCURRENCY, duration_s: float = 10.0, wrk_threads: int = 1, ort_threads: int = 1,
              wrk_timeout_s: float = 30.0, raw_seconds: float = 3.0, job_n: int = 20_000, job_timeout_s: float = 300.0,
              drain_timeout_s: float = 40.0, ready_timeout_s: float = 180.0, distinct: int = DISTINCT,
              warm_concurrency: int = WARM_CONCURRENCY, overload_concurrency: int = OVERLOAD_CONCURRENCY,
              overload_max_in_flight: int = OVERLOAD_MAX_IN_FLIGHT, gateway_settings: dict[str, str] | None = None
              ) -> dict:
    """The raw engine; the one hit body and the `distinct` bodies put in the cache through the service (and their
    answers stored for the minimal endpoint); misses, hits, the minimal endpoint, hits over the distinct bodies and
    the minimal endpoint over them at each concurrency; misses past admission (against a gateway started here with
    SKDCGN_MAX_IN_FLIGHT=`overload_max_in_flight` and `gateway_settings`, or the service itself when that is 0);
    then one bulk job."""
    for location in (url, redis_url, cache_url):
        check_loopback(location)
    if distinct < 1:
        raise BenchmarkError(f"--distinct must be at least 1, not {distinct}")
    version = wrk_version()
    minimal = overloaded = None
    minimal_keys: list[str] = []
    run_seed = secrets.randbits(40)  # fresh seeds per run, so "misses" miss whatever the cache holds
    hit_seed = run_seed + (1 << 50)  # far from every miss seed (run_seed + level·2^44 + thread·2^32 + i)
    distinct_seed = run_seed + (1 << 51)  # and from the hit seed; all below 2^53, exact in Lua's doubles
    overload_seed = run_seed + 1000 * (1 << 40)  # past every level's miss seeds, below the hit seed
    try:
        latest = latest_version(models_dir, model)
    except ManifestError:
        latest = None
    with httpx.Client(base_url=url, timeout=60.0) as client:
        wait_ready(client, ready_timeout_s)
        result: dict = {"url": url, "model": model, "family": model, "latest_version": latest,
                        "duration_s": duration_s, "concurrency": list(concurrencies),
                        "wrk": {"version": version, "threads": wrk_threads, "timeout_s": wrk_timeout_s,
                                "script": str(WRK_SCRIPT.relative_to(REPO_ROOT))},
                        "onnxruntime_threads": ort_threads, "host_at_start": host_info(), "levels": []}
        # the workers' layout: their onnxruntime threads and the batch a job chunk is rendered at
        result["raw_engine"] = raw_engine(models_dir, model, ort_threads, Settings.from_env().batch_size,
                                          min_seconds=raw_seconds)
        one_body = request_body(model, hit_seed)
        primed = client.post("/counterfactual", content=one_body, headers=JSON_HEADERS)
        if primed.status_code != 200:
            raise BenchmarkError(f"POST /counterfactual answered {primed.status_code}: {primed.text[:300]}")
        answer = primed.json()
        result["version"], result["manifest_sha256"] = answer.get("version"), answer.get("manifest_sha256")
        result["hit_answer_bytes"] = len(primed.content)
        if latest is not None and result["version"] != latest:
            print(f"warning: the service answered with {model}/{result['version']}, but {models_dir} says LATEST is "
                  f"{latest}", file=sys.stderr, flush=True)
        try:
            bodies = [request_body(model, distinct_seed + i) for i in range(distinct)]
            answers, result["warm"] = warm(url, bodies, warm_concurrency)
            print(f"warmed {distinct:,} distinct bodies in {result['warm']['seconds']:.1f} s "
                  f"({result['warm']['answers_per_second']:,.0f}/s, statuses {result['warm']['statuses']})", flush=True)
            minimal_keys = store_minimal(cache_url, [one_body, *bodies], [as_cache_hit(primed.content), *answers])
            result["distinct"] = {"bodies": distinct, "first_seed": distinct_seed,
                                  "draw": "a seed drawn uniformly at random per request"}
            drain(redis_url, drain_timeout_s)  # and the gateway's cache writes of the last warm answers
            minimal, result["minimal_url"] = start_minimal(cache_url, logs)
            for level, concurrency in enumerate(concurrencies):
                point = {"concurrency": concurrency}
                point["miss"] = run_wrk(url, "miss", model, run_seed + level * (1 << 44), concurrency, duration_s,
                                        wrk_threads, wrk_timeout_s)
                point["drain_seconds"] = drain(redis_url, drain_timeout_s)
                point["hit"] = run_wrk(url, "hit", model, hit_seed, concurrency, duration_s, wrk_threads,
                                       wrk_timeout_s)
                point["minimal"] = run_wrk(result["minimal_url"], "hit", model, hit_seed, concurrency, duration_s,
                                           wrk_threads, wrk_timeout_s)
                point["hit_distinct"] = run_wrk(url, "distinct", model, distinct_seed, concurrency, duration_s,
                                                wrk_threads, wrk_timeout_s, count=distinct)
                point["minimal_distinct"] = run_wrk(result["minimal_url"], "distinct", model, distinct_seed,
                                                    concurrency, duration_s, wrk_threads, wrk_timeout_s,
                                                    count=distinct)
                result["levels"].append(point)
                print(f"concurrency {concurrency}: " + ", ".join(
                    f"{kind} {point[kind]['ok_per_second']:,.0f}/s p50 {fmt(point[kind]['p50_ms'])} ms "
                    f"p99 {fmt(point[kind]['p99_ms'])} ms" for kind in KINDS), flush=True)
            stop_process(minimal)
            minimal = None
            overload_url = url
            if overload_max_in_flight:
                settings = {"MAX_IN_FLIGHT": str(overload_max_in_flight), **(gateway_settings or {})}
                overloaded, overload_url = start_gateway(models_dir, redis_url, cache_url, logs, settings)
                with httpx.Client(base_url=overload_url, timeout=60.0) as side:
                    wait_ready(side, ready_timeout_s)
            point = run_wrk(overload_url, "miss", model, overload_seed, overload_concurrency, duration_s, wrk_threads,
                            wrk_timeout_s)
            result["overload"] = {"url": overload_url, "concurrency": overload_concurrency,
                                  "max_in_flight": overload_max_in_flight or None, "miss": point,
                                  "drain_seconds": drain(redis_url, drain_timeout_s)}
            limit = overload_max_in_flight or "the service's own"
            print(f"past admission (concurrency {overload_concurrency}, max in flight {limit}): "
                  f"statuses {point['statuses']}, "
                  f"{point['retry_after_429']:,} 429s with Retry-After, socket errors {point['socket_errors']}",
                  flush=True)
        finally:
            for process in (minimal, overloaded):
                if process is not None:
                    stop_process(process)
            if minimal_keys:
                try:
                    remove_minimal(cache_url, minimal_keys)
                except redis.RedisError as exc:  # they expire after MINIMAL_TTL_S anyway
                    print(f"warning: could not delete the minimal endpoint's keys: {exc}", file=sys.stderr)
        result["job"] = run_job(client, model, job_n, run_seed, job_timeout_s)
    result["host_at_end"] = host_info()
    result["targets"] = targets(result)
    return result


# --- targets, Markdown, plot ---------------------------------------------------------------------------------------

def fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def point_at(result: dict, concurrency: int, kind: str) -> dict | None:
    return next((level[kind] for level in result["levels"] if level["concurrency"] == concurrency), None)


def target(name: str, value, shown: str, met) -> dict:
    return {"target": name, "value": value, "shown": shown, "met": met}


def socket_errors(point: dict) -> int:
    return sum(point["socket_errors"].values())


def answers_shown(kind: str, point: dict) -> str:
    others = ", ".join(f"{k}: {v}" for k, v in point["statuses"].items() if k != "200") or "none"
    return (f"{kind}: {point['answered']:,} answers, {point['non_2xx']} non-2xx ({others}), "
            f"{socket_errors(point)} socket errors")


def distinct_count(result: dict) -> int | None:
    return (result.get("distinct") or {}).get("bodies")


def overload_name(result: dict) -> str:
    overload = result.get("overload")
    if not overload:
        return "past admission: overload answered 429 with Retry-After, never 5xx"
    against = (f"a gateway with SKDCGN_MAX_IN_FLIGHT={overload['max_in_flight']}" if overload.get("max_in_flight")
               else "the service's own gateway")
    return (f"past admission (misses at concurrency {overload['concurrency']} against {against}): "
            "429 with Retry-After, never 5xx")


def targets(result: dict) -> list[dict]:
    """The serving targets, each with its measured value and whether it was met (None: not measured)."""
    raw, job = result.get("raw_engine"), result.get("job") or {}
    engine = raw["with_noise_and_composition_images_per_second"] if raw else None
    c = TARGET_CONCURRENCY
    miss, hit, minimal, hit_distinct, minimal_distinct = (point_at(result, c, kind) for kind in KINDS)
    found = []

    share = miss["ok_per_second"] / engine if miss and engine else None
    found.append(target(f"n = 1 misses/s at concurrency {c} ≥ {MISS_TARGET:.0%} of the raw engine (aim {MISS_AIM:.0%})",
                        share, "–" if share is None else
                        f"{share:.0%} ({miss['ok_per_second']:,.0f} vs {engine:,.0f} images/s)",
                        None if share is None else share >= MISS_TARGET))

    share = hit["ok_per_second"] / minimal["ok_per_second"] if hit and minimal and minimal["ok_per_second"] else None
    found.append(target(f"cache hits/s of one repeated body at concurrency {c} ≥ {HIT_TARGET:.0%} of the minimal "
                        "endpoint", share,
                        "–" if share is None else
                        f"{share:.0%} ({hit['ok_per_second']:,.0f} vs {minimal['ok_per_second']:,.0f} /s)",
                        None if share is None else share >= HIT_TARGET))

    count = distinct_count(result)
    name = (f"cache hits/s over {count:,} distinct cached requests at concurrency {c} ≥ {HIT_TARGET:.0%} of the "
            "minimal endpoint over the same bodies, 0 errors" if count else
            f"cache hits/s over {DISTINCT:,} distinct cached requests at concurrency {c} ≥ {HIT_TARGET:.0%} of the "
            "minimal endpoint over the same bodies, 0 errors")
    if hit_distinct and minimal_distinct and minimal_distinct["ok_per_second"]:
        share = hit_distinct["ok_per_second"] / minimal_distinct["ok_per_second"]
        errors = {kind: p["non_2xx"] + socket_errors(p)
                  for kind, p in (("hit", hit_distinct), ("minimal", minimal_distinct))}
        not_hits = hit_distinct["ok"] - hit_distinct["x_cache"].get("hit", 0)
        shown = (f"{share:.0%} ({hit_distinct['ok_per_second']:,.0f} vs {minimal_distinct['ok_per_second']:,.0f} /s); "
                 f"errors: hit {errors['hit']:,}, minimal {errors['minimal']:,}; answers not from the cache: "
                 f"{not_hits:,}")
        found.append(target(name, share, shown,
                            share >= HIT_TARGET and sum(errors.values()) == 0 and not_hits == 0
                            and hit_distinct["answered"] > 0))
    else:
        found.append(target(name, None, "–", None))

    tails = (hit["p99_over_p50"], minimal["p99_over_p50"]) if hit and minimal else (None, None)
    measured = None not in tails
    found.append(target(f"cache-hit p99/p50 at concurrency {c} no worse than the minimal endpoint's",
                        tails[0] if measured else None,
                        f"{tails[0]:.2f} vs {tails[1]:.2f}" if measured else "–",
                        tails[0] <= tails[1] if measured else None))

    if miss and hit:
        checked = [("miss", miss), ("hit", hit)]
        checked += [("hit over distinct bodies", hit_distinct)] if hit_distinct else []
        bad = sum(p["non_2xx"] + socket_errors(p) for _, p in checked)
        found.append(target(f"every answer 200 at concurrency {c}, n = 1", bad,
                            "; ".join(answers_shown(kind, p) for kind, p in checked),
                            bad == 0 and all(p["answered"] > 0 for _, p in checked)))
    else:
        found.append(target(f"every answer 200 at concurrency {c}, n = 1", None, "–", None))

    overload = (result.get("overload") or {}).get("miss")
    if overload:
        statuses = overload["statuses"]
        server_errors = sum(v for k, v in statuses.items() if k.startswith("5"))
        too_many = statuses.get("429", 0)
        shown = (f"429: {fmt(100 * (overload['share_429'] or 0))} % ({too_many:,} of {overload['answered']:,}, "
                 f"{overload['retry_after_429']:,} with Retry-After); 5xx: {server_errors:,}; 2xx: "
                 f"{overload['ok_per_second']:,.0f}/s; statuses "
                 + ", ".join(f"{k}: {v:,}" for k, v in statuses.items())
                 + f"; socket errors {socket_errors(overload)}"
                 + ("" if too_many else "; no 429 observed: admission was never exceeded, so this shows nothing "
                                        "about overload"))
        found.append(target(overload_name(result), overload["share_429"], shown,
                            too_many > 0 and overload["retry_after_429"] == too_many and server_errors == 0
                            and socket_errors(overload) == 0))
    else:
        found.append(target(overload_name(result), None, "–", None))

    bulk = job["images_per_second"] / engine if job.get("images_per_second") and engine else None
    found.append(target(f"bulk job ≥ {BULK_TARGET:.0%} of the raw engine", bulk,
                        "–" if bulk is None else
                        f"{bulk:.0%} ({job['images_per_second']:,.0f} vs {engine:,.0f} images/s)",
                        None if bulk is None else bulk >= BULK_TARGET))

    first = point_at(result, 1, "hit")
    p50 = first["p50_ms"] if first else None
    found.append(target(f"cache-hit p50 ≤ {CACHE_HIT_P50_TARGET_MS:g} ms at concurrency 1 (one repeated body)", p50,
                        "–" if p50 is None else f"{p50:.1f} ms"
                        + (f" ({fmt(point_at(result, 1, 'hit_distinct')['p50_ms'])} ms over the distinct bodies)"
                           if point_at(result, 1, "hit_distinct") else ""),
                        None if p50 is None else p50 <= CACHE_HIT_P50_TARGET_MS))
    return found


def kind_label(kind: str, result: dict) -> str:
    count = distinct_count(result)
    return {"hit": "hit, 1 body", "minimal": "minimal, 1 body",
            "hit_distinct": f"hit, {count:,} bodies" if count else "hit, distinct bodies",
            "minimal_distinct": f"minimal, {count:,} bodies" if count else "minimal, distinct bodies"}.get(kind, kind)


def table_row(concurrency, load: str, p: dict) -> list:
    errors = socket_errors(p)
    return [concurrency, load, f"{p['answered']:,}", fmt(p["ok_per_second"]), fmt(p["p50_ms"]), fmt(p["p90_ms"]),
            fmt(p["p99_ms"]), fmt(p["p99_over_p50"], 2),
            ", ".join(f"{k}: {v:,}" for k, v in p["statuses"].items()) or "–",
            f"{errors} ({', '.join(f'{k} {v}' for k, v in p['socket_errors'].items() if v)})" if errors else "0",
            ", ".join(f"{k}: {v:,}" for k, v in sorted(p["x_cache"].items())) or "–"]


def markdown(result: dict, plot_name: str, note: str = "") -> str:
    rows = [table_row(level["concurrency"], kind_label(kind, result), level[kind])
            for level in result["levels"] for kind in KINDS if kind in level]
    overload = result.get("overload")
    if overload:
        limit = (f"SKDCGN_MAX_IN_FLIGHT={overload['max_in_flight']}" if overload.get("max_in_flight")
                 else "the service's own limit")
        rows.append(table_row(overload["concurrency"], f"miss, past admission ({limit})", overload["miss"]))
    raw, job, wrk = result["raw_engine"], result["job"], result["wrk"]
    count, warmed = distinct_count(result), result.get("warm")
    family = result.get("family", result["model"])
    latest = result.get("latest_version")
    measured = f"{family}/{result.get('version')}"
    if latest and latest != result.get("version"):
        measured += f" (LATEST was {latest}: the service did not serve LATEST)"
    text = (f"`{wrk['version']}` ({wrk['threads']} thread(s), script `{wrk['script']}`) against `{result['url']}`, "
            f"{result['duration_s']:g} s per point, model {measured}. POST /counterfactual with n = 1: **miss** a "
            "fresh seed per request, **hit, 1 body** the same body every request (requested once beforehand; the "
            "gateway's repeats memo answers it before FastAPI, the best case)")
    if count:
        text += (f", **hit, {count:,} bodies** one of {count:,} distinct bodies per request, its seed drawn at random "
                 f"(all {count:,} requested once beforehand through the service")
        if warmed:
            text += (f", {warmed['concurrency']} at a time: {warmed['seconds']:.1f} s, "
                     f"{warmed['answers_per_second']:,.0f} answers/s")
        text += ", so the cache entries are the service's own)"
    text += (f"; **minimal** the same requests to FastAPI + a sha256 of the body + one Redis GET "
             f"(`benchmarks/minimal_endpoint.py`, same Redis, same uvicorn settings) returning the service's stored "
             f"answer for that body ({result['hit_answer_bytes']:,} bytes for the one body).")
    if overload:
        text += (f" **Past admission**: misses at concurrency {overload['concurrency']} against "
                 + (f"a second gateway process over the same Redis and worker, started with "
                    f"SKDCGN_MAX_IN_FLIGHT={overload['max_in_flight']}" if overload.get("max_in_flight")
                    else "the service itself")
                 + f" ({overload['miss']['retry_after_429']:,} of its 429s carried Retry-After).")
    text += (f" Latency percentiles are wrk's, over every answer (429s included). Host: "
             f"{result['host_at_start']['cpus']} CPUs, load average {result['host_at_start']['load_average'][0]:.1f} "
             f"at start, {result['host_at_end']['load_average'][0]:.1f} at end; the load generator shares them with "
             "the service.")
    lines = [
        f"### Serving benchmark: {result['model']}/{result.get('version')}",
        "",
        text,
        "",
        report.table(["concurrency", "load", "answers", "2xx/s", "p50 ms", "p90 ms", "p99 ms", "p99/p50", "statuses",
                      "socket errors", "X-Cache"], rows),
        "",
        f"Raw engine, same students ({raw['version']}), same run: `ModelRuntime.run_fused` at batch {raw['batch']}, "
        f"{raw['onnxruntime_threads']} onnxruntime thread(s) (the worker's), {raw['provider']}: "
        f"{raw['fused_images_per_second']:,.0f} images/s (fused graph only), "
        f"{raw['with_noise_and_composition_images_per_second']:,.0f} images/s with noise, composition and uint8 "
        "(the figure the targets use).",
        f"Bulk job (npz, n = {job['n']:,}): state {job['state']} after {job['seconds']:.1f} s"
        + (f", {job['images_per_second']:,.0f} images/s." if job["images_per_second"] else "."),
    ]
    verdict = {True: "pass", False: "**fail**", None: "not measured"}
    lines += ["", report.table(["target", "measured", "met"],
                               [[t["target"], t["shown"], verdict[t["met"]]] for t in result["targets"]])]
    lines += ["", f"![throughput and latency against concurrency]({plot_name})"]
    if note:
        lines += ["", note]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    x = [level["concurrency"] for level in levels]
    colours = {"miss": "tab:red", "hit": "tab:blue", "minimal": "tab:grey", "hit_distinct": "tab:green",
               "minimal_distinct": "black"}
    count = distinct_count(result)
    labels = {"miss": "miss (rendered)", "hit": "cache hit, 1 body", "minimal": "minimal FastAPI + Redis GET, 1 body",
              "hit_distinct": f"cache hit, {count or 0:,} bodies",
              "minimal_distinct": f"minimal, {count or 0:,} bodies"}
    kinds = [kind for kind in KINDS if levels and all(kind in level for level in levels)]
    fig, (rate, latency) = plt.subplots(1, 2, figsize=(11, 4.6))
    for kind in kinds:
        style = "-" if kind in ("miss", "hit", "minimal") else "-."
        rate.plot(x, [level[kind]["ok_per_second"] for level in levels], "o" + style, color=colours[kind],
                  label=labels[kind])
        latency.plot(x, [level[kind]["p50_ms"] for level in levels], "o" + style, color=colours[kind],
                     label=f"{kind_label(kind, result)} p50")
        latency.plot(x, [level[kind]["p99_ms"] for level in levels], "s:", color=colours[kind],
                     label=f"{kind_label(kind, result)} p99")
    ticks = list(x)
    overload = result.get("overload")
    if overload:
        point, over = overload["miss"], overload["concurrency"]
        seconds = point["seconds"] or 1
        limit = overload.get("max_in_flight") or "service's"
        rate.plot([over], [point["ok_per_second"]], "*", color="tab:red", ms=11,
                  label=f"miss past admission (max in flight {limit}): 2xx")
        rate.plot([over], [max(point["statuses"].get("429", 0) / seconds, 1e-1)], "X", color="tab:orange", ms=9,
                  label="… and 429 with Retry-After")
        if point["p50_ms"] is not None:
            latency.plot([over], [point["p50_ms"]], "*", color="tab:red", ms=11, label="past admission p50")
            latency.plot([over], [point["p99_ms"]], "X", color="tab:red", ms=9, label="past admission p99")
        ticks.append(over)
    engine = result["raw_engine"]["with_noise_and_composition_images_per_second"]
    rate.axhline(engine, color="black", lw=1, label=f"raw engine, batch {result['raw_engine']['batch']}")
    rate.axhline(MISS_TARGET * engine, color="tab:red", lw=1, ls=":", label=f"miss target ({MISS_TARGET:.0%} of raw)")
    for ax in (rate, latency):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.set_xlabel("concurrency (wrk connections)")
        ax.grid(alpha=0.3)
    rate.set_yscale("log")
    rate.set_ylabel("answers / s")
    rate.set_title("throughput (n = 1)")
    rate.legend(fontsize=6)
    latency.set_yscale("log")
    latency.set_ylabel("latency (ms)")
    latency.set_title("p50 and p99")
    latency.legend(fontsize=6, ncol=2)
    fig.suptitle(f"POST /counterfactual: {result.get('family', result['model'])}/{result.get('version')}, "
                 f"{result['duration_s']:g} s per point")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running service on loopback, e.g. http://127.0.0.1:8000")
    where.add_argument("--start", action="store_true", help="start python -m service.run_local for this run")
    parser.add_argument("--redis-url", default=settings.redis_url,
                        help="with --url: the service's broker Redis (its interactive queue is drained between "
                             "points; default SKDCGN_REDIS_URL)")
    parser.add_argument("--cache-url", default=None,
                        help="with --url: the service's cache Redis, read by the minimal endpoint (default "
                             "SKDCGN_CACHE_URL, else --redis-url)")
    parser.add_argument("--model", default=settings.default_model)
    parser.add_argument("--models-dir", default=str(settings.paths.models_dir),
                        help="the service's model repository (for --start and the raw engine)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)),
                        help="wrk connections, comma-separated")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per point (each kind, each concurrency)")
    parser.add_argument("--threads", type=int, default=settings.ort_threads,
                        help="onnxruntime threads of the started worker and of the raw engine (default "
                             "SKDCGN_ORT_THREADS, the worker's; with --url, give the running worker's)")
    parser.add_argument("--wrk-threads", type=int, default=1,
                        help="wrk threads (at most the concurrency); one drives far more than the service answers")
    parser.add_argument("--wrk-timeout", type=float, default=settings.sync_timeout_s + 5,
                        help="seconds before wrk counts a request as timed out")
    parser.add_argument("--distinct", type=int, default=DISTINCT,
                        help="distinct cached bodies of the hit_distinct and minimal_distinct points (fewer only for "
                             "a quick check of the harness)")
    parser.add_argument("--warm-concurrency", type=int, default=WARM_CONCURRENCY,
                        help="concurrent n = 1 requests that put the distinct bodies in the cache beforehand")
    parser.add_argument("--overload-concurrency", type=int, default=OVERLOAD_CONCURRENCY,
                        help="wrk connections of the point past admission")
    parser.add_argument("--overload-max-in-flight", type=int, default=OVERLOAD_MAX_IN_FLIGHT,
                        help="SKDCGN_MAX_IN_FLIGHT of the extra gateway started for the point past admission (over "
                             "the same Redis and workers); 0: run that point against the service itself")
    parser.add_argument("--raw-seconds", type=float, default=3.0, help="minimum seconds per raw-engine variant")
    parser.add_argument("--job-n", type=int, default=20_000,
                        help="samples of the bulk job: enough chunks that its throughput, not the fixed cost of "
                             "submitting and assembling, is what is compared with the raw engine")
    parser.add_argument("--job-timeout", type=float, default=300.0)
    parser.add_argument("--note", default="", help="a line added under the written section")
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--results-md", default="docs/RESULTS.md", help=f"its folder also receives {PLOT_NAME}")
    args = parser.parse_args(argv)
    if min(args.distinct, args.warm_concurrency, args.overload_concurrency) < 1 or args.overload_max_in_flight < 0:
        parser.error("--distinct, --warm-concurrency and --overload-concurrency must be at least 1, "
                     "--overload-max-in-flight at least 0")
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    gateway_settings = {}
    process, logs = None, Path(tempfile.mkdtemp(prefix="skdcgn-bench-"))
    try:
        wrk_path()
        url, redis_url = args.url, args.redis_url
        cache_url = args.cache_url or (settings.cache_url if args.redis_url == settings.redis_url else args.redis_url)
        if args.start:
            process, url, redis_url, cache_url = start_service(args.models_dir, logs, args.threads)
            gateway_settings["JOBS_DIR"] = str(logs / "data" / "jobs")  # the started service's
        result = benchmark(url, redis_url, cache_url, args.model, args.models_dir, logs, concurrencies,
                           args.duration, args.wrk_threads, args.threads, args.wrk_timeout, args.raw_seconds,
                           args.job_n, args.job_timeout, distinct=args.distinct,
                           warm_concurrency=args.warm_concurrency, overload_concurrency=args.overload_concurrency,
                           overload_max_in_flight=args.overload_max_in_flight, gateway_settings=gateway_settings)
    except (BenchmarkError, httpx.HTTPError, redis.RedisError) as exc:
        print(f"error: {exc} (logs of what was started here: {logs})", file=sys.stderr)
        return 1
    finally:
        if process is not None:
            stop_process(process)
    report.write_json(Path(args.results_dir) / f"serving_{args.model}.json", result)
    plot_path = Path(args.results_md).parent / PLOT_NAME
    plot(result, plot_path)
    body = markdown(result, plot_path.name, args.note)
    report.update_section(args.results_md, f"bench-serving-{args.model}", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
