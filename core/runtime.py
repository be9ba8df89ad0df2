"""The one place where onnxruntime sessions are made, and the wrapper that runs a verified model version.

Workers, evaluation and benchmarks all run students through `ModelRuntime`, so a benchmark times exactly what
the service runs: same session options, same graphs, same input and output names, all read from the manifest.
Only export's parity check opens sessions of its own. This module imports onnxruntime, so the gateway never
imports it (the rest of core/ stays free of it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from core.manifest import load_manifest, manifest_sha256, resolve_version, verify_files
from core.noise import NoiseSpec
from core.vocabulary import MECHANISMS

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# A one-node graph (Relu of a float[1]), serialized: opening it on CUDA proves the provider starts on this machine.
_PROBE_MODEL = bytes.fromhex(
    "08073a370a0c0a0178120179220452656c75120570726f62655a0f0a0178120a0a08080112040a020801620f0a0179120a0a0808"
    "0112040a02080142040a00100d"
)


class GpuUnavailable(RuntimeError):
    """A GPU is required (SKDCGN_REQUIRE_GPU=1) but onnxruntime's CUDA provider is missing or does not start."""


def cuda_failure() -> str | None:
    """Why a session cannot run on CUDAExecutionProvider here (None: it can).

    An onnxruntime-gpu build lists CUDA among its providers even on a machine without a GPU, driver, CUDA or cuDNN;
    a session then falls back to CPU with a logged error. Opening a tiny session tells the two apart.
    """
    available = ort.get_available_providers()
    if CUDA not in available:
        return (f"{CUDA} is missing from onnxruntime {ort.__version__} (providers: {', '.join(available)}): "
                f"install onnxruntime-gpu instead of onnxruntime")
    try:
        session = ort.InferenceSession(_PROBE_MODEL, providers=[CUDA, CPU])
    except Exception as exc:  # noqa: BLE001 - any failure to open the probe means no CUDA session
        return f"{CUDA} failed to open a session: {type(exc).__name__}: {exc}"
    if CUDA not in session.get_providers():
        return (f"{CUDA} is in onnxruntime {ort.__version__} but did not start (no NVIDIA GPU or driver visible, "
                f"or the CUDA/cuDNN libraries are missing); sessions would fall back to {CPU}")
    return None


def execution_providers(require_gpu: bool = False) -> list[str]:
    """CUDA first when this onnxruntime build offers it, then CPU.

    `require_gpu`: raise GpuUnavailable, saying why, unless a session actually starts on CUDA here, instead of
    quietly serving on the CPU.
    """
    if require_gpu:
        reason = cuda_failure()
        if reason is not None:
            raise GpuUnavailable(f"a GPU is required (SKDCGN_REQUIRE_GPU=1) but {reason}")
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def session_options(threads: int = 0) -> ort.SessionOptions:
    """Intra-op `threads` (0: onnxruntime decides), and idle threads that sleep instead of spinning.

    Spinning threads of one session keep a core busy after a run; with several sessions (three mechanisms,
    or a worker beside other processes) they steal it from the session that runs next.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(path: str | os.PathLike, threads: int = 0, providers: list[str] | None = None) -> ort.InferenceSession:
    """An inference session with the project's options (also for graphs outside the model repository)."""
    return ort.InferenceSession(str(path), session_options(threads), providers=providers or execution_providers())


def _roles(inputs: Mapping[str, dict]) -> tuple[str, str]:
    """(noise input, label input) of a mechanism graph: the float32 input carries z, the int64 one y."""
    by_dtype = {spec["dtype"]: name for name, spec in inputs.items()}
    return by_dtype["float32"], by_dtype["int64"]


class ModelRuntime:
    """One version of a family: a session per mechanism, and the fused session when the version ships one.

    `verify` checks every file against the manifest's sha256 first; a caller that already verified (the worker,
    which caches its checks) passes False.
    """

    def __init__(self, directory: str | os.PathLike, threads: int = 0, providers: list[str] | None = None,
                 verify: bool = True):
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        if verify:
            verify_files(self.directory, self.manifest)
        self.manifest_sha256 = manifest_sha256(self.directory)
        self.family, self.version = self.manifest["family"], self.manifest["version"]
        self.noise = NoiseSpec.from_manifest(self.manifest["noise"])
        self.image_size = int(self.manifest["image_size"])
        self.texture_shuffle = bool(self.manifest["texture_shuffle"])
        blocks = self.manifest["mechanisms"]
        self.sessions = {m: open_session(self.directory / block["file"], threads, providers)
                         for m, block in blocks.items()}
        self.inputs = {m: _roles(block["inputs"]) for m, block in blocks.items()}
        self.outputs = {m: next(iter(block["outputs"])) for m, block in blocks.items()}
        fused = self.manifest.get("fused")
        self.fused = open_session(self.directory / fused["file"], threads, providers) if fused else None
        self.bindings = fused["bindings"] if fused else None
        self.provider = (self.fused or next(iter(self.sessions.values()))).get_providers()[0]

    @classmethod
    def from_repository(cls, models_dir: str | os.PathLike, family: str, version: str | None = None,
                        **options) -> "ModelRuntime":
        """Version `version` of `family` (LATEST when None) from a model repository."""
        _, directory = resolve_version(models_dir, family, version)
        return cls(directory, **options)

    @property
    def name(self) -> str:
        return f"{self.family}/{self.version}"

    @property
    def mechanisms(self) -> list[str]:
        return list(self.sessions)

    def output_range(self, mechanism: str) -> tuple[float, float]:
        low, high = self.manifest["mechanisms"][mechanism]["outputs"][self.outputs[mechanism]]["range"]
        return float(low), float(high)

    def run(self, mechanism: str, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """One mechanism's output for noise z [B, Z] and labels y [B]."""
        noise_name, label_name = self.inputs[mechanism]
        feeds = {noise_name: np.ascontiguousarray(z, np.float32), label_name: np.ascontiguousarray(y, np.int64)}
        return self.sessions[mechanism].run([self.outputs[mechanism]], feeds)[0]

    def run_separately(self, z: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The three mechanisms, each in its own session."""
        return {m: self.run(m, z[m], y[m]) for m in MECHANISMS}

    def run_fused(self, z: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The three mechanisms in one call of the fused graph."""
        feeds = {}
        for m in MECHANISMS:
            binding = self.bindings[m]
            feeds[binding["z"]] = np.ascontiguousarray(z[m], np.float32)
            feeds[binding["y"]] = np.ascontiguousarray(y[m], np.int64)
        outputs = self.fused.run([self.bindings[m]["output"] for m in MECHANISMS], feeds)
        return dict(zip(MECHANISMS, outputs))

    def run_all(self, z: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The three mechanisms: one fused call when the version ships fused.onnx, three sessions otherwise."""
        return self.run_fused(z, y) if self.fused is not None else self.run_separately(z, y)

    def warm_up(self) -> None:
        """One call per session, so the first request does not pay for allocation and kernel selection.

        Two samples: a graph whose batch axis was frozen at export fails here, at load, not on a request.
        """
        z = np.zeros((2, self.noise.dim), np.float32)
        y = np.zeros(2, np.int64)
        for mechanism in self.sessions:
            self.run(mechanism, z, y)
        if self.fused is not None:
            self.run_fused({m: z for m in MECHANISMS}, {m: y for m in MECHANISMS})
