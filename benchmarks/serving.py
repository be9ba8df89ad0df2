"""Serving benchmark: `wrk` (a compiled load generator) against the HTTP API on loopback, beside the raw engine.

A Python client saturates a core before the gateway does, so the load comes from `wrk` (Debian package `wrk`)
driven by benchmarks/wrk/counterfactual.lua, whose `done` hook prints latency percentiles, status counts,
429s carrying Retry-After and X-Cache counts as JSON. For each concurrency (1, 8, 32, 128 by default), each
point lasting --duration seconds:

* miss: POST /counterfactual, n = 1, a fresh seed per request (so every request is rendered by a worker);
* hit: the same body every request (requested once beforehand, so every answer comes from the batch cache);
* minimal: the same requests against benchmarks/minimal_endpoint.py (FastAPI + one Redis GET of a stored
  cache-hit answer), started here under uvicorn on a free port, against the service's cache Redis.

Also measured in the same run: the raw engine (the same students' fused graph through
core.runtime.ModelRuntime.run_fused at batch 256, with the worker's onnxruntime thread count, with and
without noise drawing, composition and uint8), and one bulk POST /jobs timed from submission to `succeeded`.
Every figure is printed beside its target. Outputs: benchmarks/results/serving_<model>.json, a section of
docs/RESULTS.md and docs/serving_concurrency.png, all from the same result. Only loopback URLs are accepted.

    python -m benchmarks.serving --start                              # Redis + worker + gateway, started here
    python -m benchmarks.serving --url http://127.0.0.1:8000          # a service already running (its Redis:
                                                                      #   --redis-url, default SKDCGN_REDIS_URL)
    python -m benchmarks.serving --start --duration 2 --concurrency 1,8   # a quick check of the harness
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import redis

from benchmarks.minimal_endpoint import KEY as MINIMAL_KEY
from core.compose import compose_samples
from core.imageio import to_uint8
from core.messages import INTERACTIVE_QUEUE
from core.noise import MECHANISMS, draw_sample_noise
from core.runtime import ModelRuntime
from core.settings import Settings
from training.evaluation import report
from training.plots import save_figure

REPO_ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "counterfactual.lua"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CONCURRENCY = (1, 8, 32, 128)
KINDS = ("miss", "hit", "minimal")
FINAL_STATES = {"succeeded", "failed", "cancelled"}
PERCENTILES = {"p50_ms": "50", "p90_ms": "90", "p99_ms": "99", "p999_ms": "99.9"}
PLOT_NAME = "serving_concurrency.png"

# Targets (the issue's): each is reported with its measured value and met / not met / not measured.
TARGET_CONCURRENCY = 32
OVERLOAD_CONCURRENCY = 128
MISS_TARGET, MISS_AIM = 0.40, 0.50  # n = 1 misses/s over the raw engine's images/s (noise + composition)
HIT_TARGET = 0.50  # cache hits/s over the minimal endpoint's answers/s
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


def run_wrk(url: str, mode: str, model: str, seed: int, concurrency: int, duration_s: float, threads: int = 1,
            timeout_s: float = 30.0) -> dict:
    """wrk with the counterfactual script against url/counterfactual: `mode` "miss" (fresh seeds from `seed` on)
    or "hit" (the body of `seed`, every request)."""
    check_loopback(url)
    command = [wrk_path(), f"-t{max(1, min(threads, concurrency))}", f"-c{concurrency}", f"-d{duration_s:g}s",
               "--timeout", f"{timeout_s:g}s", "-s", str(WRK_SCRIPT), f"{url.rstrip('/')}/counterfactual",
               "--", mode, model, str(seed)]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + timeout_s + 60)
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(f"wrk did not finish: {' '.join(command)}") from exc
    if run.returncode != 0:
        raise BenchmarkError(f"wrk exited with {run.returncode}: {run.stderr.strip()[-500:]}")
    return summarise(parse_wrk(run.stdout), concurrency)


def hit_body(model: str, seed: int) -> dict:
    """The body the Lua script sends for `seed` (labels cycle with the seed)."""
    return {"model": model, "shape": seed % 10, "texture": (seed // 10) % 10, "background": (seed // 100) % 10,
            "n": 1, "seed": seed}


def raw_engine(models_dir: str, family: str, threads: int, batch: int = 256, min_seconds: float = 3.0) -> dict:
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(models_dir: str, logs: Path, threads: int) -> tuple[subprocess.Popen, str, str]:
    """`python -m service.run_local` on free ports with its own Redis (broker and cache); stop it with
    stop_process. Returns the process, the gateway URL and the Redis URL."""
    port, redis_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = dict(os.environ, SKDCGN_MODELS_DIR=str(Path(models_dir).resolve()), SKDCGN_ORT_THREADS=str(threads),
               SKDCGN_REDIS_URL=redis_url, SKDCGN_CACHE_URL=redis_url, SKDCGN_JOBS_DIR=str(logs / "data" / "jobs"))
    process = subprocess.Popen([sys.executable, "-m", "service.run_local", "--port", str(port), "--logs", str(logs)],
                               cwd=REPO_ROOT, env=env, stdout=open(logs / "run_local.log", "ab"),
                               stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", redis_url


def start_minimal(cache_url: str, logs: Path) -> tuple[subprocess.Popen, str]:
    """benchmarks/minimal_endpoint.py under uvicorn on a free port, reading `cache_url`."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.minimal_endpoint", "--port", str(port),
                                "--redis-url", cache_url], cwd=REPO_ROOT, env=env,
                               stdout=open(logs / "minimal_endpoint.log", "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 60, process)
    except BenchmarkError:
        stop_process(process)
        raise
    return process, url


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
              wrk_timeout_s: float = 30.0, raw_seconds: float = 3.0, job_n: int = 2000, job_timeout_s: float = 300.0,
              drain_timeout_s: float = 40.0, ready_timeout_s: float = 180.0) -> dict:
    """The raw engine, then misses, hits and the minimal endpoint at each concurrency, then one bulk job."""
    for location in (url, redis_url, cache_url):
        check_loopback(location)
    version = wrk_version()
    minimal = None
    run_seed = secrets.randbits(40)  # fresh seeds per run, so "misses" miss whatever the cache holds
    with httpx.Client(base_url=url, timeout=60.0) as client:
        wait_ready(client, ready_timeout_s)
        result: dict = {"url": url, "model": model, "duration_s": duration_s, "concurrency": list(concurrencies),
                        "wrk": {"version": version, "threads": wrk_threads, "timeout_s": wrk_timeout_s,
                                "script": str(WRK_SCRIPT.relative_to(REPO_ROOT))},
                        "onnxruntime_threads": ort_threads, "host_at_start": host_info(), "levels": []}
        result["raw_engine"] = raw_engine(models_dir, model, ort_threads, min_seconds=raw_seconds)
        hit_seed = run_seed + (1 << 50)  # far from every miss seed (run_seed + level·2^44 + thread·2^32 + i)
        primed = client.post("/counterfactual", json=hit_body(model, hit_seed))
        if primed.status_code != 200:
            raise BenchmarkError(f"POST /counterfactual answered {primed.status_code}: {primed.text[:300]}")
        result["version"] = primed.json().get("version")
        result["hit_answer_bytes"] = len(primed.content)
        store = redis.Redis.from_url(cache_url, socket_connect_timeout=2, socket_timeout=5)
        try:
            store.set(MINIMAL_KEY, primed.content, ex=24 * 3600)
        finally:
            store.close()
        try:
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
                result["levels"].append(point)
                print(f"concurrency {concurrency}: " + ", ".join(
                    f"{kind} {point[kind]['ok_per_second']:,.0f}/s p50 {fmt(point[kind]['p50_ms'])} ms "
                    f"p99 {fmt(point[kind]['p99_ms'])} ms" for kind in KINDS), flush=True)
        finally:
            if minimal is not None:
                stop_process(minimal)
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


