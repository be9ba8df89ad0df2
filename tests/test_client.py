"""The researcher's toolkit against the real stack: the client (sync and async), typed errors and retries,
resumable checksum-verified downloads, the `skdcgn` CLI, webdataset jobs and the torch datasets."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import httpx
import numpy as np
import pytest
from PIL import Image

from client.api import AsyncClient, Client
from client.cli import main as cli
from client.errors import (
    ChecksumMismatch, Conflict, JobCancelled, NotFound, RateLimited, ServiceUnavailable, ValidationError,
)
from tests.paths import REPO
from tests.service_helpers import images_of, load_npz

SEED = 7
N = 120  # samples of the module's jobs: 3 chunks of 50 on the shared stack
SHARD = 50  # samples per tar shard of its webdataset job: shards of 50, 50, 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def api(stack):
    with Client(stack.url, timeout=30) as connection:
        yield connection


@pytest.fixture(scope="module")
def npz_job(api, tmp_path_factory):
    """A finished npz job and its verified download."""
    job = api.wait(api.create_job(N, seed=SEED, format="npz"), progress=False, timeout=120)
    directory = tmp_path_factory.mktemp("npz")
    (downloaded,) = api.download(job, directory, progress=False)
    return job, downloaded


@pytest.fixture(scope="module")
def webdataset_dir(stack, tmp_path_factory):
    """`skdcgn jobs create --format webdataset ... --wait --download DIR`, end to end through the CLI."""
    directory = tmp_path_factory.mktemp("wds") / "download"
    code = cli(["--url", stack.url, "jobs", "create", "--n", str(N), "--format", "webdataset", "--seed", str(SEED),
                "--shard-size", str(SHARD), "--wait", "--download", str(directory), "--no-progress"])
    assert code == 0
    return directory


def test_importing_the_client_needs_no_torch_onnxruntime_or_fastapi():
    code = ("import sys, client, client.api, client.cli, client.errors\n"
            "heavy = [m for m in ('torch', 'onnxruntime', 'fastapi', 'starlette', 'pydantic', 'redis', 'celery') "
            "if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert client.cli.main(['--help']) == 0\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_round_trip_sync_and_async(api, client, stack):
    rendered = api.counterfactual(3, 7, 1, n=4, seed=123, return_components=True, return_noise=True)
    raw = client.post("/counterfactual", json={"shape": 3, "texture": 7, "background": 1, "n": 4, "seed": 123}).json()
    assert rendered.images.shape == (4, 32, 32, 3) and rendered.images.dtype == np.uint8
    np.testing.assert_array_equal(rendered.images, images_of(raw))
    np.testing.assert_array_equal(np.asarray(rendered), rendered.images)
    assert (rendered.seed, rendered.model, rendered.version) == (123, raw["model"], raw["version"])
    assert set(rendered.components) == {"mask", "texture", "background"}
    assert rendered.z["shape"].shape == (4, 32) and rendered.z["shape"].dtype == np.float32

    again = api.counterfactual(3, 7, 1, n=4, seed=123, z=rendered.z)  # the noise sent back: the same images
    np.testing.assert_array_equal(again.images, rendered.images)
    pil = api.counterfactual(3, 7, 1, n=2, seed=123, pil=True)
    assert all(isinstance(image, Image.Image) and image.size == (32, 32) for image in pil.images)
    np.testing.assert_array_equal(np.asarray(pil.images[1]), rendered.images[1])

    masks = api.generate("shape", 3, n=2, seed=1)
    assert masks.images.shape == (2, 32, 32, 3)
    models = api.models()
    assert models["default_model"] == rendered.model
    assert api.models(rendered.model)["name"] == rendered.model

    async def run_async():
        async with AsyncClient(stack.url) as asynchronous:
            images = (await asynchronous.counterfactual(3, 7, 1, n=4, seed=123)).images
            listed = await asynchronous.models()
            with pytest.raises(ValidationError):
                await asynchronous.counterfactual(99, 7, 1)
            return images, listed

    images, listed = asyncio.run(run_async())
    np.testing.assert_array_equal(images, rendered.images)
    assert listed["default_model"] == rendered.model


def test_server_errors_raise_typed_exceptions_with_the_servers_message(api):
    with pytest.raises(ValidationError) as invalid:
        api.counterfactual(99, 7, 1)
    assert invalid.value.status == 422 and "out of range" in invalid.value.message
    with pytest.raises(ValidationError) as too_many:
        api.counterfactual(3, 7, 1, n=1000)
    assert "maximum" in too_many.value.message
    with pytest.raises(NotFound) as unknown:
        api.counterfactual(3, 7, 1, model="no_such_family")
    assert "no_such_family" in unknown.value.message
    with pytest.raises(NotFound):
        api.status("0" * 32)
    with pytest.raises(ValidationError):
        api.create_job(10, format="npz", shard_size=5)  # shards are for tar formats

    job = api.create_job(5000, seed=1)  # 100 chunks: far from done when asked for its result
    with pytest.raises(Conflict) as early:
        api.checksums(job)
    assert job.id in early.value.message
    cancelled = api.cancel(job)
    assert cancelled.state == "cancelled" and api.cancel(job).state == "cancelled"  # no-op once ended
    with pytest.raises(JobCancelled):
        api.wait(job, progress=False)
    assert any(listed.id == job.id for listed in api.jobs(state="cancelled"))


def test_429_and_503_are_retried_after_retry_after_and_bounded():
    answers = []

    def handler(request: httpx.Request) -> httpx.Response:
        answers.append(request.url.path)
        if len(answers) <= 2:
            return httpx.Response(503, json={"error": "no worker is up"}, headers={"Retry-After": "0"})
        return httpx.Response(200, json={"default_model": "m", "models": [], "workers": []})

    with Client("http://test", transport=httpx.MockTransport(handler)) as mocked:
        assert mocked.models()["default_model"] == "m"
    assert len(answers) == 3

    def always(request: httpx.Request) -> httpx.Response:
        answers.append(request.url.path)
        return httpx.Response(429, json={"error": "the queue is full"}, headers={"Retry-After": "0.01"})

    answers.clear()
    with Client("http://test", transport=httpx.MockTransport(always), retries=2) as mocked:
        with pytest.raises(RateLimited) as limited:
            mocked.models()
    assert len(answers) == 3 and limited.value.message == "the queue is full"
    assert limited.value.retry_after == 0.01

    with Client("http://test", transport=httpx.MockTransport(
            lambda request: httpx.Response(503, text="upstream down")), retries=0) as mocked:
        with pytest.raises(ServiceUnavailable) as down:
            mocked.models()
    assert down.value.message == "upstream down"


def test_status_lists_files_with_checksums_and_the_server_serves_ranges(api, client, npz_job):
    job, downloaded = npz_job
    content = downloaded.path.read_bytes()
    (listed,) = job.files
    assert (listed.name, listed.bytes, listed.sha256) == ("result.npz", len(content), sha256(content))
    assert api.checksums(job) == {"result.npz": sha256(content)}
    assert client.get(listed.url).content == content
    part = client.get(listed.url, headers={"Range": "bytes=100-"})
    assert part.status_code == 206 and part.headers["content-range"] == f"bytes 100-{len(content) - 1}/{len(content)}"
    assert part.content == content[100:]
    assert client.get(f"/jobs/{job.id}/result", params={"file": "../result.npz"}).status_code == 404
    assert client.get(f"/jobs/{job.id}/result", params={"file": "result.npz", "shard": 0}).status_code == 422

    data = load_npz(content)
    assert data["images"].shape == (N, 32, 32, 3)
    np.testing.assert_array_equal(data["indices"], np.arange(N))


def test_download_resumes_a_partial_file_and_detects_corruption(api, npz_job, tmp_path):
    job, reference = npz_job
    content = reference.path.read_bytes()
    cut = len(content) // 3

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "result.npz.part").write_bytes(content[:cut])  # as if interrupted after `cut` bytes
    (item,) = api.download(job, resumed, progress=False)
    assert (item.resumed_from, item.received) == (cut, len(content) - cut)  # only the rest came over the wire
    assert item.path.read_bytes() == content and not (resumed / "result.npz.part").exists()
    (again,) = api.download(job, resumed, progress=False)  # verified already: nothing to fetch
    assert again.received == 0

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    damaged = bytearray(content[:cut])
    damaged[cut // 2] ^= 0xFF
    (corrupt / "result.npz.part").write_bytes(bytes(damaged))
    with pytest.raises(ChecksumMismatch) as mismatch:
        api.download(job, corrupt, progress=False)
    assert mismatch.value.name == "result.npz" and mismatch.value.expected == sha256(content)
    assert not (corrupt / "result.npz.part").exists() and not (corrupt / "result.npz").exists()
    (fresh,) = api.download(job, corrupt, progress=False)  # the next try starts over
    assert fresh.resumed_from == 0 and fresh.path.read_bytes() == content

    async def download_async():
        async with AsyncClient(api.url) as asynchronous:
            (tmp_path / "async").mkdir()
            (tmp_path / "async" / "result.npz.part").write_bytes(content[:cut])
            return await asynchronous.download(job.id, tmp_path / "async", progress=False)

    (async_item,) = asyncio.run(download_async())
    assert async_item.resumed_from == cut and async_item.path.read_bytes() == content


@pytest.mark.parametrize("argv", [
    [], ["counterfactual"], ["generate"], ["jobs"], ["jobs", "create"], ["jobs", "list"], ["jobs", "status"],
    ["jobs", "wait"], ["jobs", "download"], ["jobs", "cancel"], ["models"], ["models", "list"],
    ["models", "promote"], ["models", "rollback"], ["serve"], ["distill"],
])
def test_every_cli_command_has_help(argv, capsys):
    assert cli([*argv, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_cli_exit_codes(stack, tmp_path, capsys):
    assert cli(["jobs", "create"]) == 2  # --n missing
    assert cli(["counterfactual", "--shape", "x", "--texture", "1", "--background", "1", "--out", "a.png"]) == 2
    assert cli(["jobs", "list", "--bogus"]) == 2
    assert cli(["--url", stack.url, "counterfactual", "--shape", "99", "--texture", "1", "--background", "1",
                "--out", str(tmp_path / "x.png")]) == 2  # the server's 422: the command line was wrong
    assert "out of range" in capsys.readouterr().err
    with Client(stack.url) as connection:
        job_id = connection.create_job(5000, seed=2).id
    assert cli(["--url", stack.url, "jobs", "cancel", job_id]) == 0
    assert cli(["--url", stack.url, "jobs", "wait", job_id, "--no-progress"]) == 1  # cancelled: it failed
    assert "cancelled" in capsys.readouterr().err


def test_cli_counterfactual_writes_a_png_grid_or_an_npz(stack, api, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert cli(["--url", stack.url, "counterfactual", "--shape", "3", "--texture", "2", "--background", "5",
                "--n", "8", "--seed", "1", "--out", str(grid)]) == 0
    assert "seed 1" in capsys.readouterr().out
    assert Image.open(grid).size == (3 * 32 + 4 * 2, 3 * 32 + 4 * 2)  # 8 images in a 3×3 grid, 2 px gaps
    arrays = tmp_path / "cf.npz"
    assert cli(["--url", stack.url, "counterfactual", "--shape", "3", "--texture", "2", "--background", "5",
                "--n", "8", "--seed", "1", "--out", str(arrays), "--components"]) == 0
    with np.load(arrays) as data:
        np.testing.assert_array_equal(data["images"], api.counterfactual(3, 2, 5, n=8, seed=1).images)
        assert data["labels"].tolist() == [[3, 2, 5]] * 8 and int(data["seed"]) == 1
        assert data["component_mask"].shape == (8, 32, 32, 3)


def test_cli_webdataset_job_reads_with_the_webdataset_library(webdataset_dir, api, npz_job, capsys, stack):
    import webdataset as wds

    names = sorted(path.name for path in webdataset_dir.iterdir())
    assert names == ["SHA256SUMS", "provenance.json", "result-00000.tar", "result-00001.tar", "result-00002.tar"]
    sums = dict(line.split("  ")[::-1] for line in (webdataset_dir / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {"provenance.json", "result-00000.tar", "result-00001.tar", "result-00002.tar"}
    for name, digest in sums.items():
        assert sha256((webdataset_dir / name).read_bytes()) == digest
    provenance = json.loads((webdataset_dir / "provenance.json").read_text())
    assert (provenance["seed"], provenance["samples"], provenance["indices"]) == (SEED, N, [0, N])
    assert [item["indices"] for item in provenance["files"]] == [[0, 50], [50, 100], [100, 120]]
    for shard in range(3):  # only sample members inside the shards
        with tarfile.open(webdataset_dir / f"result-{shard:05d}.tar") as archive:
            assert {name.rsplit(".", 1)[1] for name in archive.getnames()} == {"png", "cls", "json"}

    shards = [str(webdataset_dir / f"result-{shard:05d}.tar") for shard in range(3)]
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert len(samples) == N
    reference = load_npz(npz_job[1].path.read_bytes())  # the npz job of the same seed holds the same samples
    for sample in samples:
        meta = json.loads(sample["json"])
        index = meta["index"]
        assert int(sample["cls"]) == meta["shape"] == reference["labels"][index][0]
        assert [meta["shape"], meta["texture"], meta["background"]] == reference["labels"][index].tolist()
        assert meta["seed"] == SEED and sample["__key__"] == f"{index:06d}"
    image = np.asarray(Image.open(io.BytesIO(samples[5]["png"])).convert("RGB"))
    np.testing.assert_array_equal(image, reference["images"][json.loads(samples[5]["json"])["index"]])

    # list, status, download again (verified files are kept), through the CLI
    job_id = next(job.id for job in api.jobs(state="succeeded") if job.format == "webdataset" and job.total == N)
    capsys.readouterr()
    assert cli(["--url", stack.url, "jobs", "list", "--state", "succeeded"]) == 0
    assert job_id in capsys.readouterr().out
    assert cli(["--url", stack.url, "jobs", "status", job_id]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [item["name"] for item in status["files"]] == ["result-00000.tar", "result-00001.tar",
                                                          "result-00002.tar", "provenance.json", "SHA256SUMS"]
    assert cli(["--url", stack.url, "jobs", "download", job_id, str(webdataset_dir), "--no-progress"]) == 0
    assert capsys.readouterr().out.count(" ok") == 5


def test_torch_datasets_read_downloads_and_stream_distinct_samples(stack, api, npz_job, webdataset_dir, tmp_path):
    import torch
    from torch.utils.data import DataLoader

    from client.torch_data import NpzCounterfactuals, ShardCounterfactuals, StreamingCounterfactuals

    reference = load_npz(npz_job[1].path.read_bytes())
    from_npz = NpzCounterfactuals(npz_job[1])
    assert len(from_npz) == N
    x, y = from_npz[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y == reference["labels"][4][0]
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy() * 255, reference["images"][4], atol=1e-3)

    shards = ShardCounterfactuals(webdataset_dir, target="labels", with_meta=True)
    assert len(shards) == N
    batches = list(DataLoader(shards, batch_size=32, num_workers=0))
    labels = torch.cat([batch[1] for batch in batches])
    indices = torch.cat([batch[2]["index"] for batch in batches])
    np.testing.assert_array_equal(labels.numpy(), reference["labels"][indices.numpy()])
    images = torch.cat([batch[0] for batch in batches])
    np.testing.assert_allclose(images[7].permute(1, 2, 0).numpy() * 255, reference["images"][int(indices[7])],
                               atol=1e-3)

    png_job = api.wait(api.create_job(30, seed=SEED, format="png"), progress=False, timeout=120)
    png_files = api.download(png_job, tmp_path / "png", progress=False)
    from_png = ShardCounterfactuals(png_files[0])
    assert len(from_png) == 30 and from_png[3][1] == reference["labels"][3][0]

    stream = StreamingCounterfactuals(stack.url, seed=3, samples_per_epoch=40, n_per_request=4, with_meta=True)
    loader = DataLoader(stream, batch_size=8, num_workers=2)
    seen = [(int(seed), int(index), images[i].numpy().tobytes())
            for images, _, meta in loader for i, (seed, index) in enumerate(zip(meta["seed"], meta["index"]))]
    assert len(seen) == 40
    assert len({(seed, index) for seed, index, _ in seen}) == 40  # no sample twice
    assert len({pixels for _, _, pixels in seen}) == 40
    requests = sorted({seed for seed, _, _ in seen})
    assert [seed & (2**24 - 1) for seed in requests] == list(range(10))  # requests 0..9, split over both workers
    stream.set_epoch(1)
    next_epoch = {int(seed) for _, _, meta in DataLoader(stream, batch_size=8, num_workers=2) for seed in meta["seed"]}
    assert not next_epoch & set(requests)


def test_example_trains_the_invariant_classifier_from_a_job(stack, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "SKDCGN_URL": stack.url}
    result = subprocess.run(
        [sys.executable, str(REPO / "docs" / "examples" / "train_from_job.py"), "--n", "200", "--epochs", "1",
         "--per-shape", "2", "--dir", str(tmp_path), "--no-progress", "--format", "webdataset"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 200 and 0 <= summary["heldout_counterfactual_accuracy"] <= 100
