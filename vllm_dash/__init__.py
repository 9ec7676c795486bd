"""vllm-dash: DashAttention (entmax block-sparse decode) as a vLLM attention backend.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every process
(API server, engine core, workers), so it must be idempotent and cheap: it imports
nothing heavy at module import time.
"""
from __future__ import annotations

__all__ = ["register", "__version__"]
__version__ = "0.1.0.dev0"

_registered = False


def register() -> None:
    """vLLM plugin entry point (idempotent; runs in every vLLM process).

    Fills vLLM's CUSTOM backend slot with DASH (select it with
    ``--attention-backend CUSTOM``) and installs the documented vLLM 0.26 shims of
    vllm_dash.compat; none of them changes anything unless DASH is selected.
    """
    global _registered
    if _registered:
        return
    from vllm_dash import compat

    compat.check_vllm_version()
    compat.register_custom_backend()
    compat.install_cpu_shim()
    compat.install_summary_pages()
    compat.install_checkpoint_filter()
    _registered = True
