"""onnxruntime sessions for the model repository's versions, and the rendering that runs on them.

Worker-only: this module imports onnxruntime (never torch). Noise, composition and image encoding come
from core/, so a sample rendered here matches one rendered anywhere else for the same seed and index.
"""
from __future__ import annotations

import base64
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from core.compose import compose_samples
from core.imageio import encode, to_uint8
from core.manifest import (
    ManifestError, latest_version, list_families, list_versions, load_manifest, manifest_sha256, resolve_version,
    verify_files,
)
from core.noise import MECHANISMS, NoiseSpec, SampleNoise, draw_sample_noise
from core.onnx_session import session_options

logger = logging.getLogger(__name__)


class ModelChanged(RuntimeError):
    """A version's manifest changed on disk after the gateway accepted the request."""


class ModelRefused(RuntimeError):
    """A version's files fail their manifest's sha256 check (corrupt, or still being copied): it is not served."""


def execution_providers() -> list[str]:
    """CUDA when this onnxruntime build and the machine offer it, CPU otherwise."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class MaskModifiers:
    """The shape-mechanism study: transparency a, rotation within ±r degrees, Gaussian mask noise σ."""

    transparency: float = 1.0
    rotation_deg: float = 0.0
    noise_std: float = 0.0


class LoadedModel:
    """One verified version of a family: a session per mechanism, the fused session when exported."""

    def __init__(self, family: str, version: str, directory: Path, manifest: dict, sha256: str,
                 options: ort.SessionOptions, providers: list[str]):
        self.family, self.version, self.manifest, self.manifest_sha256 = family, version, manifest, sha256
        self.noise_spec = NoiseSpec.from_manifest(manifest["noise"])
        self.image_size = int(manifest["image_size"])
        self.sessions = {
            mechanism: ort.InferenceSession(str(directory / block["file"]), options, providers=providers)
            for mechanism, block in manifest["mechanisms"].items()
        }
        fused = manifest.get("fused")
        self.fused = ort.InferenceSession(str(directory / fused["file"]), options, providers=providers) if fused else None
        self.provider = (self.fused or next(iter(self.sessions.values()))).get_providers()[0]

    @property
    def name(self) -> str:
        return f"{self.family}/{self.version}"

    def output_range(self, mechanism: str) -> tuple[float, float]:
        (spec,) = self.manifest["mechanisms"][mechanism]["outputs"].values()
        low, high = spec["range"]
        return float(low), float(high)

    def run_mechanism(self, mechanism: str, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.sessions[mechanism].run(None, {"z": z, "y": labels})[0]

    def run_all(self, z: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The three mechanisms' outputs: one fused call when the version ships fused.onnx."""
        if self.fused is None:
            return {m: self.run_mechanism(m, z[m], labels[m]) for m in MECHANISMS}
        feeds = {f"z_{m}": z[m] for m in MECHANISMS} | {f"y_{m}": labels[m] for m in MECHANISMS}
        names = [next(iter(self.manifest["mechanisms"][m]["outputs"])) for m in MECHANISMS]
        return dict(zip(MECHANISMS, self.fused.run(names, feeds)))

    def warm_up(self) -> None:
        """One call per session, so the first request does not pay for allocation and kernel selection.

        Two samples: a graph whose batch axis was frozen at export fails here, at load, not on a request.
        """
        z = np.zeros((2, self.noise_spec.dim), np.float32)
        y = np.zeros(2, np.int64)
        for mechanism in self.sessions:
            self.run_mechanism(mechanism, z, y)
        if self.fused is not None:
            self.run_all({m: z for m in MECHANISMS}, {m: y for m in MECHANISMS})


def file_signature(directory: Path) -> tuple:
    """Name, size, inode and change times of a version's files: any rewrite, copy or rename changes it."""
    entries = []
    for path in sorted(directory.iterdir()):
        stat = path.stat()
        entries.append((path.name, stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns))
    return tuple(entries)