def targets(result: dict) -> list[dict]:
    """The serving targets, each with its measured value and whether it was met (None: not measured)."""
    raw, job = result.get("raw_engine"), result.get("job") or {}
    engine = raw["with_noise_and_composition_images_per_second"] if raw else None
    c, over = TARGET_CONCURRENCY, OVERLOAD_CONCURRENCY
    miss, hit, minimal = (point_at(result, c, kind) for kind in KINDS)
    found = []

    share = miss["ok_per_second"] / engine if miss and engine else None
    found.append(target(f"n = 1 misses/s at concurrency {c} ≥ {MISS_TARGET:.0%} of the raw engine (aim {MISS_AIM:.0%})",
                        share, "–" if share is None else
                        f"{share:.0%} ({miss['ok_per_second']:,.0f} vs {engine:,.0f} images/s)",
                        None if share is None else share >= MISS_TARGET))

    share = hit["ok_per_second"] / minimal["ok_per_second"] if hit and minimal and minimal["ok_per_second"] else None
    found.append(target(f"cache hits/s at concurrency {c} ≥ {HIT_TARGET:.0%} of the minimal endpoint", share,
                        "–" if share is None else
                        f"{share:.0%} ({hit['ok_per_second']:,.0f} vs {minimal['ok_per_second']:,.0f} /s)",
                        None if share is None else share >= HIT_TARGET))

    tails = (hit["p99_over_p50"], minimal["p99_over_p50"]) if hit and minimal else (None, None)
    measured = None not in tails
    found.append(target(f"cache-hit p99/p50 at concurrency {c} no worse than the minimal endpoint's",
                        tails[0] if measured else None,
                        f"{tails[0]:.2f} vs {tails[1]:.2f}" if measured else "–",
                        tails[0] <= tails[1] if measured else None))

    if miss and hit:
        bad = {kind: p["non_2xx"] + sum(p["socket_errors"].values()) for kind, p in (("miss", miss), ("hit", hit))}
        shown = "; ".join(f"{kind}: {p['answered']:,} answers, {p['non_2xx']} non-2xx "
                          f"({', '.join(f'{k}: {v}' for k, v in p['statuses'].items() if k != '200') or 'none'}), "
                          f"{sum(p['socket_errors'].values())} socket errors"
                          for kind, p in (("miss", miss), ("hit", hit)))
        found.append(target(f"every answer 200 at concurrency {c}, n = 1", sum(bad.values()), shown,
                             sum(bad.values()) == 0 and miss["answered"] > 0 and hit["answered"] > 0))
    else:
        found.append(target(f"every answer 200 at concurrency {c}, n = 1", None, "–", None))

    overload = point_at(result, over, "miss")
    if overload:
        statuses = overload["statuses"]
        server_errors = sum(v for k, v in statuses.items() if k.startswith("5"))
        too_many = statuses.get("429", 0)
        shown = (f"429: {fmt(100 * (overload['share_429'] or 0))} % ({too_many:,} of {overload['answered']:,}, "
                 f"{overload['retry_after_429']:,} with Retry-After); 503: {statuses.get('503', 0)}; statuses "
                 + ", ".join(f"{k}: {v:,}" for k, v in statuses.items())
                 + f"; socket errors {sum(overload['socket_errors'].values())}")
        found.append(target(f"misses at concurrency {over}: overload answered 429 with Retry-After, never 5xx",
                            overload["share_429"], shown,
                            server_errors == 0 and overload["retry_after_429"] == too_many))
    else:
        found.append(target(f"misses at concurrency {over}: overload answered 429 with Retry-After, never 5xx",
                            None, "–", None))

    bulk = job["images_per_second"] / engine if job.get("images_per_second") and engine else None
    found.append(target(f"bulk job ≥ {BULK_TARGET:.0%} of the raw engine", bulk,
                        "–" if bulk is None else
                        f"{bulk:.0%} ({job['images_per_second']:,.0f} vs {engine:,.0f} images/s)",
                        None if bulk is None else bulk >= BULK_TARGET))

    first = point_at(result, 1, "hit")
    p50 = first["p50_ms"] if first else None
    found.append(target(f"cache-hit p50 ≤ {CACHE_HIT_P50_TARGET_MS:g} ms at concurrency 1", p50,
                        "–" if p50 is None else f"{p50:.1f} ms",
                        None if p50 is None else p50 <= CACHE_HIT_P50_TARGET_MS))
    return found


