"""Serving benchmark: a bounded load generator against the HTTP API on loopback, beside raw onnxruntime.

For POST /counterfactual at each concurrency it reports p50/p95/p99 latency and throughput, for cache
misses (every request a new seed) and hits (a few seeds requested once beforehand, then repeated). A bulk
POST /jobs is timed from submission to `succeeded` and set against the raw onnxruntime throughput of the
same students measured in the same run. Every phase is bounded by a request count and a time limit, and
only loopback URLs are accepted.

    python -m benchmarks.serving --url http://127.0.0.1:8000          # a service that is already running
    python -m benchmarks.serving --start                              # start `python -m service.run_local`
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import httpx
import numpy as np

from core.compose import compose_samples
from core.imageio import to_uint8
from core.noise import MECHANISMS, NoiseSpec, draw_sample_noise
from training.evaluation import report
from training.evaluation.sources import load_students
from training.plots import save_figure

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CONCURRENCY = (1, 8, 32)
HIT_POOL = 8  # distinct requests repeated in the cache-hit phase
FINAL_STATES = {"succeeded", "failed", "cancelled"}


class BenchmarkError(RuntimeError):
    """The service is not reachable, not on loopback, or did not finish a job in time."""


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise BenchmarkError(f"refusing to load {url}: the load generator only targets loopback ({', '.join(LOOPBACK)})")


def latency_summary(latencies_s: list[float]) -> dict:
    if not latencies_s:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    ms = np.asarray(latencies_s) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "mean_ms": float(ms.mean())}


async def generate_load(client: httpx.AsyncClient, payload: Callable[[int], dict], concurrency: int,
                        max_requests: int, max_seconds: float) -> dict:
    """POST /counterfactual payload(i) for i = 0, 1, … from `concurrency` loops until either bound is hit."""
    latencies, statuses, cached = [], Counter(), 0
    next_index, images = 0, 0
    deadline = time.perf_counter() + max_seconds

    async def loop() -> None:
        nonlocal next_index, cached, images
        while next_index < max_requests and time.perf_counter() < deadline:
            body = payload(next_index)
            next_index += 1
            started = time.perf_counter()
            try:
                response = await client.post("/counterfactual", json=body)
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
                continue
            statuses[str(response.status_code)] += 1
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
                answer = response.json()
                cached += bool(answer.get("cached"))
                images += len(answer.get("images", []))

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency, "requests": sum(statuses.values()), "ok": len(latencies),
        "statuses": dict(statuses), "cached_answers": cached, "seconds": elapsed,
        "requests_per_second": len(latencies) / elapsed, "images_per_second": images / elapsed,
        **latency_summary(latencies),
    }


def counterfactual_payload(model: str, seed: int) -> dict:
    return {"model": model, "shape": seed % 10, "texture": (seed // 10) % 10, "background": (seed // 100) % 10,
            "n": 1, "seed": seed}


async def run_job(client: httpx.AsyncClient, model: str, n: int, seed: int, timeout_s: float) -> dict:
    """Submit a bulk npz job and poll it to a final state: images/s from submission to `succeeded`."""
    started = time.perf_counter()
    response = await client.post("/jobs", json={"model": model, "n": n, "seed": seed, "format": "npz"})
    if response.status_code != 202:
        raise BenchmarkError(f"POST /jobs answered {response.status_code}: {response.text[:300]}")
    job_id = response.json()["id"]
    status: dict = {}
    while time.perf_counter() - started < timeout_s:
        status = (await client.get(f"/jobs/{job_id}")).json()
        if status.get("state") in FINAL_STATES:
            break
        await asyncio.sleep(0.1)
    elapsed = time.perf_counter() - started
    state = status.get("state")
    return {"id": job_id, "n": n, "state": state, "seconds": elapsed,
            "images_per_second": n / elapsed if state == "succeeded" else None}


def raw_onnxruntime(models_dir: str, family: str, n: int, batch: int = 256, threads: int = 0) -> dict:
    """The same students without the service: fused graph only, and with noise, composition and uint8 as a job does."""
    students = load_students(models_dir, family, threads=threads)
    spec = NoiseSpec.from_manifest(students.manifest["noise"])
    shuffle = bool(students.manifest["texture_shuffle"])
    size = int(students.manifest["image_size"])
    rng = np.random.default_rng(0)
    labels = {m: rng.integers(0, 10, batch).astype(np.int64) for m in MECHANISMS}
    z = {m: rng.standard_normal((batch, spec.dim)).astype(np.float32) for m in MECHANISMS}
    students.run_fused(z, labels)  # warm-up
    batches = max(1, n // batch)
    started = time.perf_counter()
    for _ in range(batches):
        students.run_fused(z, labels)
    fused_only = batches * batch / (time.perf_counter() - started)
    started = time.perf_counter()
    for b in range(batches):
        noises = [draw_sample_noise(1, b * batch + i, spec, size) for i in range(batch)]
        out = students.run_fused({m: np.stack([s.z[m] for s in noises]) for m in MECHANISMS}, labels)
        to_uint8(compose_samples(out["shape"], out["texture"], out["background"], noises, shuffle)[0])
    with_composition = batches * batch / (time.perf_counter() - started)
    return {"version": students.version, "batch": batch, "images": batches * batch,
            "fused_images_per_second": fused_only, "with_noise_and_composition_images_per_second": with_composition}


async def wait_ready(client: httpx.AsyncClient, timeout_s: float) -> None:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.25)
    raise BenchmarkError(f"{client.base_url} did not become ready within {timeout_s:g} s")


async def benchmark(url: str, model: str, concurrencies=CONCURRENCY, max_requests: int = 200,
                    max_seconds: float = 15.0, job_n: int = 2000, job_timeout_s: float = 120.0,
                    ready_timeout_s: float = 60.0) -> dict:
    """Every phase against `url`: misses and hits per concurrency, then one bulk job."""
    check_loopback(url)
    limits = httpx.Limits(max_connections=max(concurrencies) + 2)
    run_seed = time.time_ns() % 10**9  # fresh seeds per run, so "misses" miss whatever the cache holds
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        await wait_ready(client, ready_timeout_s)
        result: dict = {"url": url, "model": model, "max_requests": max_requests, "max_seconds": max_seconds,
                        "levels": []}
        for level, concurrency in enumerate(concurrencies):
            base = run_seed + level * 10**6
            misses = await generate_load(client, lambda i: counterfactual_payload(model, base + HIT_POOL + i),
                                         concurrency, max_requests, max_seconds)
            for i in range(HIT_POOL):  # fill the cache with the pool the hit phase repeats
                response = await client.post("/counterfactual", json=counterfactual_payload(model, base + i))
                if response.status_code == 200:
                    result["version"] = response.json().get("version")
            hits = await generate_load(client, lambda i: counterfactual_payload(model, base + i % HIT_POOL),
                                       concurrency, max_requests, max_seconds)
            result["levels"].append({"concurrency": concurrency, "miss": misses, "hit": hits})
        result["job"] = await run_job(client, model, job_n, run_seed, job_timeout_s)
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(models_dir: str, logs: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """`python -m service.run_local` on free ports with its own Redis; stop it with stop_service."""
    port, redis_port = free_port(), free_port()
    env = dict(os.environ, SKDCGN_MODELS_DIR=str(Path(models_dir).resolve()), SKDCGN_ORT_THREADS=str(threads),
               SKDCGN_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", SKDCGN_JOBS_DIR=str(logs / "data" / "jobs"))
    process = subprocess.Popen([sys.executable, "-m", "service.run_local", "--port", str(port), "--logs", str(logs)],
                               env=env, stdout=open(logs / "run_local.log", "ab"), stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def stop_service(process: subprocess.Popen) -> None:
    """SIGTERM: run_local stops its gateway, worker and Redis in order."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


