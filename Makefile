# pgen_engine — the two commands: `make demo` and `make test` (each works on a fresh clone).
# A local virtual environment gets the pinned CPU torch first, so pip never resolves a
# multi-GB CUDA build on CPU machines; on a GPU machine set TORCH_SPEC to a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_OUT ?= runs/demo

.PHONY: demo test test-slow build bench bench-gpu gpu-smoke wheelhouse clean venv

$(VENV)/.stamp-deps: requirements-dev.txt setup.py
	@echo "== creating $(VENV) and installing pinned dependencies at $$(date -u +%H:%M:%S) UTC"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements-dev.txt "$(TORCH_SPEC)"
	touch $@

venv: $(VENV)/.stamp-deps

# Builds pgen_engine._C (C++; plus CUDA kernels when torch has CUDA and nvcc is present)
# and installs the package in editable mode with the `pgen` command.
# tools/build_extension.sh: compiler output to $(BUILD_LOG), a timeout (BUILD_TIMEOUT s), and
# diagnostics (log tail, memory, busiest processes) when the build fails or stalls.
# MAX_JOBS (read by torch's ninja build) defaults to the cores this process may use, not the
# host's: each heavy translation unit takes ~2 GB and ~40-60 s.
BUILD_LOG ?= $(VENV)/build.log
BUILD_TIMEOUT ?= 1200
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS
$(VENV)/.stamp-build: $(VENV)/.stamp-deps setup.py tools/build_extension.sh $(wildcard csrc/*) $(wildcard kernels/*)
	@bash tools/build_extension.sh $(PY) $(BUILD_LOG) $(BUILD_TIMEOUT)
	touch $@

build: $(VENV)/.stamp-build

demo: build
	$(PY) -m pgen_engine demo --out $(DEMO_OUT)

test: build
	PGEN_REQUIRE_EXT=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: build
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: build
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-columns=mean,stddev,rounds $(PYTEST_ARGS)

bench-gpu: build
	$(PY) -m benchmarks.gpu

# On a GPU machine: the Python already there (no venv, no registry, its torch kept); missing
# pure-Python deps come from wheelhouse/. See README "GPU".
GPU_PYTHON ?= python3
GPU_SMOKE_OUT ?= runs/gpu_smoke
gpu-smoke:
	$(GPU_PYTHON) -m benchmarks.gpu_smoke --out $(GPU_SMOKE_OUT)

# Here (needs a registry): wheels of DeepSpeed + deps, pytest-benchmark, pytest-xdist, scipy, pillow for
# the GPU machine's Python (never torch / triton / nvidia-*); fails over 60 MiB.
WHEEL_PYTHON_VERSION ?= 3.12
wheelhouse: $(VENV)/.stamp-deps
	$(PY) -m benchmarks.wheelhouse build --dir wheelhouse --python-version $(WHEEL_PYTHON_VERSION)

clean:
	rm -rf build *.egg-info pgen_engine/_C*.so $(VENV)
