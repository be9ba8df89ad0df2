"""`Client` and `AsyncClient`: the service's HTTP API as Python calls returning numpy arrays, with typed errors,
bounded retries of 429 and 503, job progress bars and resumable, checksum-verified downloads.

Each operation is written once, as a generator that yields HTTP calls (and pauses) and receives the answers;
the synchronous and the asynchronous client only differ in how they send them.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Optional, Union

import httpx
import numpy as np
from PIL import Image

from client.errors import (
    ChecksumMismatch, ConnectionFailed, JobCancelled, JobFailed, SkdcgnError, WaitTimeout, api_error,
)
from core.settings import ClientSettings
from core.vocabulary import CANCELLED, ENDED_STATES, FAILED, MECHANISMS, SUCCEEDED

RETRY_STATUSES = (429, 503)
CONNECT_RETRIES = 2  # a refused connection is tried again twice (0.2 s, 0.4 s): a service restarting, not one down
DEFAULT_RETRY_AFTER_S = 1.0
PART_SUFFIX = ".part"  # an unfinished download: resumed from its size, renamed once its sha256 checks out
CHUNK_BYTES = 1 << 16


# --- values --------------------------------------------------------------------------------------------------------

def decode_png(data: str | bytes, pil: bool = False):
    """A base64 (or raw) PNG as uint8 [H, W, 3], or as a PIL image."""
    raw = base64.b64decode(data) if isinstance(data, str) else data
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    return image if pil else np.asarray(image)


def _images(encoded: list[str], pil: bool):
    decoded = [decode_png(item, pil) for item in encoded]
    return decoded if pil else np.stack(decoded)


@dataclass
class Rendered:
    """An answer of /counterfactual or /generate: `images` uint8 [N, H, W, 3] (a list of PIL images with
    `pil=True`), the model that made them, the seed, and the components or noise when asked for."""

    images: Union[np.ndarray, list]
    seed: int
    model: str
    version: str
    manifest_sha256: str
    provider: str
    cached: bool
    components: Optional[dict] = None  # mechanism -> images, like `images`
    z: Optional[dict] = None  # mechanism -> float32 [N, dim]

    @classmethod
    def from_payload(cls, payload: dict, pil: bool = False) -> "Rendered":
        components = payload.get("components")
        z = payload.get("z")
        return cls(_images(payload["images"], pil), int(payload["seed"]), payload["model"], payload["version"],
                   payload["manifest_sha256"], payload.get("provider", ""), bool(payload.get("cached", False)),
                   {name: _images(items, pil) for name, items in components.items()} if components else None,
                   {name: np.asarray(vectors, np.float32) for name, vectors in z.items()} if z else None)

    def __len__(self) -> int:
        return len(self.images)

    def __array__(self, dtype=None, copy=None):
        images = np.stack([np.asarray(image) for image in self.images]) if isinstance(self.images, list) \
            else self.images
        return images.astype(dtype) if dtype is not None else images


@dataclass(frozen=True)
class JobFile:
    """One file of a job's result: name, size, the sha256 the worker computed, its URL, and with results in an object
    store a presigned URL straight to it (client.store reads it)."""

    name: str
    bytes: int
    sha256: str
    url: str
    store_url: Optional[str] = None


@dataclass
class Job:
    """A job's status as GET /jobs/{id} returns it; `raw` is the whole body."""

    id: str
    state: str
    done: int
    total: int
    format: str
    shards: int
    seed: int
    model: str
    version: str
    manifest_sha256: str
    created: str
    started: Optional[str] = None
    finished: Optional[str] = None
    error: Optional[str] = None
    result_url: Optional[str] = None
    files: Optional[list[JobFile]] = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_status(cls, status: dict) -> "Job":
        files = status.get("files")
        return cls(status["id"], status["state"], status["progress"]["done"], status["progress"]["total"],
                   status["format"], status["shards"], status["seed"], status["model"], status["version"],
                   status["manifest_sha256"], status["created"], status.get("started"), status.get("finished"),
                   status.get("error"), status.get("result_url"),
                   [JobFile(f["name"], f["bytes"], f["sha256"], f["url"], f.get("store_url")) for f in files] if files else None, status)

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == SUCCEEDED


