# Set-up and the two main commands. Everything installs into .venv (Python 3.10+).
#   make demo   # set up, then run `optden demo` on bundled real data
#   make test   # set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch pinned here (a CPU wheel); the library itself needs only torch>=2.4.
TORCH ?= torch==2.13.0
# k-diffusion's samplers drive OptimalDenoiser in tests/test_conventions.py, which loads only
# k_diffusion/sampling.py (its package __init__ pulls ~50 packages, torchvision among them):
# installed --no-deps with the two modules sampling.py imports at its top
KDIFFUSION ?= k-diffusion==0.1.1.post1 torchdiffeq==0.2.5 torchsde==0.2.6 trampoline==0.1.2

.PHONY: setup demo test bench clean

# numpy is installed with torch, before the extension builds: the build imports torch,
# which warns "Failed to initialize NumPy" without it

$(VENV)/.setup-done: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)" pybind11 numpy
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	$(PY) -m pip install -q --no-deps $(KDIFFUSION)
	touch $@

setup: $(VENV)/.setup-done

# prints how long the set-up took (a fresh machine: the venv, torch and the C++ build) and the demo
demo:
	@t0=$$(date +%s); $(MAKE) --no-print-directory setup; t1=$$(date +%s); \
	echo "make demo: set-up $$((t1 - t0)) s (nothing to do when .venv is up to date)"; \
	$(VENV)/bin/optden demo; t2=$$(date +%s); \
	echo "make demo: $$((t2 - t0)) s in all: set-up $$((t1 - t0)) s, demo $$((t2 - t1)) s"

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench_dense.py

clean:
	rm -rf build *.egg-info optden/*.so $(VENV)

# Compile-only check of the CUDA kernels (csrc/cuda/*.cu) for sm_80 and sm_90; no GPU needed.
NVCC ?= nvcc
.PHONY: cuda-check
cuda-check: setup
	mkdir -p build/cuda-check
	for f in csrc/cuda/*.cu; do \
	  $(NVCC) -c $$f -o build/cuda-check/$$(basename $$f .cu).o -std=c++17 -O3 -Xcompiler -fPIC -DOPTDEN_WITH_CUDA \
	    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -Icsrc \
	    -I$$($(PY) -c 'import pybind11; print(pybind11.get_include())') \
	    -I$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])') || exit 1; \
	done
	@echo "cuda-check: csrc/cuda/*.cu compile for sm_80 and sm_90"
