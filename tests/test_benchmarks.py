"""Benchmark mechanics: MAC counting with known answers, the teacher's ONNX export, the ONNX variants timed as
ModelRuntime's own calls, the model benchmark end to end on tiny students, and the serving benchmark (its wrk
summary and targets, its Lua script against a stub app, then the whole run against the real service).
Nothing here asserts a speed."""
from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from torch import nn

from benchmarks import host
from benchmarks import minimal_endpoint
from benchmarks import models as model_bench
from benchmarks import serving
from core.noise import NoiseSpec
from core.vocabulary import MECHANISMS
from tests.model_helpers import FAMILY
from tests.paths import SHARED, needs_shared
from training.teachers import load_teacher


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.depthwise = nn.Conv2d(2, 2, 3, padding=1, groups=2)
        self.linear = nn.Linear(3, 5)

    def forward(self, z, y):
        return self.depthwise(self.conv(z)), self.linear(y)


def test_cost_counts_macs_and_parameters():
    result = model_bench.cost(Tiny(), torch.zeros(2, 1, 4, 4), torch.zeros(2, 3))
    # conv: 32 outputs × 1·9; depthwise: 32 outputs × 1·9; linear: 5 outputs × 3 inputs. Per image.
    assert result["macs_per_image"] == 32 * 9 + 32 * 9 + 15
    assert result["parameters"] == (18 + 2) + (18 + 2) + (15 + 5)


def test_images_per_second_calls_warm_up_then_at_least_min_reps():
    calls = []
    rate = model_bench.images_per_second(lambda: calls.append(1), batch=8, min_seconds=0.0, min_reps=3)
    assert len(calls) == 4 and rate > 0


@needs_shared
def test_teacher_cost_and_onnx_exports_take_any_batch(tmp_path):
    teacher = load_teacher("double_colored", SHARED / "teachers" / "cgn_mnist")
    modules = {m: model_bench.TeacherMechanism(teacher, m).eval() for m in MECHANISMS}
    z, y = torch.zeros(2, 32), torch.zeros(2, dtype=torch.long)
    shape = model_bench.cost(modules["shape"], z, y)
    # Linear 42→4096, conv 64→32 at 16×16, conv 32→1 at 32×32 (REFERENCE.md's f_shape).
    assert shape["macs_per_image"] == 42 * 4096 + 16 * 16 * 32 * 64 * 9 + 32 * 32 * 32 * 9
    assert shape["parameters"] == 100 + sum(p.numel() for p in teacher.f_shape.parameters())
    paths = model_bench.export_teacher(modules, tmp_path, NoiseSpec(dim=32))
    graphs = model_bench.TeacherGraphs(paths, threads=1, providers=["CPUExecutionProvider"])
    z3, y3 = model_bench.inputs(3, NoiseSpec(dim=32))
    outputs = graphs.run_fused({m: z3 for m in MECHANISMS}, {m: y3 for m in MECHANISMS})
    assert outputs["shape"].shape == (3, 1, 32, 32) and outputs["background"].shape == (3, 3, 32, 32)
    with torch.no_grad():
        expected = modules["texture"](torch.from_numpy(z3), torch.from_numpy(y3)).numpy()
    np.testing.assert_allclose(graphs.run("texture", z3, y3), expected, atol=1e-4)
    separately = graphs.run_separately({m: z3 for m in MECHANISMS}, {m: y3 for m in MECHANISMS})
    for m in MECHANISMS:
        np.testing.assert_allclose(separately[m], outputs[m], atol=1e-5)


def test_onnx_steps_time_the_runtime_calls():
    """The benchmark's variants are exactly ModelRuntime's calls: run per mechanism, run_separately, run_fused."""
    calls = []

    class Recorder:
        def run(self, mechanism, z, y):
            calls.append(("run", mechanism, len(z)))

        def run_separately(self, z, y):
            calls.append(("run_separately", tuple(z), len(z["shape"])))

        def run_fused(self, z, y):
            calls.append(("run_fused", tuple(z), len(z["shape"])))

    steps = model_bench.onnx_steps(Recorder(), 4, NoiseSpec(dim=32))
    assert set(steps) == {*MECHANISMS, "three_sessions", "fused"}
    for step in steps.values():
        step()
    assert calls == [("run", m, 4) for m in MECHANISMS] + [
        ("run_separately", tuple(MECHANISMS), 4), ("run_fused", tuple(MECHANISMS), 4)]


