"""`make lock`: one hash-locked requirements file per deployable, compiled from pyproject.toml with pip-tools.

    requirements/gateway.lock.txt     .[gateway]         Python 3.11 (docker/Dockerfile.gateway)
    requirements/worker-cpu.lock.txt  .[worker,cpu]      Python 3.11 (docker/Dockerfile.worker-cpu)
    requirements/worker-gpu.lock.txt  .[worker,gpu]      Python 3.12 (docker/Dockerfile.worker: Ubuntu 24.04's)
    requirements/serve.lock.txt       .[gateway,worker,cpu,client] Python 3.11 (`make run` and the `skdcgn` client: no torch)
    requirements/dev.lock.txt         .[dev]             Python 3.11 (`make install`, `make test`, CI)

pip resolves environment markers for the interpreter it runs on, so each lock is compiled by pip-compile running
on that deployable's Python: this venv's for its own version, a throw-away venv of `--python3.12` (default:
`python3.12` on PATH, else a pyenv 3.12) for the GPU worker. The machine's pip configuration (local wheel folders, extra indexes,
constraint files) is ignored: every lock names PyPI's files only, so it installs anywhere.

torch is never locked: `make install` installs its CPU build first (`pip install torch==2.13.0`), and GPU hosts
bring their own CUDA build. The dev lock is resolved with torch constrained to that release, then torch and what
only torch needs for CUDA (triton, nvidia-*, cuda-*) are removed from it, so the lock installs with `--no-deps`
beside the torch already there.

Versions already in a lock are kept while pyproject.toml allows them; `--upgrade` (`make lock LOCK_ARGS=--upgrade`)
resolves everything afresh. Each lock starts with `# pyproject-sha256: <sha256 of pyproject.toml>`:
tests/test_operations.py fails while a lock is older than pyproject.toml, without resolving anything (offline).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCK_DIR = ROOT / "requirements"
HASH_HEADER = "# pyproject-sha256:"
PIP_TOOLS = "pip-tools==7.6.2"  # the same pip-compile for every Python, so every lock reads alike
# Never in a lock: torch is installed before the lock (CPU build here, CUDA build on GPU hosts), and the project
# itself (its own extras refer to it) is installed after it, from the checkout, with `pip install --no-deps`.
NEVER_LOCKED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|skdcgn)$")
# pip-compile's warning about the project's own unhashed `skdcgn @ file://` line, dropped with that line.
PIP_COMPILE_WARNING = ("# WARNING: pip install will require the following package to be hashed.",
                       "# Consider using a hashable URL like")


@dataclass(frozen=True)
class Deployable:
    name: str
    extras: tuple[str, ...]
    python: str  # major.minor of the interpreter that runs it

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"{self.name}.lock.txt"


DEPLOYABLES = (
    Deployable("gateway", ("gateway",), "3.11"),
    Deployable("worker-cpu", ("worker", "cpu"), "3.11"),
    Deployable("worker-gpu", ("worker", "gpu"), "3.12"),
    Deployable("serve", ("gateway", "worker", "cpu", "client"), "3.11"),
    Deployable("dev", ("dev",), "3.11"),
)


def pyproject_sha256(path: Path = PYPROJECT) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recorded_sha256(lock: Path) -> str | None:
    """The pyproject.toml hash a lock was compiled from (None: no header)."""
    for line in lock.read_text().splitlines():
        if line.startswith(HASH_HEADER):
            return line[len(HASH_HEADER):].strip()
    return None


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(lock_text: str) -> dict[str, str]:
    """{normalized name: version} of a lock's `name==version` lines."""
    found = {}
    for line in lock_text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match:
            found[normalize(match.group(1))] = match.group(2)
    return found


def drop_packages(text: str, drop: re.Pattern) -> str:
    """The compiled file without the requirement blocks (pin, hashes, annotations) of the names `drop` matches."""
    out, skipping = [], False
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            name = re.split(r"[=<>!~;\[ \\]", line, maxsplit=1)[0]
            skipping = bool(drop.match(normalize(name)))
        elif line and not line[0].isspace():
            skipping = False  # a top-level comment ends the block before it
        if not skipping and not line.startswith(PIP_COMPILE_WARNING):
            out.append(line)
    return "\n".join(out) + "\n"


