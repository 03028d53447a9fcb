# Set-up and the two main commands. Everything installs into .venv (Python 3.10+).
#   make demo   # set up, then run `optden demo` on bundled real data
#   make test   # set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch pinned here (a CPU wheel); the library itself needs only torch>=2.4.
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(VENV)/.setup-done: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)" pybind11
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

setup: $(VENV)/.setup-done

demo: setup
	$(VENV)/bin/optden demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench_dense.py

clean:
	rm -rf build *.egg-info optden/*.so $(VENV)