BULK_TARGET = 0.70  # bulk-job images/s over raw onnxruntime (with noise and composition), same students
CACHE_HIT_P50_TARGET_MS = 5.0


def targets(result: dict) -> list[dict]:
    """The serving targets, each with its measured value and whether it was met (None: not measured)."""
    job, raw = result["job"], result.get("raw_onnxruntime")
    bulk = (job["images_per_second"] / raw["with_noise_and_composition_images_per_second"]
            if job.get("images_per_second") and raw else None)
    hit_p50 = next((level["hit"]["p50_ms"] for level in result["levels"] if level["concurrency"] == 1), None)
    return [
        {"target": f"bulk job ≥ {BULK_TARGET:.0%} of raw onnxruntime", "value": bulk,
         "shown": "–" if bulk is None else f"{bulk:.0%}", "met": None if bulk is None else bulk >= BULK_TARGET},
        {"target": f"cache-hit p50 ≤ {CACHE_HIT_P50_TARGET_MS:g} ms (concurrency 1)", "value": hit_p50,
         "shown": "–" if hit_p50 is None else f"{hit_p50:.1f} ms",
         "met": None if hit_p50 is None else hit_p50 <= CACHE_HIT_P50_TARGET_MS},
    ]


def markdown(result: dict, plot: str, note: str = "") -> str:
    rows = []
    for level in result["levels"]:
        for kind in ("miss", "hit"):
            r = level[kind]
            fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
            rows.append([level["concurrency"], kind, r["ok"], r["requests"], fmt(r["p50_ms"]), fmt(r["p95_ms"]),
                         fmt(r["p99_ms"]), f"{r['requests_per_second']:.1f}", r["cached_answers"],
                         ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))])
    job, raw = result["job"], result.get("raw_onnxruntime")
    lines = [
        f"### Serving benchmark: {result['model']}/{result.get('version')}",
        "",
        f"Load generator (httpx, loopback) against `{result['url']}`; each phase stops after "
        f"{result['max_requests']} requests or {result['max_seconds']:g} s. Misses: a new seed per request; hits: "
        f"{HIT_POOL} requests sent once, then repeated. POST /counterfactual with n = 1. onnxruntime threads "
        f"(worker and raw run): {result.get('onnxruntime_threads') or 'onnxruntime default'}.",
        "",
        report.table(["concurrency", "cache", "ok", "sent", "p50 ms", "p95 ms", "p99 ms", "req/s", "cached answers",
                      "statuses"], rows),
        "",
        f"Bulk job (npz, n = {job['n']:,}): state {job['state']} after {job['seconds']:.1f} s"
        + (f", {job['images_per_second']:,.0f} images/s." if job["images_per_second"] else "."),
    ]
    if raw:
        lines.append(f"Raw onnxruntime, same students ({raw['version']}), same run, batch {raw['batch']}: "
                     f"{raw['fused_images_per_second']:,.0f} images/s (fused graph only), "
                     f"{raw['with_noise_and_composition_images_per_second']:,.0f} images/s with noise, composition "
                     "and uint8.")
    verdict = {True: "yes", False: "**no**", None: "not measured"}
    lines += ["", report.table(["target", "measured", "met"],
                               [[t["target"], t["shown"], verdict[t["met"]]] for t in targets(result)])]
    lines += ["", f"![latency percentiles]({plot})"]
    if note:
        lines += ["", note]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    levels = result["levels"]
    width = 0.13
    for k, (kind, pct) in enumerate((kind, pct) for kind in ("miss", "hit") for pct in ("p50", "p95", "p99")):
        values = [level[kind][f"{pct}_ms"] or 0 for level in levels]
        ax.bar(np.arange(len(levels)) + (k - 2.5) * width, values, width, label=f"{kind} {pct}")
    ax.set_xticks(np.arange(len(levels)), [f"concurrency {level['concurrency']}" for level in levels])
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"POST /counterfactual latency: {result['model']}")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running service on loopback, e.g. http://127.0.0.1:8000")
    target.add_argument("--start", action="store_true", help="start python -m service.run_local for this run")
    parser.add_argument("--model", default="double_colored_mnist")
    parser.add_argument("--models-dir", default=os.environ.get("SKDCGN_MODELS_DIR", "models"),
                        help="the service's model repository (for --start and the raw onnxruntime comparison)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument("--max-requests", type=int, default=200, help="per phase")
    parser.add_argument("--max-seconds", type=float, default=15.0, help="per phase")
    parser.add_argument("--job-n", type=int, default=2000)
    parser.add_argument("--job-timeout", type=float, default=300.0)
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime threads of the started worker and of the raw comparison (0: its default)")
    parser.add_argument("--note", default="", help="a line added under the written section")
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--results-md", default="docs/RESULTS.md")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    process, logs = None, Path(tempfile.mkdtemp(prefix="skdcgn-bench-"))
    try:
        url = args.url
        if args.start:
            process, url = start_service(args.models_dir, logs, args.threads)
        result = asyncio.run(benchmark(url, args.model, concurrencies, args.max_requests, args.max_seconds,
                                       args.job_n, args.job_timeout, ready_timeout_s=180.0))
        result["onnxruntime_threads"] = args.threads
        result["raw_onnxruntime"] = raw_onnxruntime(args.models_dir, args.model, args.job_n, threads=args.threads)
        result["targets"] = targets(result)
    except (BenchmarkError, httpx.HTTPError) as exc:
        print(f"error: {exc} (service logs, when started here: {logs})", file=sys.stderr)
        return 1
    finally:
        if process is not None:
            stop_service(process)
    report.write_json(Path(args.results_dir) / f"serving_{args.model}.json", result)
    plot_path = Path(args.results_md).parent / f"latency_{args.model}.png"
    plot(result, plot_path)
    body = markdown(result, plot_path.name, args.note)
    report.update_section(args.results_md, f"bench-serving-{args.model}", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
