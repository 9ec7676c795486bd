"""The ONLY module that knows vLLM versions and internals (checked against vLLM 0.26.0).

What vLLM 0.26 lacks, and the shims that add it:

1. Backend names: 0.26 cannot register new backend names, so DASH takes the ``CUSTOM`` slot
   (``--attention-backend CUSTOM``). Registration happens in every vLLM process through the
   ``vllm.general_plugins`` entry point.
2. CPU: vLLM's CPU platform ignores the selected backend and always returns CPU_ATTN.
   :func:`install_cpu_shim` wraps ``CpuPlatform.get_attn_backend_cls`` so that an explicit
   CUSTOM selection whose CUSTOM slot holds DASH returns DASH; any other selection (or none)
   goes to vLLM's own code unchanged. It also gives DASH its default block size (64) on CPU,
   where vLLM otherwise forces 128 when the user gave none.
3. Block summaries inside the KV budget: 0.26 has no ``customize_spec``. When the layer's
   backend is DASH, :func:`install_summary_pages` pads each KV page (``page_size_padded``)
   by ``layout.summary_page_bytes`` (Hk * Ds fp32 numbers for the engine's resolved summary
   kind), so vLLM's memory planner counts the summaries like any other KV byte and
   allocates them with the cache; the backend reads them from that padding
   (``layout.summary_view``; the page layout itself is a DASH fact and lives in layout.py).
4. Checkpoints with pooling vectors: official DashAttention checkpoints ship
   ``model.layers.{i}.self_attn.indexer_q``, which no vLLM model has as a parameter;
   vLLM's AutoWeightsLoader raises "There is no module or parameter named ..." on them.
   :func:`install_checkpoint_filter` wraps ``DefaultModelLoader.get_all_weights`` so that,
   for a model whose attention layers run DASH, those names are dropped from the weights
   stream (the backend reads them itself: summary_source).
:func:`engine_summaries` is where an engine's ``summary="auto"`` resolves: it reads the
model's path and shape from the vLLM config (the only vLLM knowledge involved) and calls
summary_source.engine_summaries, cached per process.
Without an explicit CUSTOM selection nothing here changes vLLM's behaviour. This module
imports layout.py, config.py and summary_source.py, never backend.py (the backend imports
this module).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging

import torch

from vllm_dash import layout, summary_source
from vllm_dash.config import engine_config

logger = logging.getLogger("vllm_dash")

SUPPORTED_VLLM = ("0.26.",)
BACKEND_PATH = "vllm_dash.backend.DashAttentionBackend"


def vllm_version() -> str:
    import vllm
    return getattr(vllm, "__version__", "unknown")


def check_vllm_version() -> None:
    v = vllm_version()
    if not v.startswith(SUPPORTED_VLLM):
        logger.warning("vllm-dash is verified on vLLM %s; found %s", "/".join(SUPPORTED_VLLM), v)


# ------------------------------------------------------------------------- registry
def _enum():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    return AttentionBackendEnum


def register_custom_backend() -> None:
    from vllm.v1.attention.backends.registry import register_backend
    register_backend(_enum().CUSTOM, BACKEND_PATH)


def custom_slot_is_dash() -> bool:
    try:
        return _enum().CUSTOM.get_path() == BACKEND_PATH
    except Exception:          # CUSTOM not filled by anyone
        return False


def is_dash_selected(selected_backend) -> bool:
    return selected_backend is not None and selected_backend == _enum().CUSTOM \
        and custom_slot_is_dash()


# ------------------------------------------------------------------------- CPU shim
def install_cpu_shim() -> None:
    from vllm.platforms import cpu as cpu_platform
    Cpu = cpu_platform.CpuPlatform
    if getattr(Cpu, "_vllm_dash_shim", False):
        return
    orig_get = Cpu.get_attn_backend_cls.__func__
    orig_check = Cpu.check_and_update_config.__func__

    @functools.wraps(orig_get)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if is_dash_selected(selected_backend):
            backend = _enum().CUSTOM.get_class()
            reasons = backend.validate_configuration(
                device_capability=None, **attn_selector_config._asdict())
            if reasons:
                raise ValueError(f"DASH attention backend cannot run this model on CPU: "
                                 f"{'; '.join(reasons)}")
            return BACKEND_PATH
        return orig_get(cls, selected_backend, attn_selector_config, *args, **kwargs)

    @functools.wraps(orig_check)
    def check_and_update_config(cls, vllm_config):
        cache = vllm_config.cache_config
        dash = is_dash_selected(getattr(vllm_config.attention_config, "backend", None))
        user_block = cache.user_specified_block_size
        orig_check(cls, vllm_config)
        if dash and not user_block:
            cache.block_size = layout.DEFAULT_BLOCK_SIZE

    Cpu.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    Cpu.check_and_update_config = classmethod(check_and_update_config)
    Cpu._vllm_dash_shim = True


# ------------------------------------------------------------------------- summary pages
def install_summary_pages() -> None:
    from vllm.model_executor.layers.attention import attention as attn_mod
    Attention = attn_mod.Attention
    if getattr(Attention, "_vllm_dash_pages", False):
        return
    orig = Attention.get_kv_cache_spec

    @functools.wraps(orig)
    def get_kv_cache_spec(self, vllm_config):
        spec = orig(self, vllm_config)
        backend = getattr(self, "attn_backend", None)
        if spec is None or backend is None or not getattr(backend, "IS_DASH", False):
            return spec
        real = spec.real_page_size_bytes
        kind = engine_summaries(vllm_config).config.summary
        return dataclasses.replace(
            spec, page_size_padded=real + layout.summary_page_bytes(spec.num_kv_heads,
                                                                    spec.head_size, kind))

    Attention.get_kv_cache_spec = get_kv_cache_spec
    Attention._vllm_dash_pages = True


# ------------------------------------------------------------------------- pooling vectors
def install_checkpoint_filter() -> None:
    """Drop ``*.self_attn.indexer_q`` from the weights stream of models served by DASH."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    if getattr(DefaultModelLoader, "_vllm_dash_filter", False):
        return
    orig = DefaultModelLoader.get_all_weights

    @functools.wraps(orig)
    def get_all_weights(self, model_config, model):
        weights = orig(self, model_config, model)
        if not serves_dash(model):
            return weights
        return ((name, w) for name, w in weights
                if not summary_source.is_checkpoint_pool_name(name))

    DefaultModelLoader.get_all_weights = get_all_weights
    DefaultModelLoader._vllm_dash_filter = True


