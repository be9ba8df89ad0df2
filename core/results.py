"""Where job results live: a local folder or an S3-compatible object store (SKDCGN_RESULTS_URL), behind one interface
the workers write through and the gateway reads through.

Workers render into local scratch (SKDCGN_JOBS_DIR) and `put` each finished file; the store shows it only whole (a
rename, or S3's single PUT or completed multipart upload), so nothing half-written is ever listed. Keys are
`<job id>/chunks/<chunk>.npz` and `<job id>/<result file>`, under the store's folder or URL prefix.

S3 goes through boto3, not s3fs or obstore: it resolves beside the botocore the locks hold (s3fs's aiobotocore pins an
older one), reads the standard AWS_* variables (AWS_ENDPOINT_URL for any S3-compatible store), retries, uploads large
files in parts (aborting the upload when a part fails) and presigns URLs, in one well-kept package. It is imported
only when an s3:// URL is configured, so a local deployment needs none of it.
"""
from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlparse

from core.atomic import atomic_path

READ_BLOCK_BYTES = 1 << 20  # one read of a streamed download
PART_BYTES = 16 << 20  # S3 multipart: files above this go up in parts of this size
S3_ATTEMPTS = 5  # botocore's standard retry mode: tries of one call on throttling, 5xx and connection errors
S3_CONNECT_TIMEOUT_S, S3_READ_TIMEOUT_S = 5, 30


class StoreError(RuntimeError):
    """The store refused or could not be reached; the message names the store and the key."""


class MissingError(StoreError):
    """The store answered, and has no such file."""


@dataclass(frozen=True)
class StoredFile:
    """What a listing of a job's objects says of one of them."""

    key: str
    bytes: int
    modified: float  # epoch seconds


def job_prefix(job_id: str) -> str:
    return f"{job_id}/"


def chunks_prefix(job_id: str) -> str:
    return f"{job_id}/chunks/"


def chunk_key(job_id: str, chunk: int) -> str:
    return f"{chunks_prefix(job_id)}{chunk:06d}.npz"


def file_key(job_id: str, name: str) -> str:
    return f"{job_id}/{name}"


