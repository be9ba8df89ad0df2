"""Benchmark mechanics: MAC counting with known answers, the teacher's ONNX export, the ONNX variants timed as
ModelRuntime's own calls, the model benchmark end to end on tiny students, and the serving load generator (against a stub app, then against the real service).
Nothing here asserts a speed."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from torch import nn

from benchmarks import models as model_bench
from benchmarks import serving
from core.noise import MECHANISMS, NoiseSpec
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
        "--teacher-path", str(SHARED / "teachers" / "cgn_mnist"), "--batches", "1,4", "--min-seconds", "0",
        "--threads", "1", "--torch-threads", "1", "--results-dir", str(results), "--results-md", str(md)]) == 0
    result = json.loads((results / f"models_{FAMILY}.json").read_text())
    for engine in ("teacher/onnxruntime-cpu", "student/onnxruntime-cpu", "teacher/pytorch-cpu", "student/pytorch-cpu"):
        per_batch = result["images_per_second"][engine]["fused" if "onnx" in engine else "all"]
        assert set(per_batch) == {"1", "4"} and all(isinstance(v, float) for v in per_batch.values()), per_batch
    assert set(result["speedup"]) == {*MECHANISMS, "three_sessions", "fused"}
    assert "random weights" in result["student_torch_weights"]
    assert (md.parent / f"throughput_{FAMILY}.png").is_file() and "bench-models-" in md.read_text()


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def stub_app() -> FastAPI:
    """Just the HTTP contract: answers are cached by body, jobs succeed on the third poll."""
    app, seen, polls = FastAPI(), set(), {}

    @app.get("/readyz")
    async def ready():
        return {"ready": True}

    @app.post("/counterfactual")
    async def counterfactual(body: dict):
        key = json.dumps(body, sort_keys=True)
        cached = key in seen
        seen.add(key)
        await asyncio.sleep(0.001)
        return {"images": [PNG] * body["n"], "cached": cached}

    @app.post("/jobs", status_code=202)
    async def create_job(body: dict):
        job_id = uuid.uuid4().hex
        polls[job_id] = 0
        return {"id": job_id, "state": "queued"}

    @app.get("/jobs/{job_id}")
    async def job(job_id: str):
        polls[job_id] += 1
        return {"id": job_id, "state": "succeeded" if polls[job_id] >= 3 else "running"}

    return app


@pytest.fixture
def stub_url():
    server = uvicorn.Server(uvicorn.Config(stub_app(), host="127.0.0.1", port=serving.free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_load_generator_mechanics_against_stub_app(stub_url):
    """Load-generator mechanics only (a stub app, not the service): bounds, hit/miss phases, percentiles, jobs."""
    result = asyncio.run(serving.benchmark(stub_url, "m", concurrencies=(1, 4), max_requests=20, max_seconds=5,
                                           job_n=10, job_timeout_s=10))
    assert [level["concurrency"] for level in result["levels"]] == [1, 4]
    for level in result["levels"]:
        miss, hit = level["miss"], level["hit"]
        assert miss["requests"] <= 20 and miss["ok"] == miss["requests"] and miss["cached_answers"] == 0
        assert hit["cached_answers"] == hit["ok"] > 0
        assert miss["p50_ms"] <= miss["p95_ms"] <= miss["p99_ms"]
    assert result["job"]["state"] == "succeeded" and result["job"]["images_per_second"] > 0
    timed = asyncio.run(serving.benchmark(stub_url, "m", concurrencies=(2,), max_requests=10**6, max_seconds=0.3,
                                          job_n=1, job_timeout_s=10))
    assert timed["levels"][0]["miss"]["requests"] < 10**6  # the time bound, not the count, ended the phase


def test_load_generator_refuses_non_loopback():
    with pytest.raises(serving.BenchmarkError, match="loopback"):
        asyncio.run(serving.benchmark("http://example.com:8000", "m"))


def test_serving_benchmark_against_the_real_service(stack, models_dir, tmp_path):
    """A few seconds of load on the real gateway + Celery worker + Redis (the service tests' shared stack)."""
    result = asyncio.run(serving.benchmark(stack.url, FAMILY, concurrencies=(1, 4), max_requests=12, max_seconds=4,
                                           job_n=100, job_timeout_s=60))
    result["raw_onnxruntime"] = serving.raw_onnxruntime(str(models_dir), FAMILY, 64, batch=32)
    for level in result["levels"]:
        assert level["miss"]["ok"] > 0 and level["hit"]["ok"] > 0
        assert level["hit"]["cached_answers"] == level["hit"]["ok"]
    assert result["job"]["state"] == "succeeded"
    serving.plot(result, tmp_path / "latency.png")
    text = serving.markdown(result, "latency.png")
    assert "p95 ms" in text and "Raw onnxruntime" in text and (tmp_path / "latency.png").is_file()
    bulk, hit = serving.targets(result)  # measured, never asserted: timings are not test outcomes
    assert bulk["value"] > 0 and hit["value"] > 0 and "cache-hit p50" in text