@dataclass(frozen=True)
class DownloadedFile(os.PathLike):
    """A verified file in the download directory (usable as a path); `received` bytes came over the network
    this time, `resumed_from` were on disk already (a `.part` file)."""

    path: Path
    name: str
    bytes: int
    sha256: str
    received: int
    resumed_from: int

    def __fspath__(self) -> str:
        return str(self.path)


def job_id_of(job: Union[Job, str]) -> str:
    return job.id if isinstance(job, Job) else str(job)


def _labels_body(labels: Optional[dict]) -> dict:
    if not labels:
        return {}
    unknown = set(labels) - set(MECHANISMS)
    if unknown:
        raise ValueError(f"labels: unknown mechanism(s) {sorted(unknown)}; use {', '.join(MECHANISMS)}")
    return {name: (None if values is None else [int(v) for v in values]) for name, values in labels.items()}


def _drop_none(body: dict) -> dict:
    return {key: value for key, value in body.items() if value is not None}


def _z_body(z) -> Optional[dict]:
    if z is None:
        return None
    return {name: np.asarray(vectors, np.float64).tolist() for name, vectors in z.items()}


# --- the operations, written once -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """One HTTP request an operation needs; the driver answers with the (2xx) httpx.Response."""

    method: str
    path: str
    json: Any = None
    params: Optional[dict] = None
    headers: Optional[dict] = None


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class Fetch:
    """Download one file into its `.part` file and verify it; the driver answers with a DownloadedFile."""

    file: JobFile
    directory: Path
    bar: Any


Step = Union[Call, Pause, Fetch]
Operation = Generator[Step, Any, Any]


def retry_delay(response: httpx.Response, cap: float) -> float:
    """Seconds to wait before retrying a 429 or 503: its Retry-After (seconds), at most `cap`."""
    try:
        seconds = float(response.headers.get("retry-after", DEFAULT_RETRY_AFTER_S))
    except ValueError:  # an HTTP date: not sent by this service
        seconds = DEFAULT_RETRY_AFTER_S
    return max(0.0, min(seconds, cap))


def raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    raise api_error(response.status_code, body, response.text, dict(response.headers), response.request.method,
                    str(response.request.url.copy_with(query=None)))


def _progress(total: int, description: str, enabled: bool, unit: str = "it", initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B"
                else 1000, initial=initial, disable=not enabled, leave=True, dynamic_ncols=True)