def isolated_env() -> dict[str, str]:
    """The environment without this machine's pip configuration: the lock must name PyPI's files only."""
    dropped = {"PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT",
               "PIP_REQUIRE_VIRTUALENV", "PIP_PRE"}
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", CUSTOM_COMPILE_COMMAND="make lock")
    return env


def find_python(version: str, given: str | None) -> str:
    """An interpreter of `version`: the one given, else python<version> on PATH, else a pyenv install of it."""
    candidates = [given] if given else [f"python{version}"] + sorted(
        str(path) for path in Path("~/.pyenv/versions").expanduser().glob(f"{version}.*/bin/python{version}"))
    for candidate in candidates:
        try:
            found = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                   capture_output=True, text=True, check=False)
        except OSError:
            continue
        if found.returncode == 0 and found.stdout.strip() == version:
            return candidate
    raise SystemExit(f"no Python {version} found (tried {', '.join(candidates)}): install one, or pass "
                     f"--python{version} PATH (make lock PYTHON{version.replace('.', '')}=PATH)")


def pip_compile_for(python: str, interpreters: dict[str, str], workdir: Path) -> list[str]:
    """The pip-compile command running on Python `python` (this venv's, or a throw-away venv's)."""
    if python == f"{sys.version_info.major}.{sys.version_info.minor}":
        return [sys.executable, "-m", "piptools", "compile"]
    venv = workdir / f"venv{python}"
    if not venv.exists():
        subprocess.run([find_python(python, interpreters.get(python)), "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", PIP_TOOLS], check=True,
                       env=isolated_env())
    return [str(venv / "bin" / "python"), "-m", "piptools", "compile"]


def compile_lock(deployable: Deployable, interpreters: dict[str, str], workdir: Path, torch_version: str,
                 upgrade: bool = False) -> None:
    output = workdir / deployable.path.name
    if deployable.path.exists() and not upgrade:
        output.write_text(deployable.path.read_text())  # pip-compile keeps the pins it finds there that still fit
    command = pip_compile_for(deployable.python, interpreters, workdir) + [
        "--quiet", "--generate-hashes", "--strip-extras", "--allow-unsafe", "--no-emit-index-url",
        "--no-emit-find-links", "--resolver=backtracking", "--index-url", "https://pypi.org/simple",
        "--output-file", str(output),
    ]
    if upgrade:
        command.append("--upgrade")
    for extra in deployable.extras:
        command += ["--extra", extra]
    if deployable.name == "dev":
        constraints = workdir / "torch-constraint.txt"
        constraints.write_text(f"torch=={torch_version}\n")
        command += ["--constraint", str(constraints)]
    subprocess.run(command + [PYPROJECT.name], check=True, cwd=ROOT, env=isolated_env())
    body = drop_packages(output.read_text(), NEVER_LOCKED)
    header = (f"{HASH_HEADER} {pyproject_sha256()}\n"
              f"# deployable: {deployable.name} (.[{','.join(deployable.extras)}]), Python {deployable.python}; "
              f"torch and its CUDA packages are never locked\n")
    deployable.path.write_text(header + body)
    print(f"wrote {deployable.path.relative_to(ROOT)} ({len(pinned(body))} packages)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="deployables to lock (default: all)")
    parser.add_argument("--python3.12", dest="python312", default=None,
                        help="a Python 3.12 interpreter, for the GPU worker's lock (default: python3.12 on PATH, "
                             "else a pyenv 3.12)")
    parser.add_argument("--torch", default="2.13.0", help="the torch release `make install` installs")
    parser.add_argument("--upgrade", action="store_true",
                        help="resolve every package afresh (default: keep the locked versions pyproject.toml allows)")
    args = parser.parse_args(argv)
    chosen = [d for d in DEPLOYABLES if not args.names or d.name in args.names]
    unknown = set(args.names) - {d.name for d in DEPLOYABLES}
    if unknown:
        parser.error(f"unknown deployables: {', '.join(sorted(unknown))}")
    interpreters = {"3.12": args.python312}
    with tempfile.TemporaryDirectory(prefix="skdcgn-lock-") as tmp:
        for deployable in chosen:
            compile_lock(deployable, interpreters, Path(tmp), args.torch, args.upgrade)
    return 0


if __name__ == "__main__":
    sys.exit(main())
