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

# On a machine where nvidia-smi sees a GPU the demo runs there, so it gets CuPy too.
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

$(VENV)/.demo: $(VENV)/.base
	$(if $(GPU),$(PY) -m pip install -q -e ".[gpu]")
	touch $@

# RANKS=N overrides the rank count the demo picks (see README, "make demo")
demo: $(VENV)/.demo
	$(PY) -m infinilm_nb demo $(if $(RANKS),--ranks $(RANKS))

# Workers, one a core up to 4: the simulator runs one Python thread per CUDA thread, and on CI's 2 cores
# the suite took 16.7 minutes in one process and 5.9 in two.
test: $(VENV)/.test
	$(PY) -m pytest -q -rs -n auto --maxprocesses 4 tests

# decode.py and throughput.py share one random Llama-3-8B-shaped checkpoint (16 GB), written once
bench: $(VENV)/.bench
	$(PY) bench/kernels.py --out bench/out
	$(PY) bench/decode.py --out bench/out --model-dir bench/out/random-llama3-8b
	$(PY) bench/throughput.py --out bench/out --model-dir bench/out/random-llama3-8b

clean:
	rm -rf $(VENV)