class ModelRegistry:
    """The versions this worker has loaded, least recently used evicted first, and those it refuses; thread-safe."""

    def __init__(self, models_dir: Path, capacity: int, ort_threads: int):
        self.models_dir, self.capacity = Path(models_dir), capacity
        self.providers = execution_providers()
        self.options = session_options(ort_threads)
        self._loaded: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
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

    def get(self, family: str, version: str | None = None, expected_sha256: str | None = None) -> LoadedModel:
        """The loaded version (LATEST when None), reloaded if its manifest changed on disk; refused if files fail."""
        version, directory = resolve_version(self.models_dir, family, version)
        self.check(family, version, directory)
        on_disk = manifest_sha256(directory)
        if expected_sha256 is not None and on_disk != expected_sha256:
            raise ModelChanged(f"model {family}/{version} changed on disk after the request was accepted; retry it")
        with self._lock:
            model = self._loaded.get((family, version))
            if model is None or model.manifest_sha256 != on_disk:
                model = self._load(family, version, directory, on_disk)
                self._loaded[(family, version)] = model
                while len(self._loaded) > self.capacity:
                    evicted = self._loaded.popitem(last=False)[1]
                    logger.info("unloaded %s", evicted.name)
            self._loaded.move_to_end((family, version))
            return model

    def _load(self, family: str, version: str, directory: Path, sha256: str) -> LoadedModel:
        started = time.perf_counter()
        manifest = load_manifest(directory)
        model = LoadedModel(family, version, directory, manifest, sha256, self.options, self.providers)
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


def draw_noises(model: LoadedModel, seed: int, indices: Iterable[int], modifiers: MaskModifiers,
                z_overrides: Sequence[Mapping[str, Sequence[float]] | None]) -> list[SampleNoise]:
    return [
        draw_sample_noise(seed, index, model.noise_spec, model.image_size, rotation_deg=modifiers.rotation_deg,
                          noise_std=modifiers.noise_std, z_override=override)
        for index, override in zip(indices, z_overrides)
    ]


def counterfactual_batch(model: LoadedModel, seed: int, indices: Sequence[int], labels: Sequence[Mapping[str, int]],
                         modifiers: MaskModifiers, z_overrides: Sequence[Mapping | None]):
    """Composite images (uint8 NHWC), the components as composed (uint8), and the z used, for samples `indices`."""
    noises = draw_noises(model, seed, indices, modifiers, z_overrides)
    z = {m: np.stack([noise.z[m] for noise in noises]) for m in MECHANISMS}
    y = {m: np.asarray([sample[m] for sample in labels], np.int64) for m in MECHANISMS}
    outputs = model.run_all(z, y)
    composite, mask, texture, background = compose_samples(
        outputs["shape"], outputs["texture"], outputs["background"], noises, bool(model.manifest["texture_shuffle"]),
        modifiers.transparency,
    )
    components = {
        "mask": to_uint8(mask, model.output_range("shape")),
        "texture": to_uint8(texture, model.output_range("texture")),
        "background": to_uint8(background, model.output_range("background")),
    }
    return to_uint8(composite, model.output_range("texture")), components, z


def encode_base64_png(images: np.ndarray) -> list[str]:
    return [base64.b64encode(encode(image)).decode("ascii") for image in images]


def _per_sample_z(z: Mapping[str, list] | None, n: int) -> list[dict | None]:
    """Request z ({mechanism: n vectors}) as one core.noise override per sample."""
    if not z:
        return [None] * n
    return [{mechanism: vectors[i] for mechanism, vectors in z.items()} for i in range(n)]


def render_request(registry: ModelRegistry, request: dict) -> dict:
    """An interactive request (see service.app) to the JSON payload the gateway returns and caches."""
    model = registry.get(request["family"], request["version"], request["manifest_sha256"])
    n, seed = request["n"], request["seed"]
    overrides = _per_sample_z(request.get("z"), n)
    payload = {"model": model.family, "version": model.version, "manifest_sha256": model.manifest_sha256,
               "provider": model.provider, "seed": seed, "n": n}
    if request["kind"] == "counterfactual":
        images, components, z = counterfactual_batch(
            model, seed, range(n), [request["labels"]] * n, MaskModifiers(**request["mask"]), overrides
        )
        if request["return_components"]:
            payload["components"] = {name: encode_base64_png(value) for name, value in components.items()}
    else:
        mechanism = request["mechanism"]
        noises = draw_noises(model, seed, range(n), MaskModifiers(), overrides)
        z = {mechanism: np.stack([noise.z[mechanism] for noise in noises])}
        output = model.run_mechanism(mechanism, z[mechanism], np.full(n, request["label"], np.int64))
        images = to_uint8(output, model.output_range(mechanism))
    payload["images"] = encode_base64_png(images)
    if request["return_noise"]:
        payload["z"] = {mechanism: values.tolist() for mechanism, values in z.items()}
    return payload
