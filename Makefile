# Two commands matter: `make run` (the service) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SHARED ?= $(abspath ../shared)
export SKDCGN_SHARED := $(SHARED)

.PHONY: install test sample clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# The CPU build of torch lies on disk; pinning it first keeps pip from pulling a CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: install
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

sample: install
	$(PY) -m training.teachers sample --teacher double_colored --teacher-path $(SHARED)/teachers/cgn_mnist \
		--out docs/teacher_double_colored.png

clean:
	rm -rf $(VENV) .pytest_cache
