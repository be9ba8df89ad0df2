"""torch.utils.data datasets of counterfactuals: a downloaded npz, downloaded tar shards, webdataset shards streamed
from the result store (s3:// or presigned https, no download first), and a stream of fresh counterfactuals from a
running service. The only module of `client` that imports torch.

Each sample is `(image, target)`: image float32 [3, H, W] in [0, 1] (or what `transform` makes of the uint8
[H, W, 3] array), target the shape label (`target="shape"`, the label an invariant classifier learns), another
mechanism's label, or all three (`target="labels"`: int64 [3]). `with_meta=True` appends a dict with the
sample's `index`, `seed` and `labels`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from core.vocabulary import MECHANISMS

TARGETS = (*MECHANISMS, "labels")
PathLike = Union[str, os.PathLike]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] to float32 [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255.0)


class _Samples:
    """What the three datasets share: the target, the transforms and the optional metadata."""

    def __init__(self, target: str, transform: Optional[Callable], target_transform: Optional[Callable],
                 with_meta: bool):
        if target not in TARGETS:
            raise ValueError(f"target {target!r}: use one of {', '.join(TARGETS)}")
        self.target, self.transform, self.target_transform, self.with_meta = (target, transform, target_transform,
                                                                             with_meta)

    def _sample(self, image: np.ndarray, labels: Sequence[int], index: int, seed: int):
        x = self.transform(image) if self.transform is not None else to_tensor(image)
        y = torch.as_tensor(list(labels), dtype=torch.int64) if self.target == "labels" \
            else int(labels[MECHANISMS.index(self.target)])
        if self.target_transform is not None:
            y = self.target_transform(y)
        if self.with_meta:
            return x, y, {"index": int(index), "seed": int(seed), "labels": torch.as_tensor(list(labels))}
        return x, y


class NpzCounterfactuals(_Samples, Dataset):
    """A downloaded npz job result (images uint8 [N, H, W, 3], labels [N, 3], indices), held in memory."""

    def __init__(self, path: PathLike, target: str = "shape", transform: Optional[Callable] = None,
                 target_transform: Optional[Callable] = None, with_meta: bool = False):
        super().__init__(target, transform, target_transform, with_meta)
        with np.load(path) as data:
            self.images, self.labels = data["images"], data["labels"]
            self.indices = data["indices"] if "indices" in data.files else np.arange(len(self.images))
            provenance = json.loads(bytes(data["provenance.json"])) if "provenance.json" in data.files else {}
        self.provenance = provenance
        self.seed = int(provenance.get("seed", -1))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int):
        return self._sample(self.images[item], self.labels[item], self.indices[item], self.seed)


def shard_paths(source: Union[PathLike, Sequence[PathLike]]) -> list[Path]:
    """Tar shards: a list of files, one file, or a download directory (its *.tar, sorted)."""
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        paths = sorted(source.glob("*.tar")) if source.is_dir() else [source]
    else:
        paths = [Path(item) for item in source]
    if not paths:
        raise FileNotFoundError(f"no .tar shards in {source}")
    return paths


class ShardCounterfactuals(_Samples, Dataset):
    """Downloaded tar shards of a webdataset job (`<key>.png`, `<key>.cls`, `<key>.json`) or a png job
    (`images/<index>.png` with labels.csv), map-style: the shards are indexed once (member offsets), and each
    sample is read from its offset, so DataLoader workers share nothing but the index."""

    def __init__(self, shards: Union[PathLike, Sequence[PathLike]], target: str = "shape",
                 transform: Optional[Callable] = None, target_transform: Optional[Callable] = None,
                 with_meta: bool = False):
        super().__init__(target, transform, target_transform, with_meta)
        self.paths = shard_paths(shards)
        # (shard, byte offset, size, shape, texture, background, index, seed) per sample, in shard order
        rows: list[tuple] = []
        for shard, path in enumerate(self.paths):
            rows += self._index(shard, path)
        self.rows = rows
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    @staticmethod
    def _index(shard: int, path: Path) -> list[tuple]:
        pngs, metadata, table = {}, {}, None
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                if member.name.endswith(".png"):
                    pngs[member.name] = (member.offset_data, member.size)
                elif member.name.endswith(".json") and member.name != "provenance.json":
                    metadata[member.name[:-5]] = json.loads(archive.extractfile(member).read())
                elif member.name == "labels.csv":
                    table = list(csv.DictReader(io.StringIO(archive.extractfile(member).read().decode())))
        if table is not None:  # a png job's shard
            return [(shard, *pngs[row["file"]], int(row["shape"]), int(row["texture"]), int(row["background"]),
                     int(row["index"]), int(row["seed"])) for row in table]
        rows = []
        for key, meta in metadata.items():  # a webdataset shard
            offset, size = pngs[f"{key}.png"]
            rows.append((shard, offset, size, meta["shape"], meta["texture"], meta["background"], meta["index"],
                         meta["seed"]))
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def _handle(self, shard: int):
        if self._pid != os.getpid():  # a DataLoader worker: its own file handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = open(self.paths[shard], "rb")
        return self._handles[shard]

    def __getitem__(self, item: int):
        shard, offset, size, shape, texture, background, index, seed = self.rows[item]
        handle = self._handle(shard)
        handle.seek(offset)
        image = np.asarray(Image.open(io.BytesIO(handle.read(size))).convert("RGB"))
        return self._sample(image, (shape, texture, background), index, seed)

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}


class StoredShards(_Samples, IterableDataset):
    """A webdataset job's shards streamed from where they are (client.store.open_shard: s3:// with your AWS_*
    credentials, a presigned https `store_url`, or a path), one tar after another, nothing downloaded first; each
    DataLoader worker reads every W-th shard. `client.store.shard_urls(status)` lists a job's shards."""

    def __init__(self, urls: Sequence[str], target: str = "shape", transform: Optional[Callable] = None,
                 target_transform: Optional[Callable] = None, with_meta: bool = False):
        super().__init__(target, transform, target_transform, with_meta)
        if not urls:
            raise ValueError("no shard URLs")
        self.urls = list(urls)

    def __iter__(self):
        from client.store import open_shard

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.urls[worker::workers]:
            with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
                png = None
                for member in archive:  # a sample's members come together: <key>.png, <key>.cls, <key>.json
                    if member.name.endswith(".png"):
                        png = archive.extractfile(member).read()
                    elif member.name.endswith(".json") and png is not None:
                        meta = json.loads(archive.extractfile(member).read())
                        image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
                        labels = (meta["shape"], meta["texture"], meta["background"])
                        yield self._sample(image, labels, meta["index"], meta["seed"])
                        png = None


