"""The versions a worker has loaded, and the rendering that runs on them.

Worker-only: models run through core.runtime (onnxruntime, never torch). Noise, composition and image encoding
come from core/, so a sample rendered here matches one rendered anywhere else for the same seed and index, and
a request rendered inside a batch of other requests gets exactly the pixels it would get alone: every sample
draws its own noise from its own seed, and the graphs compute each sample independently of the others.
"""
from __future__ import annotations

import base64
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from core.compose import MaskModifiers, compose_samples
from core.imageio import encode, to_uint8
from core.logs import NO_REQUEST, request_id
from core.manifest import (
    ManifestError, latest_version, list_families, list_versions, load_manifest, manifest_sha256, resolve_version,
    verify_files,
)
from core.messages import RenderBatch, RenderReply, RenderRequest
from core.noise import SampleNoise, draw_sample_noise
from core.runtime import ModelRuntime, execution_providers
from core.vocabulary import MECHANISMS
from workers.metrics import WorkerMetrics

logger = logging.getLogger(__name__)


class ModelChanged(RuntimeError):
    """A version's manifest changed on disk after the gateway accepted the request."""


class ModelRefused(RuntimeError):
    """A version's files fail their manifest's sha256 check (corrupt, or still being copied): it is not served."""


def file_signature(directory: Path) -> tuple:
    """Name, size, inode and change times of a version's files: any rewrite, copy or rename changes it."""
    entries = []
    for path in sorted(directory.iterdir()):
        stat = path.stat()
        entries.append((path.name, stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns))
    return tuple(entries)


class LoadedModels:
    """The versions this worker holds in memory (least recently used evicted first) and those it refuses.

    Files are sha256-checked once per change of their signature, so the watcher can audit the repository every
    second cheaply; thread-safe (the watcher thread and the task thread both use it).
    """

    def __init__(self, models_dir: Path, capacity: int, ort_threads: int, require_gpu: bool | None = None):
        self.models_dir, self.capacity, self.ort_threads = Path(models_dir), capacity, ort_threads
        if require_gpu is None:  # SKDCGN_REQUIRE_GPU: a GPU worker never serves on the CPU
            from core.settings import Settings
            require_gpu = Settings.from_env().require_gpu
        self.providers = execution_providers(require_gpu=require_gpu)  # GpuUnavailable: no CUDA when required
        self._loaded: OrderedDict[tuple[str, str], ModelRuntime] = OrderedDict()
        # (family, version) -> (file signature, refusal reason or None): files are hashed again only when they change.
        self._checked: dict[tuple[str, str], tuple[tuple, str | None]] = {}
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()  # the watcher and the task thread never hash (and log) a version twice

    def check(self, family: str, version: str, directory: Path) -> None:
        """Raise ModelRefused, and log it once, when the version's files fail the manifest's sha256 check."""
        with self._check_lock:
            signature = file_signature(directory)
            cached = self._checked.get((family, version))
            if cached is None or cached[0] != signature:
                try:
                    verify_files(directory, load_manifest(directory))
                    reason = None
                except ManifestError as exc:
                    reason = str(exc)
                    logger.error("refusing to serve %s/%s: %s", family, version, reason)
                else:
                    if cached is not None and cached[1] is not None:
                        logger.info("%s/%s passes its sha256 check again; serving it", family, version)
                cached = self._checked[(family, version)] = (signature, reason)
        if cached[1] is not None:
            raise ModelRefused(f"model {family}/{version} is refused by this worker: {cached[1]}")

    def audit(self) -> None:
        """Check every version in the repository (cheap unless files changed), so refusals are known before requests."""
        present = set()
        for family in list_families(self.models_dir):
            for version in list_versions(self.models_dir, family):
                present.add((family, version))
                try:
                    self.check(family, version, self.models_dir / family / version)
                except ModelRefused:
                    pass  # logged by check, published by the heartbeat
        with self._check_lock:
            for gone in set(self._checked) - present:
                del self._checked[gone]

    def refused(self) -> dict[str, str]:
        """"family/version" -> why this worker refuses it."""
        with self._check_lock:
            return {f"{family}/{version}": reason for (family, version), (_, reason) in self._checked.items()
                    if reason is not None}

    def get(self, family: str, version: str | None = None, expected_sha256: str | None = None) -> ModelRuntime:
        """The loaded version (LATEST when None), reloaded if its manifest changed on disk; refused if files fail."""
        version, directory = resolve_version(self.models_dir, family, version)
        self.check(family, version, directory)
        on_disk = manifest_sha256(directory)
        if expected_sha256 is not None and on_disk != expected_sha256:
            raise ModelChanged(f"model {family}/{version} changed on disk after the request was accepted; retry it")
        with self._lock:
            model = self._loaded.get((family, version))
            if model is None or model.manifest_sha256 != on_disk:
                model = self._load(directory)
                self._loaded[(family, version)] = model
                while len(self._loaded) > self.capacity:
                    evicted = self._loaded.popitem(last=False)[1]
                    logger.info("unloaded %s", evicted.name)
            self._loaded.move_to_end((family, version))
            return model

    def _load(self, directory: Path) -> ModelRuntime:
        started = time.perf_counter()
        model = ModelRuntime(directory, threads=self.ort_threads, providers=self.providers, verify=False)
        model.warm_up()
        logger.info("loaded %s on %s in %.2f s", model.name, model.provider, time.perf_counter() - started)
        return model

    def latest_versions(self) -> dict[str, str]:
        """Each family's LATEST; a family without one is served only to requests that name a version."""
        found = {}
        for family in list_families(self.models_dir):
            try:
                found[family] = latest_version(self.models_dir, family)
            except ManifestError:
                continue
        return found

    def loaded(self) -> list[str]:
        with self._lock:
            return [model.name for model in self._loaded.values()]

    def provider_in_use(self) -> str:
        """What the sessions actually run on (onnxruntime falls back to CPU if CUDA fails to initialise)."""
        with self._lock:
            models = list(self._loaded.values())
        return models[-1].provider if models else self.providers[0]