@needs_shared
def test_model_benchmark_writes_results(tmp_path, tiny_models, restore_torch_threads):
    models = tiny_models
    results, md = tmp_path / "results", tmp_path / "docs" / "RESULTS.md"
    assert model_bench.main([
        "--family", FAMILY, "--models-dir", str(models), "--runs-dir", str(tmp_path / "runs"),
        "--teacher-path", str(SHARED / "teachers" / "cgn_mnist"), "--batches", "1,4", "--min-seconds", "0", "--rounds", "2",
        "--sweep", "2,4", "--thread-counts", "1", "--sweep-rounds", "2",
        "--threads", "1", "--torch-threads", "1", "--results-dir", str(results), "--results-md", str(md)]) == 0
    result = json.loads((results / f"models_{FAMILY}.json").read_text())
    for engine in ("teacher/onnxruntime-cpu", "student/onnxruntime-cpu", "teacher/pytorch-cpu", "student/pytorch-cpu"):
        per_batch = result["images_per_second"][engine]["fused" if "onnx" in engine else "all"]
        assert set(per_batch) == {"1", "4"} and all(isinstance(v, float) for v in per_batch.values()), per_batch
    assert set(result["speedup"]) == {*MECHANISMS, "three_sessions", "fused"}
    fused = result["speedup"]["fused"]
    rounds = result["fused_rounds"]
    assert len(fused["round_ratios"]) == len(rounds["teacher"]) == len(rounds["student"]) == 2
    assert fused["speedup"] == pytest.approx(max(rounds["student"]) / max(rounds["teacher"]))
    assert "random weights" in result["student_torch_weights"]
    like = result["like_for_like"]["1"]  # each engine at its best batch of the sweep, with its share of the peak
    assert set(like["images_per_second"]) == {"2", "4"} and like["peak_gflops"] > 0
    for name, best in like["best"].items():
        assert best["images_per_second"] == max(row[name] for row in like["images_per_second"].values())
        assert best["peak_share"] == pytest.approx(best["gflops"] / like["peak_gflops"])
    assert like["ratio"] == pytest.approx(like["best"]["student"]["images_per_second"]
                                          / like["best"]["teacher"]["images_per_second"])
    text = md.read_text()
    assert "Like for like" in text and "meets target" in text and "SKDCGN_BATCH_SIZE=" in text
    assert "cpu_jiffies_start" not in result["host"] and "CPU steal" in md.read_text()
    assert (md.parent / f"throughput_{FAMILY}.png").is_file() and "bench-models-" in md.read_text()