# Request seeds: (seed, epoch, request r) ↦ seed·2^40 + epoch·2^24 + r, one-to-one within these bounds, so no two
# requests of a stream (any worker, any epoch) share a server seed, and sample i of a request draws its noise from
# SeedSequence([server seed, i]): no sample ever repeats.
SEED_BITS, EPOCH_BITS, REQUEST_BITS = 23, 16, 24


class StreamingCounterfactuals(_Samples, IterableDataset):
    """Fresh counterfactuals from a running service (POST /counterfactual), for on-the-fly training.

    Each request draws `n_per_request` images with one label triple, drawn uniformly from `labels` (per mechanism,
    default all of the model's labels); request r of epoch e is sent by DataLoader worker r mod W with the server
    seed seed·2^40 + e·2^24 + r, so workers never repeat each other's samples, nor an epoch another's (call
    `set_epoch`). `samples_per_epoch` bounds an epoch (None: an endless stream). Keep `n_per_request` small for
    label variety within a batch (it is at most the server's SKDCGN_MAX_N).
    """

    def __init__(self, url: Optional[str] = None, api_key: Optional[str] = None, *, seed: int = 0,
                 samples_per_epoch: Optional[int] = None, n_per_request: int = 8,
                 labels: Optional[dict] = None, model: Optional[str] = None, version: Optional[str] = None,
                 mask: Optional[dict] = None, target: str = "shape", transform: Optional[Callable] = None,
                 target_transform: Optional[Callable] = None, with_meta: bool = False, timeout: float = 60.0):
        super().__init__(target, transform, target_transform, with_meta)
        if not 0 <= seed < 2 ** SEED_BITS:
            raise ValueError(f"seed must lie in 0 .. {2 ** SEED_BITS - 1}")
        if n_per_request < 1:
            raise ValueError("n_per_request must be at least 1")
        self.url, self.api_key, self.seed, self.timeout = url, api_key, seed, timeout
        self.samples_per_epoch, self.n_per_request = samples_per_epoch, n_per_request
        self.labels, self.model, self.version, self.mask = labels or {}, model, version, mask
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if not 0 <= epoch < 2 ** EPOCH_BITS:
            raise ValueError(f"epoch must lie in 0 .. {2 ** EPOCH_BITS - 1}")
        self.epoch = epoch

    def __len__(self) -> int:
        if self.samples_per_epoch is None:
            raise TypeError("an endless stream has no length (pass samples_per_epoch)")
        return self.samples_per_epoch

    def request_seed(self, request: int) -> int:
        if request >= 2 ** REQUEST_BITS:
            raise OverflowError(f"more than {2 ** REQUEST_BITS} requests in one epoch: call set_epoch")
        return (self.seed << (EPOCH_BITS + REQUEST_BITS)) | (self.epoch << REQUEST_BITS) | request

    def _choices(self, client) -> dict[str, list[int]]:
        missing = [m for m in MECHANISMS if self.labels.get(m) is None]
        if not missing:
            return {m: list(self.labels[m]) for m in MECHANISMS}
        listing = client.models()
        family = self.model or listing["default_model"]
        versions = next(item for item in listing["models"] if item["name"] == family)["versions"]
        chosen = next(v for v in versions if v["version"] == self.version or (self.version is None and v["latest"]))
        count = len(chosen["labels"]) if isinstance(chosen["labels"], list) else int(chosen["labels"]["count"])
        return {m: list(self.labels[m]) if self.labels.get(m) is not None else list(range(count)) for m in MECHANISMS}

    def __iter__(self):
        from client.api import Client

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        total = self.samples_per_epoch
        requests = None if total is None else -(-total // self.n_per_request)
        with Client(self.url, self.api_key, timeout=self.timeout) as client:
            choices = self._choices(client)
            request = worker
            while requests is None or request < requests:
                n = self.n_per_request if total is None else min(self.n_per_request, total - request * self.n_per_request)
                server_seed = self.request_seed(request)
                rng = np.random.default_rng([self.seed, self.epoch, request])
                labels = [int(rng.choice(choices[m])) for m in MECHANISMS]
                rendered = client.counterfactual(*labels, n=n, seed=server_seed, model=self.model,
                                                 version=self.version, mask=self.mask)
                for i, image in enumerate(rendered.images):
                    yield self._sample(image, labels, i, server_seed)
                request += workers
