# Two commands matter: `make run` (the service) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SHARED ?= $(abspath ../shared)
export SKDCGN_SHARED := $(SHARED)

.PHONY: install test sample clean

TORCH ?= 2.13.0
PYTHON312 ?=

# The CPU build of torch lies on disk; pinning it first keeps pip from pulling a CUDA build. Then the dev lock,
# hash-checked and without resolving (it holds no torch and no CUDA package), then the project itself.
$(VENV)/.installed: pyproject.toml requirements/dev.lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==$(TORCH)
	$(PIP) install --require-hashes --no-deps -r requirements/dev.lock.txt
	$(PIP) install --no-deps -e .
	$(PIP) check
	touch $@

install: $(VENV)/.installed

.PHONY: lock
# requirements/<deployable>.lock.txt (gateway, worker-cpu, worker-gpu, dev) from pyproject.toml with pip-compile and
# hashes; run it after every change of pyproject.toml (a test fails while a lock is stale). Needs PyPI, and a
# Python 3.12 for the GPU worker's lock (python3.12 on PATH or pyenv's; else PYTHON312=/path/to/python3.12).
# Locked versions that pyproject.toml still allows are kept; LOCK_ARGS=--upgrade resolves everything afresh.
LOCK_ARGS ?=
lock: install
	$(PY) requirements/compile.py --torch $(TORCH) $(if $(PYTHON312),--python3.12 $(PYTHON312)) $(LOCK_ARGS)

# pytest exits 5 when it collects no test: that is not a failure of the suite. One OpenMP thread per process:
# the suite runs torch beside Redis, Celery and uvicorn processes, and oversubscribed OpenMP threads thrash.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

sample: install
	$(PY) -m training.teachers sample --teacher double_colored --teacher-path $(SHARED)/teachers/cgn_mnist \
		--out docs/teacher_double_colored.png

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache

.PHONY: run
# The service on localhost with the shipped model: Redis (started if none answers), one Celery worker and the
# gateway; prints the URL, Ctrl-C stops everything. HOST/PORT override 127.0.0.1:8000. It runs from its own
# virtualenv with only what serving needs (gateway, worker, onnxruntime CPU: no torch), from the serve lock.
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_VENV ?= .venv-serve
$(SERVE_VENV)/.installed: pyproject.toml requirements/serve.lock.txt
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --require-hashes --no-deps -r requirements/serve.lock.txt
	$(SERVE_VENV)/bin/pip install --no-deps -e .
	$(SERVE_VENV)/bin/pip check
	touch $@

run: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/python -m service.run_local --host $(HOST) --port $(PORT)

.PHONY: eval bench
# Every shipped MNIST family against its teacher: fidelity, then the invariant-classifier experiment at the
# default scale (20,000 images, 6 epochs, seeds 0-2, unmodified and modified masks: hours on a 2-core CPU).
# EVAL_ARGS adds options, e.g. EVAL_ARGS="--images 2000 --epochs 1 --seeds 0" (quick) or "--paper-scale".
EVAL_ARGS ?=
eval: install
	$(PY) -m experiments all $(EVAL_ARGS)
	$(PY) -m experiments.generated write

# Teacher vs students (parameters, MACs, images/s) for every shipped family, then the serving benchmark against
# a service started for the run; BENCH_URL=http://127.0.0.1:8000 targets a running service instead.
BENCH_URL ?=
bench: install
	for family in double_colored_mnist wildlife_mnist colored_mnist; do \
		if [ -f models/$$family/LATEST ]; then $(PY) -m benchmarks.models --family $$family || exit 1; fi; \
	done
	$(PY) -m benchmarks.serving $(if $(BENCH_URL),--url $(BENCH_URL),--start)
	$(PY) -m benchmarks.soak $(if $(BENCH_URL),--url $(BENCH_URL))
	$(PY) -m experiments.generated write

.PHONY: docs
# The figures about students are rendered, never typed: README's family table and headline numbers, the summary,
# student and paper-scale blocks of docs/RESULTS.md (<!-- generated:NAME -->) and each shipped manifest's `targets`
# block, from models/*/*/manifest.json and benchmarks/results/*.json. `make test` fails while one is stale.
docs: install
	$(PY) -m experiments.generated write