def fake_proc_stat(path: Path, steal: int, total: int) -> Path:
    """/proc/stat's aggregate line: user nice system idle iowait irq softirq steal guest guest_nice."""
    user = total - steal - 300
    path.write_text(f"cpu  {user} 0 100 200 0 0 0 {steal} 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    return path


def test_host_records_the_share_of_cpu_time_the_hypervisor_stole(tmp_path, monkeypatch):
    stat = fake_proc_stat(tmp_path / "stat", steal=50, total=1_000)
    assert host.cpu_jiffies(stat) == [50, 1_000]
    assert host.cpu_jiffies(tmp_path / "missing") is None
    monkeypatch.setattr(host, "PROC_STAT", stat)
    monkeypatch.setattr(host.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    monkeypatch.setattr(host.os, "cpu_count", lambda: 2)
    quiet = host.start(torch="x")
    fake_proc_stat(stat, steal=60, total=2_000)  # 10 of 1,000 jiffies stolen: 1 %
    assert host.finish(quiet)["cpu_steal"] == pytest.approx(0.01) and "cpu_jiffies_start" not in quiet
    assert "CPU steal 1.0 %" in host.describe(quiet) and "pessimistic" not in host.describe(quiet)
    stolen = host.start()
    fake_proc_stat(stat, steal=360, total=3_000)  # 300 of 1,000: 30 %
    text = host.describe(host.finish(stolen))
    assert "CPU steal 30.0 %" in text and "the hypervisor took CPU time" in text and "other jobs" not in text
    monkeypatch.setattr(host.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert "other jobs and the hypervisor took" in host.describe(host.finish(host.start()) | {"cpu_steal": 0.3})


def test_host_description_reads_results_recorded_before_steal_was(tmp_path):
    older = {"cpus": 2, "loadavg_start": [0.2, 0, 0], "loadavg_end": [1.9, 0, 0]}
    assert host.describe(older) == "load average 0.2 at start, 1.9 at end"


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None,
                               reason="wrk is not installed (apt-get install wrk): the serving benchmark's load "
                                      "generator")


def stub_app(received: list[bytes]) -> FastAPI:
    """Just the HTTP contract of POST /counterfactual: X-Cache by body, and every fifth request answered 429.
    Every body received is appended to `received`, as sent."""
    app, seen, count = FastAPI(), set(), [0]

    @app.post("/counterfactual")
    async def counterfactual(request: Request):
        raw = await request.body()
        received.append(raw)
        body = json.loads(raw)
        count[0] += 1
        if count[0] % 5 == 0:
            return JSONResponse({"error": "busy"}, status_code=429, headers={"Retry-After": "1"})
        key = json.dumps(body, sort_keys=True)
        cached = key in seen
        seen.add(key)
        await asyncio.sleep(0.001)
        return JSONResponse({"images": [PNG] * body["n"], "cached": cached, "seed": body["seed"]},
                            headers={"X-Cache": "hit" if cached else "miss"})

    return app


@pytest.fixture
def stub():
    received: list[bytes] = []
    server = uvicorn.Server(uvicorn.Config(stub_app(received), host="127.0.0.1", port=serving.free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.config.port}", received=received)
    server.should_exit = True
    thread.join(timeout=10)


WRK_LINE = ('WRK_JSON {"duration_us":2000000,"requests":110,"bytes":5000,"retry_after":10,'
            '"errors":{"connect":0,"read":1,"write":0,"status":10,"timeout":0},'
            '"statuses":{"200":100,"429":10},"x_cache":{"miss":100},'
            '"latency_us":{"min":500,"max":90000,"mean":4000.5,"stdev":10.0,'
            '"percentiles":{"50":2000,"90":5000,"99":8000,"99.9":9000}}}')


def test_wrk_summary_and_targets():
    """The `done` hook's JSON becomes a load point; the targets read points and the raw engine (no wrk needed)."""
    point = serving.summarise(serving.parse_wrk("Running 2s test\n" + WRK_LINE + "\n"), 32)
    assert point["answered"] == 110 and point["ok"] == 100 and point["non_2xx"] == 10
    assert point["share_429"] == pytest.approx(10 / 110) and point["retry_after_429"] == 10
    assert point["ok_per_second"] == pytest.approx(50) and point["requests_per_second"] == pytest.approx(55)
    assert point["p50_ms"] == 2 and point["p99_ms"] == 8 and point["p99_over_p50"] == 4
    assert point["socket_errors"] == {"connect": 0, "read": 1, "write": 0, "timeout": 0}
    with pytest.raises(serving.BenchmarkError, match="WRK_JSON"):
        serving.parse_wrk("no summary")

    clean = dict(point, statuses={"200": 100}, non_2xx=0, share_429=0.0, retry_after_429=0,
                 socket_errors=dict.fromkeys(point["socket_errors"], 0), x_cache={"hit": 100})
    refused = dict(clean, statuses={"200": 100, "429": 10}, non_2xx=10, share_429=10 / 110, retry_after_429=10)
    result = {
        "levels": [{"concurrency": 32, "miss": dict(clean, x_cache={"miss": 100}),
                    "hit": dict(clean, ok_per_second=30.0), "minimal": dict(clean, ok_per_second=50.0, p99_over_p50=5.0),
                    "hit_distinct": dict(clean, ok_per_second=26.0),
                    "minimal_distinct": dict(clean, ok_per_second=50.0)},
                   {"concurrency": 128, "miss": point, "hit": clean, "minimal": clean}],
        "distinct": {"bodies": 10_000},
        "overload": {"concurrency": 512, "max_in_flight": 64, "miss": refused},
        "raw_engine": {"with_noise_and_composition_images_per_second": 100.0},
        "job": {"images_per_second": 50.0},
    }
    found = {t["target"].split(" ≥")[0].split(" no worse")[0].split(":")[0]: t for t in serving.targets(result)}
    assert [t["met"] for t in serving.targets(result)] == [True, True, True, True, True, True, False, None]
    assert found["n = 1 misses/s at concurrency 32"]["value"] == pytest.approx(0.5)
    assert found["cache hits/s of one repeated body at concurrency 32"]["value"] == pytest.approx(0.6)
    distinct = found["cache hits/s over 10,000 distinct cached requests at concurrency 32"]
    assert distinct["value"] == pytest.approx(0.52) and "same bodies, 0 errors" in distinct["target"]
    overload = found["past admission (misses at concurrency 512 against a gateway with SKDCGN_MAX_IN_FLIGHT=64)"]
    assert overload["value"] == pytest.approx(10 / 110) and "10 with Retry-After" in overload["shown"]

    def met(index: int, **changes) -> bool | None:
        changed = json.loads(json.dumps(result))
        for path, value in changes.items():
            *parents, leaf = path.split("__")
            node = changed
            for key in parents:
                node = node[int(key)] if key.isdigit() else node[key]
            node[leaf] = value
        return serving.targets(changed)[index]["met"]

    # Hits over the distinct bodies: under half the minimal endpoint, an error on either side, or an answer that did
    # not come from the cache: not met.
    assert met(2, levels__0__hit_distinct__ok_per_second=24.0) is False
    assert met(2, levels__0__hit_distinct__statuses={"200": 100, "500": 1}, levels__0__hit_distinct__non_2xx=1) is False
    assert met(2, levels__0__minimal_distinct__statuses={"200": 90, "404": 10},
               levels__0__minimal_distinct__non_2xx=10) is False
    assert met(2, levels__0__hit_distinct__x_cache={"hit": 99, "miss": 1}) is False
    assert met(2, levels__0__hit_distinct__socket_errors={"connect": 0, "read": 0, "write": 0, "timeout": 1}) is False
    # Past admission: met only when 429s were seen, all with Retry-After, and no 5xx or socket error.
    assert met(5, overload__miss=clean) is False  # zero 429s shows nothing about overload
    assert "no 429 observed" in serving.targets(dict(result, overload=dict(result["overload"], miss=clean)))[5]["shown"]
    assert met(5, overload__miss__retry_after_429=9) is False
    assert met(5, overload__miss__statuses={"200": 100, "429": 10, "503": 1}) is False
    assert met(5, overload__miss__socket_errors={"connect": 0, "read": 0, "write": 0, "timeout": 2}) is False
    assert serving.targets({key: value for key, value in result.items() if key != "overload"})[5]["met"] is None
    result["levels"] = result["levels"][1:]  # no concurrency 32: those targets are not measured
    assert [t["met"] for t in serving.targets(result)][:5] == [None] * 5


@needs_wrk
def test_wrk_script_against_stub_app(stub):
    """The Lua script's mechanics against a stub (not the service): fresh seeds miss, one body hits, distinct bodies
    are drawn from their set with the bytes serving.request_body writes, statuses and Retry-After are counted."""
    miss = serving.run_wrk(stub.url, "miss", "m", 1000, concurrency=2, duration_s=1, threads=2, timeout_s=5)
    assert miss["answered"] > 0 and miss["statuses"].get("200", 0) == miss["x_cache"].get("miss", 0) == miss["ok"]
    assert miss["retry_after_429"] == miss["statuses"].get("429", 0) and miss["share_429"] is not None
    hit = serving.run_wrk(stub.url, "hit", "m", 7, concurrency=2, duration_s=1, timeout_s=5)
    assert hit["x_cache"].get("hit", 0) >= hit["ok"] - 1 and hit["x_cache"].get("miss", 0) <= 1
    assert hit["p50_ms"] <= hit["p99_ms"]
    stub.received.clear()
    base, count = (1 << 51) + 123_456_789, 50  # seeds as large as the benchmark's
    distinct = serving.run_wrk(stub.url, "distinct", "m", base, concurrency=4, duration_s=1, threads=2, timeout_s=5,
                               count=count)
    expected = {serving.request_body("m", base + i) for i in range(count)}
    assert distinct["answered"] > count and set(stub.received) <= expected
    assert len(set(stub.received)) > count // 2  # drawn across the set, not one body
    with pytest.raises(serving.BenchmarkError, match="count"):
        serving.run_wrk(stub.url, "distinct", "m", base, concurrency=1, duration_s=1)


def test_request_body_is_what_the_lua_script_sends():
    assert serving.request_body("double_colored_mnist", 1234) == (
        b'{"model":"double_colored_mnist","shape":4,"texture":3,"background":2,"n":1,"seed":1234}')
    assert json.loads(serving.request_body("m", 7)) == serving.hit_body("m", 7)
    assert serving.as_cache_hit(b'{"n":1,"cached":false}') == b'{"n":1,"cached":true}'
    assert serving.as_cache_hit(b'{"n":1,"cached":true}') == b'{"n":1,"cached":true}'


def test_warm_posts_every_body_once_and_retries_429(stub):
    """The warm-up client: every body answered 200 once (429s retried after Retry-After), answers in body order."""
    bodies = [serving.request_body("m", 500 + i) for i in range(40)]
    answers, stats = serving.warm(stub.url, bodies, concurrency=4)
    assert stats["statuses"]["200"] == 40 and stats["statuses"].get("429", 0) >= 5 and stats["bodies"] == 40
    assert [json.loads(answer)["seed"] for answer in answers] == [500 + i for i in range(40)]
    assert sorted(set(stub.received)) == sorted(bodies)
    with pytest.raises(serving.BenchmarkError, match="loopback"):
        serving.warm("http://example.com:8000", bodies)


def test_minimal_endpoint_keys_each_answer_by_the_body_hash(stack, tmp_path):
    """The minimal endpoint answers each stored body's own answer (the sha256 of the body's bytes), 404 otherwise;
    store_minimal checks every key is held and remove_minimal deletes them."""
    cache_url = stack.env["SKDCGN_REDIS_URL"]
    bodies = [serving.request_body("m", 9_000 + i) for i in range(20)]
    answers = [json.dumps({"seed": 9_000 + i, "cached": True}).encode() for i in range(20)]
    keys = serving.store_minimal(cache_url, bodies, answers, ttl_s=60)
    assert keys == [minimal_endpoint.KEY_PREFIX + hashlib.sha256(body).hexdigest() for body in bodies]
    process, url = serving.start_minimal(cache_url, tmp_path)
    try:
        for body, answer in zip(bodies[:5], answers[:5]):
            response = httpx.post(f"{url}/counterfactual", content=body, timeout=10)
            assert response.status_code == 200 and response.content == answer
        assert httpx.post(f"{url}/counterfactual", content=b"{}", timeout=10).status_code == 404
        if shutil.which("wrk"):  # the Lua script's bytes are the ones stored: every answer 200
            point = serving.run_wrk(url, "distinct", "m", 9_000, concurrency=2, duration_s=1, timeout_s=5, count=20)
            assert point["answered"] > 0 and point["statuses"] == {"200": point["answered"]}
    finally:
        serving.stop_process(process)
        serving.remove_minimal(cache_url, keys)
    assert stack.redis().exists(*keys) == 0


def test_benchmark_refuses_non_loopback():
    with pytest.raises(serving.BenchmarkError, match="loopback"):
        serving.run_wrk("http://example.com:8000", "miss", "m", 0, 1, 1)
    with pytest.raises(serving.BenchmarkError, match="loopback"):
        serving.benchmark("http://127.0.0.1:8000", "redis://10.0.0.1:6379/0", "redis://127.0.0.1:6379/0", "m",
                          "models", Path("."))


@needs_wrk
def test_serving_benchmark_against_the_real_service(stack, models_dir, tmp_path):
    """The whole benchmark, 1 s per point at concurrency 1 and 4 with 200 distinct bodies and a point past admission
    (32 connections against a gateway admitting 4), against the real gateway + Celery worker + Redis (the service
    tests' shared stack): every field of the JSON, the Markdown section and the plot. Timings are measured, never
    asserted."""
    results, md = tmp_path / "results", tmp_path / "docs" / "RESULTS.md"
    assert serving.main([
        "--url", stack.url, "--redis-url", stack.env["SKDCGN_REDIS_URL"], "--models-dir", str(models_dir),
        "--model", FAMILY, "--threads", "1", "--duration", "1", "--concurrency", "1,4", "--raw-seconds", "0.2",
        "--distinct", "200", "--overload-concurrency", "32", "--overload-max-in-flight", "4",
        "--job-n", "100", "--job-timeout", "60", "--results-dir", str(results), "--results-md", str(md)]) == 0
    result = json.loads((results / f"serving_{FAMILY}.json").read_text())
    assert {"url", "minimal_url", "model", "family", "version", "latest_version", "manifest_sha256", "duration_s",
            "concurrency", "wrk", "onnxruntime_threads", "raw_engine", "levels", "distinct", "warm", "overload", "job",
            "targets", "hit_answer_bytes", "host_at_start", "host_at_end"} <= set(result)
    assert result["family"] == FAMILY and result["version"] == result["latest_version"] == (
        models_dir / FAMILY / "LATEST").read_text().strip()
    assert result["concurrency"] == [1, 4] and [level["concurrency"] for level in result["levels"]] == [1, 4]
    assert result["distinct"]["bodies"] == 200 and result["warm"]["statuses"].get("200") == 200
    point_fields = {"concurrency", "seconds", "answered", "ok", "non_2xx", "statuses", "share_429", "retry_after_429",
                    "socket_errors", "x_cache", "requests_per_second", "ok_per_second", "bytes", "p50_ms", "p90_ms",
                    "p99_ms", "p999_ms", "mean_ms", "max_ms", "p99_over_p50"}
    for level in result["levels"]:
        assert "drain_seconds" in level
        for kind in serving.KINDS:
            assert point_fields <= set(level[kind]), (kind, set(level[kind]))
            assert all(status.isdigit() for status in level[kind]["statuses"])
        assert "miss" not in level["hit"]["x_cache"] and "hit" not in level["miss"]["x_cache"]
        assert set(level["hit_distinct"]["x_cache"]) == {"hit"}  # every distinct body was in the cache
        assert set(level["minimal_distinct"]["statuses"]) == {"200"}  # and stored for the minimal endpoint
    overload = result["overload"]
    assert overload["concurrency"] == 32 and overload["max_in_flight"] == 4 and overload["url"] != stack.url
    assert overload["miss"]["statuses"].get("429", 0) > 0  # 32 connections against 4 slots: refused
    assert overload["miss"]["retry_after_429"] == overload["miss"]["statuses"]["429"]
    assert not any(status.startswith("5") for status in overload["miss"]["statuses"])
    assert {"version", "batch", "onnxruntime_threads", "fused_images_per_second",
            "with_noise_and_composition_images_per_second"} <= set(result["raw_engine"])
    assert result["job"]["state"] == "succeeded"
    assert len(result["targets"]) == 8 and all({"target", "value", "shown", "met"} <= set(t) for t in result["targets"])
    assert (md.parent / serving.PLOT_NAME).is_file() and f"bench-serving-{FAMILY}" in md.read_text()
    assert "hit, 200 bodies" in md.read_text() and "past admission" in md.read_text()
    first = result["distinct"]["first_seed"]  # the benchmark deletes what it stored for the minimal endpoint
    stored = [minimal_endpoint.body_key(serving.request_body(FAMILY, first + i)) for i in range(200)]
    assert stack.redis().exists(*stored) == 0


def test_scaleout_benchmark_runs_every_arrangement_and_writes_results(models_dir, tmp_path):
    """The four arrangements (folder and store, one worker and two) on tiny jobs: JSON and the RESULTS section."""
    from benchmarks import scaleout

    results_md = tmp_path / "RESULTS.md"
    assert scaleout.main(["--models-dir", str(models_dir), "--n", "300", "--rounds", "1",
                          "--results-dir", str(tmp_path), "--results-md", str(results_md)]) == 0
    result = json.loads((tmp_path / f"scaleout_{FAMILY}.json").read_text())
    assert [(row["layout"], row["workers"]) for row in result["summary"]] == [
        ("folder", 1), ("folder", 2), ("s3", 1), ("s3", 2)]
    assert all(run["samples_per_second"] > 0 and run["result_bytes"] > 0 for run in result["runs"])
    assert result["summary"][0]["speedup"] == 1.0 and "cpu_steal" in result["host"]
    assert "### Scale-out:" in results_md.read_text()


@needs_shared
def test_student_blocks_time_every_candidate_and_folded_exports_match(tmp_path, tiny_models, restore_torch_threads):
    from benchmarks import student_blocks

    md = tmp_path / "RESULTS.md"
    assert student_blocks.main(["--family", FAMILY, "--models-dir", str(tiny_models), "--teacher-path",
                                str(SHARED / "teachers" / "cgn_mnist"), "--batches", "2,4", "--rounds", "1",
                                "--min-seconds", "0", "--results-dir", str(tmp_path),
                                "--results-md", str(md)]) == 0
    result = json.loads((tmp_path / f"student_blocks_{FAMILY}_1t.json").read_text())
    assert set(result["candidates"]) == set(student_blocks.CANDIDATES)
    for entry in result["candidates"].values():
        assert entry["best_batch"] in (2, 4) and entry["ratio"] > 0 and entry["parity_max_abs_diff"] <= 1e-4
    assert "### Student blocks:" in md.read_text()
