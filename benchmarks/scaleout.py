"""Scale-out: dataset-job throughput with one worker and with two (one onnxruntime thread each, each with its own
private SKDCGN_JOBS_DIR), results in a local folder and in an S3-compatible store, side by side in one run.

    python -m benchmarks.scaleout                    # 20,000-sample webdataset jobs, 2 rounds
    python -m benchmarks.scaleout --n 5000 --rounds 1

Each layout gets its own broker Redis and gateway (the folder layout: every process shares one folder, as on one
host or NFS; the store layout: moto's S3 server on loopback, benchmarks/s3_server.py). Rounds alternate the four
arrangements, so drift of the host touches all alike. A job's time is split at the moment its progress reaches n
(rendering, spread over the workers) and the moment it succeeds (assembly: one worker reads every chunk, encodes
the PNGs and writes the shards). Writes benchmarks/results/scaleout_<model>.json and the "Scale-out" section of
docs/RESULTS.md. On a 2-core host the second worker shares the cores with the gateway, Redis and the store, so the
figure measures contention as much as scale; README "Scaling out" projects it to N GPU hosts.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import host
from benchmarks.s3_server import S3Server
from core.manifest import latest_version
from core.settings import Settings
from reporting import report
from service.run_local import (
    StartupError, free_port, http_status, redis_answers, service_env, start_gateway, start_redis, start_worker, stop,
    wait_until,
)

BUCKET = "skdcgn-scaleout"
LAYOUTS = ("folder", "s3")
WORKER_COUNTS = (1, 2)
STARTUP_S = 90


class Layout:
    """A broker Redis, a gateway and, for `s3`, the store; workers come and go per measurement."""

    def __init__(self, kind: str, logs: Path, models_dir: str, settings: dict[str, str]):
        self.kind, self.logs = kind, logs / kind
        self.logs.mkdir(parents=True, exist_ok=True)
        self.store = S3Server(self.logs, BUCKET).start() if kind == "s3" else None
        redis_port = free_port()
        self.env = service_env({
            "SKDCGN_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "SKDCGN_MODELS_DIR": str(Path(models_dir).resolve()),
            "SKDCGN_JOBS_DIR": str(self.logs / "shared-folder"), "SKDCGN_WORKER_METRICS_PORT": "0",
            **settings, **(self.store.env | {"SKDCGN_RESULTS_URL": f"s3://{BUCKET}/jobs"} if self.store else {})})
        self.redis = start_redis(redis_port, open(self.logs / "redis.log", "ab"))
        wait_until(lambda: redis_answers(self.env["SKDCGN_REDIS_URL"]), 10, "Redis", {"redis": self.redis})
        port = free_port()
        env = self.env | ({"SKDCGN_JOBS_DIR": str(self.logs / "gateway")} if self.store else {})
        self.gateway = start_gateway("127.0.0.1", port, env, open(self.logs / "gateway.log", "ab"))
        self.url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(f"{self.url}/healthz") == 200, STARTUP_S, "the gateway", {"gateway": self.gateway})
        self.workers = []

    def start_workers(self, count: int) -> None:
        """`count` workers, each with its own folder when results go to the store (hosts that share no disk)."""
        for index in range(count):
            name = f"worker{index + 1}"
            env = self.env | ({"SKDCGN_JOBS_DIR": str(self.logs / name)} if self.store else {})
            self.workers.append(start_worker(env, open(self.logs / f"{name}.log", "ab"), name))
        wait_until(lambda: len(httpx.get(f"{self.url}/readyz", timeout=5).json().get("workers", [])) >= count
                   if http_status(f"{self.url}/readyz") == 200 else False, STARTUP_S, f"{count} ready workers",
                   {f"worker{index + 1}": process for index, process in enumerate(self.workers)})

    def stop_workers(self) -> None:
        stop(self.workers)
        self.workers = []

    def stop(self) -> None:
        self.stop_workers()
        stop([self.gateway, self.redis])
        if self.store:
            self.store.stop()


def run_job(url: str, model: str, n: int, seed: int, timeout_s: float) -> dict:
    """A webdataset job from submission to success: seconds to render (progress reaches n) and to assemble."""
    with httpx.Client(base_url=url, timeout=30) as client:
        started = time.perf_counter()
        created = client.post("/jobs", json={"model": model, "n": n, "seed": seed, "format": "webdataset"})
        if created.status_code != 202:
            raise StartupError(f"POST /jobs answered {created.status_code}: {created.text[:300]}")
        job_id, rendered = created.json()["id"], None
        while time.perf_counter() - started < timeout_s:
            status = client.get(f"/jobs/{job_id}").json()
            now = time.perf_counter() - started
            if rendered is None and status["progress"]["done"] >= n:
                rendered = now
            if status["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.05)
        else:
            raise StartupError(f"job {job_id} did not end within {timeout_s:g} s")
        if status["state"] != "succeeded":
            raise StartupError(f"job {job_id} {status['state']}: {status.get('error')}")
        client.delete(f"/jobs/{job_id}")  # its files go: the store and the folder stay small between rounds
    total = now
    rendered = rendered if rendered is not None else total
    return {"seconds": total, "render_seconds": rendered, "assembly_seconds": total - rendered,
            "samples_per_second": n / total, "render_samples_per_second": n / rendered,
            "result_bytes": sum(item["bytes"] for item in status["files"])}


def scaleout(models_dir: str, model: str, n: int, rounds: int, threads: int, timeout_s: float) -> dict:
    logs = Path(tempfile.mkdtemp(prefix="skdcgn-scaleout-"))
    settings = {"SKDCGN_ORT_THREADS": str(threads)}
    result = {"model": model, "version": latest_version(models_dir, model), "n": n, "rounds": rounds,
              "threads_per_worker": threads, "format": "webdataset", "host": host.start(), "runs": []}
    layouts = {kind: Layout(kind, logs, models_dir, settings) for kind in LAYOUTS}
    try:
        for round_index in range(rounds):
            for kind in LAYOUTS:
                for workers in WORKER_COUNTS:
                    layout = layouts[kind]
                    layout.start_workers(workers)
                    run_job(layout.url, model, min(n, 2000), 1, timeout_s)  # warm: sessions, connections
                    measured = run_job(layout.url, model, n, 100 + round_index, timeout_s)
                    layout.stop_workers()
                    result["runs"].append({"layout": kind, "workers": workers, "round": round_index, **measured})
                    print(f"round {round_index + 1}/{rounds}  {kind:6s} {workers} worker(s): "
                          f"{measured['samples_per_second']:,.0f} samples/s (render {measured['render_seconds']:.1f} s,"
                          f" assembly {measured['assembly_seconds']:.1f} s)", flush=True)
    finally:
        for layout in layouts.values():
            layout.stop()
    result["host"] = host.finish(result["host"])
    result["summary"] = summary(result["runs"])
    result["logs"] = str(logs)
    return result


def summary(runs: list[dict]) -> list[dict]:
    """Per layout and worker count: the median of the rounds, and the speed-up of two workers over one."""
    rows = []
    for kind in LAYOUTS:
        one = None
        for workers in WORKER_COUNTS:
            mine = [run for run in runs if run["layout"] == kind and run["workers"] == workers]
            row = {"layout": kind, "workers": workers,
                   **{key: statistics.median(run[key] for run in mine) for key in
                      ("samples_per_second", "render_samples_per_second", "render_seconds", "assembly_seconds")}}
            one = one or row
            row["speedup"] = row["samples_per_second"] / one["samples_per_second"]
            row["render_speedup"] = row["render_samples_per_second"] / one["render_samples_per_second"]
            rows.append(row)
    folder = {row["workers"]: row for row in rows if row["layout"] == "folder"}
    for row in rows:
        row["vs_folder"] = row["samples_per_second"] / folder[row["workers"]]["samples_per_second"]
    return rows


def markdown(result: dict) -> str:
    rows = [[row["layout"], row["workers"], f"{row['samples_per_second']:,.0f}", f"{row['speedup']:.2f}×",
             f"{row['render_samples_per_second']:,.0f}", f"{row['render_speedup']:.2f}×",
             f"{row['render_seconds']:.1f}", f"{row['assembly_seconds']:.1f}", f"{row['vs_folder']:.2f}×"]
            for row in result["summary"]]
    return "\n".join([
        f"### Scale-out: {result['model']}/{result['version']}, one worker vs two, folder vs object store", "",
        f"`python -m benchmarks.scaleout`: {result['n']:,}-sample webdataset jobs, median of {result['rounds']} "
        f"alternating rounds, {result['threads_per_worker']} onnxruntime thread per worker; `s3` is moto's S3 server "
        f"on loopback, each worker with a private folder. {result['host']['cpus']} CPUs, "
        f"{host.describe(result['host'])}. On 2 cores the second worker shares them with the gateway, Redis and the "
        "store: the render speed-up measures contention as much as scale, and assembly (one worker) does not scale "
        "with workers at all. Projection to N GPU hosts: README, \"Scaling out\".", "",
        report.table(["results", "workers", "job samples/s", "speed-up", "render samples/s", "render speed-up",
                      "render s", "assembly s", "vs folder"], rows)])


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=settings.default_model)
    parser.add_argument("--models-dir", default=str(settings.models_dir))
    parser.add_argument("--n", type=int, default=20_000, help="samples per measured job")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per worker")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one job may take")
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--results-md", default="docs/RESULTS.md")
    args = parser.parse_args(argv)
    if min(args.n, args.rounds, args.threads) < 1:
        parser.error("--n, --rounds and --threads must be at least 1")
    try:
        result = scaleout(args.models_dir, args.model, args.n, args.rounds, args.threads, args.timeout)
    except (StartupError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stem = f"scaleout_{args.model}"
    report.publish(result, Path(args.results_dir) / f"{stem}.json", args.results_md, stem, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