def draw_noises(model: ModelRuntime, seed: int, indices: Iterable[int], modifiers: MaskModifiers,
                z_overrides: Sequence[Mapping[str, Sequence[float]] | None]) -> list[SampleNoise]:
    return [
        draw_sample_noise(seed, index, model.noise, model.image_size, rotation_deg=modifiers.rotation_deg,
                          noise_std=modifiers.noise_std, z_override=override)
        for index, override in zip(indices, z_overrides)
    ]


def compose_batch(model: ModelRuntime, outputs: Mapping[str, np.ndarray], noises: list[SampleNoise],
                  modifiers: MaskModifiers):
    """Composite images (uint8 NHWC) and the components as composed (uint8) from the mechanisms' outputs."""
    composite, mask, texture, background = compose_samples(
        outputs["shape"], outputs["texture"], outputs["background"], noises, model.texture_shuffle,
        modifiers.transparency,
    )
    components = {
        "mask": to_uint8(mask, model.output_range("shape")),
        "texture": to_uint8(texture, model.output_range("texture")),
        "background": to_uint8(background, model.output_range("background")),
    }
    return to_uint8(composite, model.output_range("texture")), components


def stack_inputs(noises: list[SampleNoise], labels: Sequence[Mapping[str, int]]) -> tuple[dict, dict]:
    """The graphs' z and y feeds for a list of samples."""
    z = {m: np.stack([noise.z[m] for noise in noises]) for m in MECHANISMS}
    y = {m: np.asarray([sample[m] for sample in labels], np.int64) for m in MECHANISMS}
    return z, y


def counterfactual_batch(model: ModelRuntime, seed: int, indices: Sequence[int], labels: Sequence[Mapping[str, int]],
                         modifiers: MaskModifiers, z_overrides: Sequence[Mapping | None]):
    """Composite images (uint8 NHWC), the components as composed (uint8), and the z used, for samples `indices`."""
    noises = draw_noises(model, seed, indices, modifiers, z_overrides)
    z, y = stack_inputs(noises, labels)
    images, components = compose_batch(model, model.run_all(z, y), noises, modifiers)
    return images, components, z


def encode_base64_png(images: np.ndarray) -> list[str]:
    return [base64.b64encode(encode(image)).decode("ascii") for image in images]


def _per_sample_z(z: Mapping[str, list] | None, n: int) -> list[dict | None]:
    """Request z ({mechanism: n vectors}) as one core.noise override per sample."""
    if not z:
        return [None] * n
    return [{mechanism: vectors[i] for mechanism, vectors in z.items()} for i in range(n)]


