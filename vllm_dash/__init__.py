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
    """vLLM plugin entry point (idempotent).

    The attention backend itself is not wired in yet (it comes with the vLLM backend
    work); until then registering changes nothing in vLLM.
    """
    global _registered
    if _registered:
        return
    _registered = True
