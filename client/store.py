"""Job results read straight from the result store, for training code that should not download a dataset first.

A shard is named three ways: `s3://bucket/prefix/<job id>/result-00000.tar` (read with your own credentials through
boto3 and the standard AWS_* variables, AWS_ENDPOINT_URL for any S3-compatible store: `pip install .[s3]`), the
presigned https `store_url` a job's status lists (no credentials; it expires), or a local path. `open_shard` opens
any of them as a stream; `register_webdataset()` teaches webdataset, whose locked release has no s3 handler, to open
s3:// URLs the same way.
"""
from __future__ import annotations

import os
import threading
import urllib.request
from typing import BinaryIO
from urllib.parse import urlparse

from core.jobs import result_names
from core.vocabulary import SUCCEEDED

_clients: dict[int, object] = {}
_lock = threading.Lock()


def _s3_client():
    """One boto3 client per process (DataLoader workers fork: each makes its own)."""
    with _lock:
        if os.getpid() not in _clients:
            import boto3

            _clients[os.getpid()] = boto3.session.Session().client("s3")
        return _clients[os.getpid()]


def open_shard(url: str) -> BinaryIO:
    """A readable stream of an s3:// URL, an http(s) URL (a presigned `store_url`) or a local path."""
    scheme = urlparse(url).scheme
    if scheme == "s3":
        parsed = urlparse(url)
        return _s3_client().get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"]
    if scheme in ("http", "https"):
        return urllib.request.urlopen(url, timeout=60)
    return open(url, "rb")


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_) -> BinaryIO:
    if mode != "rb":
        raise ValueError("s3:// shards are read-only here (workers write them)")
    return open_shard(url)


def register_webdataset() -> None:
    """Let `webdataset.WebDataset` open s3:// URLs with boto3."""
    from webdataset.gopen import gopen_schemes

    gopen_schemes["s3"] = _gopen_s3


def shard_urls(job, results_url: str | None = None) -> list[str]:
    """The tar shards of a succeeded job (a client.Job, or its GET /jobs/{id} body): under `results_url` (the
    service's SKDCGN_RESULTS_URL, s3://bucket/prefix) when given, else the presigned `store_url`s of its status."""
    status = job.raw if hasattr(job, "raw") else job
    if status.get("state") != SUCCEEDED:
        raise ValueError(f"job {status.get('id')} is {status.get('state')}: its shards exist once it has succeeded")
    names = result_names(status["format"], status["shards"])
    if results_url:
        return [f"{results_url.rstrip('/')}/{status['id']}/{name}" for name in names]
    links = {item["name"]: item.get("store_url") for item in status.get("files") or []}
    if not all(links.get(name) for name in names):
        raise ValueError(f"job {status['id']}'s status lists no store URLs: the service keeps results in a folder "
                         "(download them with `skdcgn jobs download`), or its SKDCGN_RESULTS_URL_TTL_S is 0")
    return [links[name] for name in names]