class LocalResults:
    """Results in a folder: SKDCGN_JOBS_DIR itself by default (one host, or a volume every host mounts). When the
    folder is the scratch folder, a worker's files are already in place and `put` leaves them there."""

    kind = "local"

    def __init__(self, root: Path, scratch: Path):
        self.root, self.scratch = Path(root), Path(scratch)
        self.in_place = self.root.absolute() == self.scratch.absolute()

    def describe(self, key: str = "") -> str:
        return str(self.root / key)

    def path(self, key: str) -> Path:
        return self.root / key

    def put(self, source: Path, key: str) -> None:
        target = self.path(key)
        if Path(source).absolute() == target.absolute():
            return
        with atomic_path(target) as tmp:  # a copy, so another file system works too; renamed only once whole
            shutil.copyfile(source, tmp)
        Path(source).unlink()

    def discard_scratch(self, job_id: str) -> None:
        """A worker's local copies of a job's files (none when the store is the scratch folder: they are the job's)."""
        if not self.in_place:
            shutil.rmtree(self.scratch / job_id, ignore_errors=True)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self.path(key), "rb")
        except FileNotFoundError:
            raise MissingError(f"{self.describe(key)} is missing") from None

    def size(self, key: str) -> int | None:
        """The file's size in bytes; None when there is none."""
        try:
            return self.path(key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_range(self, key: str, start: int, stop: int) -> Iterator[bytes]:
        """Bytes start..stop-1 of a file, a block at a time."""
        with self.open(key) as handle:
            handle.seek(start)
            left = stop - start
            while left > 0 and (block := handle.read(min(READ_BLOCK_BYTES, left))):
                left -= len(block)
                yield block

    def url(self, key: str, ttl_s: int) -> str | None:
        return None  # a folder has no URL of its own: downloads go through the gateway

    def remove(self, prefix: str) -> None:
        """Everything under `prefix` (a job's folder, or its chunks)."""
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def jobs(self) -> Iterator[str]:
        """The names of the job folders (the orphan cleanup checks each against Redis)."""
        if self.root.is_dir():
            yield from (entry.name for entry in os.scandir(self.root) if entry.is_dir())

    def newest(self, prefix: str) -> float | None:
        """When anything under `prefix` last changed (epoch seconds); None when nothing is there."""
        try:
            return self.path(prefix).stat().st_mtime
        except FileNotFoundError:
            return None

    def stale_uploads(self, cutoff: float) -> int:
        return 0  # a folder's writes are renames of temporary files: nothing is left half-uploaded


class S3Results:
    """Results in an S3-compatible bucket under `prefix`, through boto3. One client per process (boto3 clients are
    thread-safe; a forked worker makes its own)."""

    kind = "s3"

    def __init__(self, bucket: str, prefix: str, scratch: Path, public_endpoint: str | None = None):
        self.bucket, self.prefix, self.scratch = bucket, prefix.strip("/"), Path(scratch)
        self.public_endpoint = public_endpoint
        self.in_place = False
        self._clients: dict[tuple[int, str | None], object] = {}
        self._lock = threading.Lock()

    def describe(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def client(self, endpoint: str | None = None):
        """boto3's S3 client for this process (`endpoint`: the public one presigned URLs name)."""
        slot = (os.getpid(), endpoint)
        with self._lock:
            if slot not in self._clients:
                import boto3
                from botocore.config import Config

                config = Config(retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"},
                                connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S,
                                signature_version="s3v4")
                self._clients[slot] = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
            return self._clients[slot]

    def _call(self, what: str, key: str, method: str, **arguments):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client(), method)(Bucket=self.bucket, **arguments)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise MissingError(f"{self.describe(key)} is missing") from None
            raise StoreError(f"{what} {self.describe(key)} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"{what} {self.describe(key)} failed: {type(exc).__name__}: {exc}") from exc

    def create_bucket(self) -> bool:
        """Create the bucket unless it exists (compose's start-up, a new store); True when this call created it."""
        from botocore.exceptions import ClientError

        client = self.client()
        try:
            client.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
        region = client.meta.region_name
        options = {} if region in (None, "us-east-1") else {
            "CreateBucketConfiguration": {"LocationConstraint": region}}
        client.create_bucket(Bucket=self.bucket, **options)
        return True

    def put(self, source: Path, key: str) -> None:
        """Upload, in parts above PART_BYTES (boto3 aborts a multipart upload whose part fails), then remove the
        local file: the object appears only once complete."""
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError
        from boto3.exceptions import S3UploadFailedError

        config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, use_threads=False)
        try:
            self.client().upload_file(str(source), self.bucket, self.object_key(key), Config=config)
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise StoreError(f"uploading {Path(source).name} to {self.describe(key)} failed: "
                             f"{type(exc).__name__}: {exc}") from exc
        Path(source).unlink()

    def discard_scratch(self, job_id: str) -> None:
        """A worker's local copies of a job's files: uploaded already, or of a job that has ended."""
        shutil.rmtree(self.scratch / job_id, ignore_errors=True)

    def open(self, key: str) -> BinaryIO:
        """The whole object, streamed (np.load of a chunk reads it into memory: chunks are a few MB)."""
        import io

        body = self._call("reading", key, "get_object", Key=self.object_key(key))["Body"]
        try:
            return io.BytesIO(body.read())
        finally:
            body.close()

    def size(self, key: str) -> int | None:
        try:
            return self._call("checking", key, "head_object", Key=self.object_key(key))["ContentLength"]
        except MissingError:
            return None

    def read_range(self, key: str, start: int, stop: int) -> Iterator[bytes]:
        if stop <= start:
            return
        body = self._call("reading", key, "get_object", Key=self.object_key(key), Range=f"bytes={start}-{stop - 1}")
        stream = body["Body"]
        try:
            yield from stream.iter_chunks(READ_BLOCK_BYTES)
        finally:
            stream.close()

    def url(self, key: str, ttl_s: int) -> str | None:
        """A presigned GET URL, valid `ttl_s` seconds (signed locally: no request to the store)."""
        if ttl_s <= 0:
            return None
        return self.client(self.public_endpoint).generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.object_key(key)}, ExpiresIn=ttl_s)

    def _listed(self, prefix: str) -> Iterator[StoredFile]:
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.object_key(prefix)):
            for item in page.get("Contents", []):
                yield StoredFile(item["Key"], item["Size"], item["LastModified"].timestamp())

    def remove(self, prefix: str) -> None:
        """Every object under `prefix`, a thousand per request, and the multipart uploads left open under it."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            keys = [item.key for item in self._listed(prefix)]
            for start in range(0, len(keys), 1000):
                self.client().delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": key} for key in keys[start:start + 1000]], "Quiet": True})
            self._abort_uploads(self.object_key(prefix), None)
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(f"removing {self.describe(prefix)} failed: {type(exc).__name__}: {exc}") from exc

    def _abort_uploads(self, prefix: str, cutoff: float | None) -> int:
        """Abort the multipart uploads under `prefix` begun before `cutoff` (all, when None); returns how many."""
        aborted = 0
        paginator = self.client().get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if cutoff is None or upload["Initiated"].timestamp() < cutoff:
                    self.client().abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                         UploadId=upload["UploadId"])
                    aborted += 1
        return aborted

    def jobs(self) -> Iterator[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        base = self.object_key("")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                yield common["Prefix"][len(base):].rstrip("/")

    def newest(self, prefix: str) -> float | None:
        return max((item.modified for item in self._listed(prefix)), default=None)

    def stale_uploads(self, cutoff: float) -> int:
        """Abort multipart uploads begun before `cutoff` (a worker killed mid-upload leaves its parts billed)."""
        return self._abort_uploads(self.object_key(""), cutoff)


ResultStore = LocalResults | S3Results


def open_results(results_url: str, scratch: Path, public_endpoint: str | None = None) -> ResultStore:
    """The store SKDCGN_RESULTS_URL names: empty (the scratch folder itself), a folder, or s3://bucket/prefix."""
    if results_url.startswith("s3://"):
        parsed = urlparse(results_url)
        if not parsed.netloc:
            raise ValueError(f"SKDCGN_RESULTS_URL={results_url!r}: name a bucket, s3://bucket or s3://bucket/prefix")
        return S3Results(parsed.netloc, parsed.path, scratch, public_endpoint)
    if "://" in results_url and not results_url.startswith("file://"):
        raise ValueError(f"SKDCGN_RESULTS_URL={results_url!r}: use a folder, file:///folder or s3://bucket/prefix")
    folder = results_url.removeprefix("file://")
    return LocalResults(Path(folder) if folder else scratch, scratch)



def store_for(settings) -> ResultStore:
    """The store of a core.settings.Settings: SKDCGN_RESULTS_URL, with SKDCGN_JOBS_DIR as the local scratch."""
    return open_results(settings.results_url, settings.jobs_dir, settings.results_public_endpoint)


if __name__ == "__main__":  # python -m core.results create-bucket: the bucket SKDCGN_RESULTS_URL names
    import argparse

    from core.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m core.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["create-bucket"])
    parser.add_argument("--url", default=Settings.from_env().results_url,
                        help="s3://bucket/prefix (default: SKDCGN_RESULTS_URL)")
    arguments = parser.parse_args()
    store = open_results(arguments.url, Path("."))
    if not isinstance(store, S3Results):
        parser.error(f"--url {arguments.url!r} is not an s3:// URL: a folder store needs no bucket")
    created = store.create_bucket()
    print(f"bucket {store.bucket} {'created' if created else 'exists'} at {store.client().meta.endpoint_url}")
