# Every target bootstraps .venv from nothing. CPU-only machines get the CPU build of torch
# (a plain `torch` requirement would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
RANKS  ?=

.PHONY: demo test bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[mpi,gguf]"
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,mpi,gguf]"
	touch $@

$(VENV)/.bench: $(VENV)/.base
	$(PY) -m pip install -q -e ".[gpu,bench]"
	touch $@

demo: $(VENV)/.base
	$(PY) -m infinilm_nb demo $(if $(RANKS),--ranks $(RANKS))

test: $(VENV)/.test
	$(PY) -m pytest -q -rs tests

bench: $(VENV)/.bench
	$(PY) bench/kernels.py

clean:
	rm -rf $(VENV)