class _Operations:
    """The API's operations as generators of Steps (see Call, Pause, Fetch)."""

    def _op_counterfactual(self, shape: int, texture: int, background: int, n: int = 1, seed: Optional[int] = None, *,
                           model: Optional[str] = None, version: Optional[str] = None, mask: Optional[dict] = None,
                           z: Optional[dict] = None, return_components: bool = False, return_noise: bool = False,
                           pil: bool = False) -> Operation:
        body = _drop_none({"shape": int(shape), "texture": int(texture), "background": int(background), "n": int(n),
                           "seed": seed, "model": model, "version": version, "mask": mask, "z": _z_body(z)})
        if return_components:
            body["return_components"] = True
        if return_noise:
            body["return_noise"] = True
        response = yield Call("POST", "/counterfactual", json=body, headers={"Accept": "application/json"})
        return Rendered.from_payload(response.json(), pil)

    def _op_generate(self, mechanism: str, label: int, n: int = 1, seed: Optional[int] = None, *,
                     model: Optional[str] = None, version: Optional[str] = None, z=None, return_noise: bool = False,
                     pil: bool = False) -> Operation:
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism {mechanism!r}: use one of {', '.join(MECHANISMS)}")
        body = _drop_none({"label": int(label), "n": int(n), "seed": seed, "model": model, "version": version,
                           "z": None if z is None else np.asarray(z, np.float64).tolist()})
        if return_noise:
            body["return_noise"] = True
        response = yield Call("POST", f"/generate/{mechanism}", json=body, headers={"Accept": "application/json"})
        return Rendered.from_payload(response.json(), pil)

    def _op_models(self, family: Optional[str] = None) -> Operation:
        response = yield Call("GET", f"/models/{family}" if family else "/models")
        return response.json()

    def _op_create_job(self, n: int, *, format: str = "npz", seed: Optional[int] = None,
                       counterfactuals_per_shape: int = 1, labels: Optional[dict] = None, mask: Optional[dict] = None,
                       model: Optional[str] = None, version: Optional[str] = None,
                       shard_size: Optional[int] = None) -> Operation:
        body = _drop_none({"n": int(n), "format": format, "seed": seed, "model": model, "version": version,
                           "mask": mask, "shard_size": shard_size})
        if counterfactuals_per_shape != 1:
            body["counterfactuals_per_shape"] = int(counterfactuals_per_shape)
        if labels:
            body["labels"] = _labels_body(labels)
        response = yield Call("POST", "/jobs", json=body)
        return Job.from_status(response.json())

    def _op_status(self, job: Union[Job, str]) -> Operation:
        response = yield Call("GET", f"/jobs/{job_id_of(job)}")
        return Job.from_status(response.json())

    def _op_checksums(self, job: Union[Job, str]) -> Operation:
        response = yield Call("GET", f"/jobs/{job_id_of(job)}/checksums")
        return response.json()["files"]

    def _op_jobs(self, state: Optional[str] = None, limit: Optional[int] = None) -> Operation:
        jobs: list[Job] = []
        cursor = None
        while limit is None or len(jobs) < limit:
            page_size = 100 if limit is None else min(100, limit - len(jobs))
            response = yield Call("GET", "/jobs", params=_drop_none({"state": state, "limit": page_size,
                                                                     "cursor": cursor}))
            page = response.json()
            jobs += [Job.from_status(status) for status in page["jobs"]]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return jobs

    def _op_cancel(self, job: Union[Job, str]) -> Operation:
        """Cancel a queued or running job; an ended job is left as it is (see `delete` to remove one)."""
        status = yield from self._op_status(job)
        if status.ended:
            return status
        response = yield Call("DELETE", f"/jobs/{status.id}")
        if response.status_code == 204:  # it ended between the two calls, and DELETE removed it
            return status
        return Job.from_status(response.json())

    def _op_delete(self, job: Union[Job, str]) -> Operation:
        """Cancel an active job, or delete an ended one with its files."""
        response = yield Call("DELETE", f"/jobs/{job_id_of(job)}")
        return None if response.status_code == 204 else Job.from_status(response.json())

    def _op_wait(self, job: Union[Job, str], progress: bool = True, timeout: Optional[float] = None,
                 poll_interval: float = 0.5) -> Operation:
        status = yield from self._op_status(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _progress(status.total, f"job {status.id[:8]}", progress, "sample")
        try:
            while True:
                bar.update(status.done - bar.n)
                bar.set_postfix_str(status.state, refresh=True)
                if status.ended:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(f"job {status.id} is still {status.state} ({status.done}/{status.total} "
                                      f"samples) after {timeout:g} s")
                yield Pause(poll_interval)
                status = yield from self._op_status(status.id)
        finally:
            bar.close()
        if status.state == FAILED:
            raise JobFailed(status, status.error or "no error recorded")
        if status.state == CANCELLED:
            raise JobCancelled(status, "cancelled before it succeeded")
        return status

    def _op_download(self, job: Union[Job, str], directory: Union[str, os.PathLike], progress: bool = True) -> Operation:
        status = yield from self._op_status(job)
        if not status.succeeded:
            yield Call("GET", f"/jobs/{status.id}/checksums")  # the server's 409 says what state it is in
            raise SkdcgnError(f"job {status.id} is {status.state}: its result exists once it has succeeded")
        if not status.files:
            raise SkdcgnError(f"job {status.id} lists no result files with checksums (assembled by an older "
                              "release of the service); download it with GET {status.result_url}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        on_disk = sum(_resumable_bytes(directory, item) for item in status.files)
        bar = _progress(sum(item.bytes for item in status.files), f"download {status.id[:8]}", progress, "B",
                        on_disk)
        downloaded = []
        try:
            for item in status.files:
                downloaded.append((yield Fetch(item, directory, bar)))
        finally:
            bar.close()
        return downloaded


# --- downloads: the file bookkeeping both drivers share -------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resumable_bytes(directory: Path, item: JobFile) -> int:
    final, part = directory / item.name, directory / (item.name + PART_SUFFIX)
    if final.is_file() and final.stat().st_size == item.bytes:
        return item.bytes
    if part.is_file() and part.stat().st_size <= item.bytes:
        return part.stat().st_size
    return 0


def _safe_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise SkdcgnError(f"the server named a result file {name!r}, which is no plain file name")
    return name


class _Transfer:
    """One file's download: where it resumes from, and its verification at the end."""

    def __init__(self, item: JobFile, directory: Path):
        self.item = item
        self.final = directory / _safe_name(item.name)
        self.part = directory / (item.name + PART_SUFFIX)
        self.done = False
        if self.final.is_file() and self.final.stat().st_size == item.bytes and sha256_of(self.final) == item.sha256:
            self.done = True  # downloaded and verified before
        self.offset = 0
        if not self.done and self.part.is_file():
            self.offset = self.part.stat().st_size
            if self.offset > item.bytes:  # not a prefix of this file
                self.part.unlink()
                self.offset = 0
        self.resumed_from, self.received = self.offset, 0

    def headers(self) -> dict:
        return {"Range": f"bytes={self.offset}-"} if self.offset else {}

    def open(self, status: int, bar):
        """The .part file to write the answer's body to: appended to after 206, rewritten after 200 (a server
        that ignored the Range header sends the whole file)."""
        if status == 206:
            return open(self.part, "ab")
        bar.update(-self.offset)
        self.offset = self.resumed_from = 0
        return open(self.part, "wb")

    def finish(self) -> DownloadedFile:
        if not self.done:
            actual = sha256_of(self.part)
            if actual != self.item.sha256:
                self.part.unlink(missing_ok=True)
                raise ChecksumMismatch(self.item.name, self.item.sha256, actual)
            os.replace(self.part, self.final)
        return DownloadedFile(self.final, self.item.name, self.item.bytes, self.item.sha256, self.received,
                              self.resumed_from)


# --- the drivers ---------------------------------------------------------------------------------------------------

class _Base(_Operations):
    def __init__(self, url: Optional[str] = None, api_key: Optional[str] = None, *, timeout: float = 60.0,
                 retries: int = 5, max_retry_wait_s: float = 30.0):
        """`url` and `api_key` default to SKDCGN_URL (http://127.0.0.1:8000) and SKDCGN_API_KEY. 429 and 503
        answers are retried up to `retries` times after their Retry-After, each wait at most `max_retry_wait_s`."""
        settings = ClientSettings.from_env() if url is None or api_key is None else None
        self.url = (url or settings.url).rstrip("/")
        self.api_key = api_key if api_key is not None else settings.api_key
        self.timeout, self.retries, self.max_retry_wait_s = timeout, retries, max_retry_wait_s
        self.headers = {"User-Agent": "skdcgn-client"} | ({"X-API-Key": self.api_key} if self.api_key else {})

    def _request(self, call: Call) -> httpx.Request:
        return self.http.build_request(call.method, call.path, json=call.json, params=call.params,
                                       headers=call.headers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class Client(_Base):
    """The service's API, synchronously. Use as a context manager, or call close()."""

    def __init__(self, url: Optional[str] = None, api_key: Optional[str] = None, **options):
        transport = options.pop("transport", None)
        super().__init__(url, api_key, **options)
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout, transport=transport)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        """Send with the bounded retries; a non-2xx answer (after them) raises its typed error."""
        for attempt in range(self.retries + 1):
            try:
                response = self.http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if attempt < min(self.retries, CONNECT_RETRIES) and isinstance(exc, httpx.ConnectError):
                    time.sleep(min(2.0 ** attempt * 0.2, self.max_retry_wait_s))
                    continue
                raise ConnectionFailed(f"cannot reach the service at {self.url} ({request.method} "
                                       f"{request.url.path}): {exc}") from exc
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                response.close()
                time.sleep(retry_delay(response, self.max_retry_wait_s))
                continue
            if response.status_code >= 400 and stream:
                response.read()
            raise_for(response)
            return response
        raise AssertionError("unreachable")

    def _fetch(self, step: Fetch) -> DownloadedFile:
        transfer = _Transfer(step.file, step.directory)
        if not transfer.done and transfer.offset < step.file.bytes:
            request = self.http.build_request("GET", step.file.url, headers=transfer.headers())
            response = self._send(request, stream=True)
            try:
                with transfer.open(response.status_code, step.bar) as handle:
                    for block in response.iter_bytes(CHUNK_BYTES):
                        handle.write(block)
                        transfer.received += len(block)
                        step.bar.update(len(block))
            finally:
                response.close()
        return transfer.finish()

    def _drive(self, operation: Operation):
        answer = None
        try:
            while True:
                step = operation.send(answer)
                if isinstance(step, Call):
                    answer = self._send(self._request(step))
                elif isinstance(step, Pause):
                    time.sleep(step.seconds)
                    answer = None
                else:
                    answer = self._fetch(step)
        except StopIteration as stop:
            return stop.value

    def counterfactual(self, shape: int, texture: int, background: int, n: int = 1, seed: Optional[int] = None,
                       **options) -> Rendered:
        """n counterfactuals: the shape of label `shape`, the texture of `texture`, the background of `background`.
        Options: model, version, mask (transparency, rotation_deg, noise_std), z ({mechanism: [n, dim]}),
        return_components, return_noise, pil (PIL images instead of arrays)."""
        return self._drive(self._op_counterfactual(shape, texture, background, n, seed, **options))

    def generate(self, mechanism: str, label: int, n: int = 1, seed: Optional[int] = None, **options) -> Rendered:
        """One mechanism's raw output (shape: masks, texture, background). Options: model, version, z ([n, dim]),
        return_noise, pil."""
        return self._drive(self._op_generate(mechanism, label, n, seed, **options))

    def models(self, family: Optional[str] = None) -> dict:
        """GET /models (families, versions, workers), or GET /models/{family} (every version)."""
        return self._drive(self._op_models(family))

    def create_job(self, n: int, **options) -> Job:
        """Queue a dataset job. Options: format (npz, png, webdataset), seed, counterfactuals_per_shape, labels
        ({mechanism: allowed labels}), mask, model, version, shard_size."""
        return self._drive(self._op_create_job(n, **options))

    def status(self, job: Union[Job, str]) -> Job:
        return self._drive(self._op_status(job))

    def checksums(self, job: Union[Job, str]) -> dict[str, str]:
        """{file name: sha256} of a succeeded job's result files."""
        return self._drive(self._op_checksums(job))

    def jobs(self, state: Optional[str] = None, limit: Optional[int] = None) -> list[Job]:
        """Your jobs, newest first (every page, or the first `limit`), optionally only those in `state`."""
        return self._drive(self._op_jobs(state, limit))

    def wait(self, job: Union[Job, str], progress: bool = True, timeout: Optional[float] = None,
             poll_interval: float = 0.5) -> Job:
        """Poll until the job ends, with a progress bar; its final status when it succeeded, else JobFailed or
        JobCancelled (WaitTimeout after `timeout` seconds)."""
        return self._drive(self._op_wait(job, progress, timeout, poll_interval))

    def download(self, job: Union[Job, str], directory: Union[str, os.PathLike],
                 progress: bool = True) -> list[DownloadedFile]:
        """Every file of a succeeded job's result into `directory`, each verified against the sha256 the server
        published. An interrupted download (`<name>.part`) resumes with an HTTP Range request; a file already
        there and verified is skipped; a mismatch raises ChecksumMismatch and removes the bad copy."""
        return self._drive(self._op_download(job, directory, progress))

    def cancel(self, job: Union[Job, str]) -> Job:
        """Cancel a queued or running job; an ended job is returned as it is."""
        return self._drive(self._op_cancel(job))

    def delete(self, job: Union[Job, str]) -> Optional[Job]:
        """Cancel an active job (its status), or delete an ended one with its files (None)."""
        return self._drive(self._op_delete(job))


class AsyncClient(_Base):
    """The same API for asyncio: every method is a coroutine. Use `async with`, or await aclose()."""

    def __init__(self, url: Optional[str] = None, api_key: Optional[str] = None, **options):
        transport = options.pop("transport", None)
        super().__init__(url, api_key, **options)
        self.http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout,
                                      transport=transport)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = await self.http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if attempt < min(self.retries, CONNECT_RETRIES) and isinstance(exc, httpx.ConnectError):
                    await asyncio.sleep(min(2.0 ** attempt * 0.2, self.max_retry_wait_s))
                    continue
                raise ConnectionFailed(f"cannot reach the service at {self.url} ({request.method} "
                                       f"{request.url.path}): {exc}") from exc
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                await response.aclose()
                await asyncio.sleep(retry_delay(response, self.max_retry_wait_s))
                continue
            if response.status_code >= 400 and stream:
                await response.aread()
            raise_for(response)
            return response
        raise AssertionError("unreachable")

    async def _fetch(self, step: Fetch) -> DownloadedFile:
        transfer = _Transfer(step.file, step.directory)
        if not transfer.done and transfer.offset < step.file.bytes:
            request = self.http.build_request("GET", step.file.url, headers=transfer.headers())
            response = await self._send(request, stream=True)
            try:
                with transfer.open(response.status_code, step.bar) as handle:
                    async for block in response.aiter_bytes(CHUNK_BYTES):
                        handle.write(block)
                        transfer.received += len(block)
                        step.bar.update(len(block))
            finally:
                await response.aclose()
        return transfer.finish()

    async def _drive(self, operation: Operation):
        answer = None
        try:
            while True:
                step = operation.send(answer)
                if isinstance(step, Call):
                    answer = await self._send(self._request(step))
                elif isinstance(step, Pause):
                    await asyncio.sleep(step.seconds)
                    answer = None
                else:
                    answer = await self._fetch(step)
        except StopIteration as stop:
            return stop.value

    async def counterfactual(self, shape: int, texture: int, background: int, n: int = 1,
                             seed: Optional[int] = None, **options) -> Rendered:
        return await self._drive(self._op_counterfactual(shape, texture, background, n, seed, **options))

    async def generate(self, mechanism: str, label: int, n: int = 1, seed: Optional[int] = None,
                       **options) -> Rendered:
        return await self._drive(self._op_generate(mechanism, label, n, seed, **options))

    async def models(self, family: Optional[str] = None) -> dict:
        return await self._drive(self._op_models(family))

    async def create_job(self, n: int, **options) -> Job:
        return await self._drive(self._op_create_job(n, **options))

    async def status(self, job: Union[Job, str]) -> Job:
        return await self._drive(self._op_status(job))

    async def checksums(self, job: Union[Job, str]) -> dict[str, str]:
        return await self._drive(self._op_checksums(job))

    async def jobs(self, state: Optional[str] = None, limit: Optional[int] = None) -> list[Job]:
        return await self._drive(self._op_jobs(state, limit))

    async def wait(self, job: Union[Job, str], progress: bool = True, timeout: Optional[float] = None,
                   poll_interval: float = 0.5) -> Job:
        return await self._drive(self._op_wait(job, progress, timeout, poll_interval))

    async def download(self, job: Union[Job, str], directory: Union[str, os.PathLike],
                       progress: bool = True) -> list[DownloadedFile]:
        return await self._drive(self._op_download(job, directory, progress))

    async def cancel(self, job: Union[Job, str]) -> Job:
        return await self._drive(self._op_cancel(job))

    async def delete(self, job: Union[Job, str]) -> Optional[Job]:
        return await self._drive(self._op_delete(job))


def load_npz(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """A downloaded npz result as arrays: images, labels, indices, and provenance (the parsed provenance.json)."""
    import json

    with np.load(path) as data:
        arrays: dict[str, Any] = {name: data[name] for name in data.files if name != "provenance.json"}
        if "provenance.json" in data.files:
            arrays["provenance"] = json.loads(bytes(data["provenance.json"]))
    return arrays