def markdown(result: dict, plot_name: str, note: str = "") -> str:
    rows = []
    for level in result["levels"]:
        for kind in KINDS:
            p = level[kind]
            errors = sum(p["socket_errors"].values())
            rows.append([level["concurrency"], kind, f"{p['answered']:,}", fmt(p["ok_per_second"]),
                         fmt(p["p50_ms"]), fmt(p["p90_ms"]), fmt(p["p99_ms"]), fmt(p["p99_over_p50"], 2),
                         ", ".join(f"{k}: {v:,}" for k, v in p["statuses"].items()) or "–",
                         f"{errors} ({', '.join(f'{k} {v}' for k, v in p['socket_errors'].items() if v)})" if errors
                         else "0",
                         ", ".join(f"{k}: {v:,}" for k, v in sorted(p["x_cache"].items())) or "–"])
    raw, job, wrk = result["raw_engine"], result["job"], result["wrk"]
    lines = [
        f"### Serving benchmark: {result['model']}/{result.get('version')}",
        "",
        f"`{wrk['version']}` ({wrk['threads']} thread(s), script `{wrk['script']}`) against `{result['url']}`, "
        f"{result['duration_s']:g} s per point. POST /counterfactual with n = 1: **miss** a fresh seed per request, "
        f"**hit** the same body every request (requested once beforehand), **minimal** the same requests to "
        f"FastAPI + one Redis GET (`benchmarks/minimal_endpoint.py`, same Redis, same uvicorn settings) returning "
        f"the stored hit answer ({result['hit_answer_bytes']:,} bytes). Latency percentiles are wrk's, over every "
        f"answer (429s included). Host: {result['host_at_start']['cpus']} CPUs, load average "
        f"{result['host_at_start']['load_average'][0]:.1f} at start, {result['host_at_end']['load_average'][0]:.1f} "
        "at end; the load generator shares them with the service.",
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
    colours = {"miss": "tab:red", "hit": "tab:blue", "minimal": "tab:grey"}
    labels = {"miss": "miss (rendered)", "hit": "cache hit", "minimal": "minimal FastAPI + Redis GET"}
    fig, (rate, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in KINDS:
        rate.plot(x, [level[kind]["ok_per_second"] for level in levels], "o-", color=colours[kind], label=labels[kind])
        latency.plot(x, [level[kind]["p50_ms"] for level in levels], "o-", color=colours[kind], label=f"{kind} p50")
        latency.plot(x, [level[kind]["p99_ms"] for level in levels], "s--", color=colours[kind], label=f"{kind} p99")
    engine = result["raw_engine"]["with_noise_and_composition_images_per_second"]
    rate.axhline(engine, color="black", lw=1, label=f"raw engine, batch {result['raw_engine']['batch']}")
    rate.axhline(MISS_TARGET * engine, color="tab:red", lw=1, ls=":", label=f"miss target ({MISS_TARGET:.0%} of raw)")
    for ax in (rate, latency):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(c) for c in x])
        ax.set_xlabel("concurrency (wrk connections)")
        ax.grid(alpha=0.3)
    rate.set_yscale("log")
    rate.set_ylabel("2xx answers / s")
    rate.set_title("throughput (n = 1)")
    rate.legend(fontsize=7)
    latency.set_yscale("log")
    latency.set_ylabel("latency (ms)")
    latency.set_title("p50 and p99")
    latency.legend(fontsize=7, ncol=2)
    fig.suptitle(f"POST /counterfactual: {result['model']}/{result.get('version')}, "
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
    parser.add_argument("--raw-seconds", type=float, default=3.0, help="minimum seconds per raw-engine variant")
    parser.add_argument("--job-n", type=int, default=2000)
    parser.add_argument("--job-timeout", type=float, default=300.0)
    parser.add_argument("--note", default="", help="a line added under the written section")
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--results-md", default="docs/RESULTS.md", help=f"its folder also receives {PLOT_NAME}")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    process, logs = None, Path(tempfile.mkdtemp(prefix="skdcgn-bench-"))
    try:
        wrk_path()
        url, redis_url = args.url, args.redis_url
        cache_url = args.cache_url or (settings.cache_url if args.redis_url == settings.redis_url else args.redis_url)
        if args.start:
            process, url, redis_url = start_service(args.models_dir, logs, args.threads)
            cache_url = redis_url
        result = benchmark(url, redis_url, cache_url, args.model, args.models_dir, logs, concurrencies,
                           args.duration, args.wrk_threads, args.threads, args.wrk_timeout, args.raw_seconds,
                           args.job_n, args.job_timeout)
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