def serves_dash(model) -> bool:
    """Whether any attention layer of ``model`` runs the DASH backend."""
    return any(getattr(getattr(m, "attn_backend", None), "IS_DASH", False)
               for m in model.modules())


def _local_model_dir(model_config):
    """The model's local folder: the path given, or its snapshot in the Hugging Face cache
    (never downloaded here); None when neither exists."""
    import os
    path = model_config.model
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, revision=model_config.revision, local_files_only=True)
    except Exception:          # not a repo id, or not in the cache
        return None


def engine_summaries(vllm_config) -> summary_source.EngineSummaries:
    """The engine's resolved summary settings and pooling vectors (once per process)."""
    config = engine_config(getattr(vllm_config, "additional_config", None))
    mc = getattr(vllm_config, "model_config", None)
    if mc is None:                       # no model known (unit tests): nothing to check
        return summary_source.engine_summaries(config, None, None)
    shape = summary_source.ModelShape(num_layers=mc.get_total_num_hidden_layers(),
                                      num_kv_heads=mc.get_total_num_kv_heads(),
                                      head_size=mc.get_head_size())
    return summary_source.engine_summaries(config, _local_model_dir(mc), shape)


def kv_head_offset(total_kv_heads: int) -> int:
    """First (global) KV head of this tensor-parallel rank (vLLM splits KV heads evenly
    over ranks, or replicates them when there are fewer heads than ranks)."""
    from vllm.distributed import (get_tensor_model_parallel_rank,
                                  get_tensor_model_parallel_world_size)
    try:
        rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:        # no distributed state (single process)
        return 0
    return rank * total_kv_heads // size


# ------------------------------------------------------------------------- vLLM pieces
def attention_cg_support_uniform_decode():
    from vllm.v1.attention.backend import AttentionCGSupport
    return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index
    return extract_layer_index(layer_name)


def current_vllm_config():
    from vllm.config import get_current_vllm_config
    return get_current_vllm_config()


def split_decodes_and_prefills(common_attn_metadata):
    """(num_decodes, num_prefills, num_decode_tokens, num_prefill_tokens) of a reordered
    batch. A one-token chunk of a prompt (a prefix-cache hit ends one token before the
    prompt's end; a chunked prefill can leave one token) counts as prefill, so every prompt
    token goes through dense attention, when the runner says which requests are still
    prefilling (`is_prefilling`; vLLM's reorder puts such "short extends" after the
    decodes); otherwise vLLM's default (query length 1 = decode).

    vLLM 0.26's GPU model runner (v1/worker/gpu) passes `is_prefilling` for the real
    requests only while `num_reqs` counts the CUDA-graph padding rows (FULL graphs), so it
    is padded here with False (padding rows are not prefills) or cut to `num_reqs`: used
    as is, vLLM's split fails with a size mismatch and kills the engine."""
    from vllm.v1.attention.backends.utils import split_decodes_and_prefills as f
    cam = common_attn_metadata
    flags = getattr(cam, "is_prefilling", None)
    if flags is not None and flags.shape[0] != cam.num_reqs:
        fixed = torch.zeros(cam.num_reqs, dtype=torch.bool, device=flags.device)
        n = min(cam.num_reqs, flags.shape[0])
        fixed[:n] = flags[:n]
        cam = copy.copy(cam)
        cam.is_prefilling = fixed
    return f(cam, decode_threshold=1, treat_short_extends_as_decodes=flags is None)


def flash_attn_varlen():
    """vLLM's FlashAttention varlen function and the FA version to use, or (None, None)."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        version = get_flash_attn_version()
        if version is None:
            return None, None
        return flash_attn_varlen_func, version
    except Exception:  # no FA build for this GPU / platform
        return None, None


def triton_unified_attention():
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    return unified_attention
