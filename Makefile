# Set-up and entry points. `make test` and `make bench` each create what they need.
#   PYTHON=python3 make test   uses an existing interpreter that already has torch
#                              (no venv, no network), as on the GPU machine.
VENV     ?= .venv
TORCH    ?= torch==2.14.1
MAX_JOBS ?= 2
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0a;8.0+PTX
export MAX_JOBS

ifdef PYTHON
PY := $(PYTHON)
SETUP_DEPS :=
else
PY := $(VENV)/bin/python
SETUP_DEPS := $(VENV)/.installed
endif

.PHONY: test bench build clean

$(VENV)/.installed:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install "$(TORCH)" ninja pybind11 pytest hypothesis numpy setuptools wheel \
		aeon tqdm matplotlib
	touch $@

build: $(SETUP_DEPS)
	$(PY) -m pip install --no-build-isolation --no-deps -e . -q

test: build
	$(PY) -m pytest tests

bench: build
	$(PY) benchmarks/bench_rnn.py
	$(PY) benchmarks/bench_losses.py

clean:
	rm -rf build *.egg-info varlen_kernels/*.so