def _payload(model: ModelRuntime, request: RenderRequest, images: np.ndarray, z: Mapping[str, np.ndarray],
             components: Mapping[str, np.ndarray] | None = None) -> dict:
    """The JSON body the gateway returns and caches for one request."""
    payload = {"model": model.family, "version": model.version, "manifest_sha256": model.manifest_sha256,
               "provider": model.provider, "seed": request.seed, "n": request.n,
               "images": encode_base64_png(images)}
    if components is not None and request.return_components:
        payload["components"] = {name: encode_base64_png(value) for name, value in components.items()}
    if request.return_noise:
        payload["z"] = {mechanism: np.asarray(values).tolist() for mechanism, values in z.items()}
    return payload


def _render_counterfactuals(model: ModelRuntime, requests: list[RenderRequest]) -> list[dict]:
    """Several counterfactual requests of one version in one call of the graphs, each composed on its own."""
    per_request = []
    for request in requests:
        modifiers = MaskModifiers(**request.mask)
        noises = draw_noises(model, request.seed, range(request.n), modifiers, _per_sample_z(request.z, request.n))
        per_request.append((request, modifiers, noises))
    all_noises = [noise for _, _, noises in per_request for noise in noises]
    all_labels = [request.labels for request, _, noises in per_request for _ in noises]
    z, y = stack_inputs(all_noises, all_labels)
    outputs = model.run_all(z, y)
    payloads, start = [], 0
    for request, modifiers, noises in per_request:
        rows = slice(start, start + len(noises))
        start = rows.stop
        images, components = compose_batch(model, {m: out[rows] for m, out in outputs.items()}, noises, modifiers)
        payloads.append(_payload(model, request, images, {m: values[rows] for m, values in z.items()}, components))
    return payloads


def _render_mechanisms(model: ModelRuntime, mechanism: str, requests: list[RenderRequest]) -> list[dict]:
    """Several single-mechanism requests of one version and mechanism in one call of its graph."""
    noises = [draw_noises(model, r.seed, range(r.n), MaskModifiers(), _per_sample_z(r.z, r.n)) for r in requests]
    z = np.stack([noise.z[mechanism] for group in noises for noise in group])
    y = np.asarray([r.labels[mechanism] for r in requests for _ in range(r.n)], np.int64)
    images = to_uint8(model.run(mechanism, z, y), model.output_range(mechanism))
    payloads, start = [], 0
    for request in requests:
        rows = slice(start, start + request.n)
        start = rows.stop
        payloads.append(_payload(model, request, images[rows], {mechanism: z[rows]}))
    return payloads


def _failure(exc: Exception, request: RenderRequest) -> RenderReply:
    if isinstance(exc, ModelRefused):
        return RenderReply.failure(503, f"{exc}; the version is unavailable until its files are restored")
    if isinstance(exc, ModelChanged):
        return RenderReply.failure(409, str(exc))
    logger.error("render failed for %s/%s", request.family, request.version, exc_info=exc)
    return RenderReply.failure(500, f"the worker could not render this request: {type(exc).__name__}: {exc}")


def render_batch(models: LoadedModels, batch: RenderBatch, metrics: WorkerMetrics) -> list[RenderReply]:
    """One reply per request of the batch, in order. Requests of the same version and kind (and mechanism) share
    one call of the graphs; a group that fails answers each of its requests with the error, the others go on.
    Log lines about a group carry its requests' ids."""
    groups: OrderedDict[tuple, list[int]] = OrderedDict()
    for index, request in enumerate(batch.requests):
        mechanism = request.mechanism if request.kind == "mechanism" else None
        groups.setdefault((request.family, request.version, request.manifest_sha256, mechanism), []).append(index)
    replies: list[RenderReply | None] = [None] * len(batch.requests)
    for (family, version, sha256, mechanism), indices in groups.items():
        requests = [batch.requests[i] for i in indices]
        token = request_id.set(",".join(r.request_id for r in requests if r.request_id) or NO_REQUEST)
        try:
            started = time.perf_counter()
            model = models.get(family, version, sha256)
            if mechanism is None:
                payloads = _render_counterfactuals(model, requests)
            else:
                payloads = _render_mechanisms(model, mechanism, requests)
            seconds, images = time.perf_counter() - started, sum(r.n for r in requests)
            metrics.rendered(model, "interactive", images, seconds, requests=len(requests))
            logger.info("rendered %d images for %d requests of %s in %.1f ms", images, len(requests), model.name,
                        1000 * seconds)
            for i, payload in zip(indices, payloads):
                replies[i] = RenderReply(payload=payload)
        except Exception as exc:  # every request of the group hears why; other groups are unaffected
            for i, request in zip(indices, requests):
                replies[i] = _failure(exc, request)
        finally:
            request_id.reset(token)
    return replies
