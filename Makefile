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
	$(VENV)/bin/pip install "$(TORCH)" ninja pybind11 pytest pytest-xdist hypothesis numpy setuptools wheel \
		aeon tqdm matplotlib
	touch $@

build: $(SETUP_DEPS)
	$(PY) -m pip install --no-build-isolation --no-deps -e . -q

# The emulated CUDA tests run twice: with the rest (thread order "forward"), then
# again under AddressSanitizer in a seeded random thread order.
ASAN_LIB := $(shell gcc -print-file-name=libasan.so 2>/dev/null)
CXX_LIB  := $(shell gcc -print-file-name=libstdc++.so.6 2>/dev/null)
ASAN_ENV := VK_EMU_SANITIZER=asan ASAN_OPTIONS=detect_leaks=0:detect_odr_violation=0 LD_PRELOAD="$(ASAN_LIB) $(CXX_LIB)"
# Then every op once under ThreadSanitizer: a data race in any kernel (two
# threads, one address, no barrier between) fails the run (exit status 66).
TSAN_ENV := VK_EMU_SANITIZER=tsan TSAN_OPTIONS=exitcode=66 OMP_NUM_THREADS=1 \
	LD_PRELOAD="$(shell gcc -print-file-name=libtsan.so 2>/dev/null)"

# The tests run in parallel, one worker per core, where pytest-xdist is
# installed (the venv has it; an interpreter without it runs them in turn).
PARALLEL = $(shell $(PY) -c "import xdist" 2>/dev/null && echo "-n auto")

test: build
	$(PY) -m pytest tests $(PARALLEL)
	@echo "== the CUDA kernels' code again, under AddressSanitizer, random thread order"
	VK_EMU_ORDERS=random VK_EMU_SEED=$${VK_EMU_SEED:-1} $(ASAN_ENV) $(PY) -m pytest tests -m emulation -p no:cacheprovider $(PARALLEL)
	@echo "== every op's CUDA code under ThreadSanitizer (racecheck)"
	$(TSAN_ENV) $(PY) benchmarks/sanitizer_workload.py --device cpu --emulate

bench: build
	$(PY) benchmarks/bench_rnn.py
	$(PY) benchmarks/bench_losses.py
	$(PY) benchmarks/bench_linear_ce.py

clean:
	rm -rf build *.egg-info varlen_kernels/*.so
