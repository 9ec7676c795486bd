"""DASH's KV-cache page layout: facts of the method, the same for every vLLM version.

One vLLM KV page (one block of B tokens of one layer) holds

    K  [Hk, B, D]  then  V  [Hk, B, D]       in the cache dtype (head-major per block)
    kbar [Hk, Ds]                             fp32 block summaries, in the page's padding
                                              (Ds = D, or 2 * D for summary "minmax")

so the KV cache tensor vLLM hands the backend has shape (num_blocks, 2, Hk, B, D) and a
block stride of the PADDED page size (``kv_page_bytes + summary_page_bytes``). vLLM's
memory planner counts the summaries like any other KV byte (compat.py pads the page; how
depends on the vLLM version), and a summary lives in the same physical page as its block:
valid under prefix caching (a shared block is never rewritten), recycled with the block.

The kernels see K and V as [num_blocks, B, Hk, D] strided views (:func:`kv_views`) and the
summaries as fp32 [num_blocks, Hk, Ds] (:func:`summary_view`); the summary kind is an
engine-level setting (it fixes the page size). No vLLM import here.
"""
from __future__ import annotations

import torch

from vllm_dash.kernels.params import summary_dim

__all__ = ["SUMMARY_DTYPE", "DEFAULT_BLOCK_SIZE", "SUPPORTED_BLOCK_SIZES", "HEAD_SIZES",
           "kv_cache_shape", "summary_page_bytes", "kv_views", "summary_view"]

SUMMARY_DTYPE = torch.float32
#: DASH's block size when the user gives none (one summary per 64 tokens).
DEFAULT_BLOCK_SIZE = 64
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 256)


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                   head_size: int) -> tuple:
    """The KV cache's logical shape: (num_blocks, 2 (K, V), Hk, B, D)."""
    return (num_blocks, 2, num_kv_heads, block_size, head_size)


def summary_page_bytes(num_kv_heads: int, head_size: int, summary: str = "mean") -> int:
    """Bytes of one page's block summaries (the padding added to every KV page):
    Hk * Ds fp32 numbers (Ds = 2 * D for "minmax", D otherwise)."""
    return num_kv_heads * summary_dim(summary, head_size) * SUMMARY_DTYPE.itemsize


def kv_views(kv_cache: torch.Tensor):
    """K and V of a (num_blocks, 2, Hk, B, D) cache as [num_blocks, B, Hk, D] views."""
    return kv_cache[:, 0].transpose(1, 2), kv_cache[:, 1].transpose(1, 2)


def summary_view(kv_cache: torch.Tensor, num_kv_heads: int, head_size: int,
                 summary: str = "mean") -> torch.Tensor:
    """fp32 [num_blocks, Hk, Ds] view of the summaries stored in each page's padding
    (Ds = 2 * D for "minmax": min then max; D otherwise).

    ``kv_cache`` is the layer's cache as vLLM hands it to the backend: shape
    (num_blocks, 2, Hk, B, D) in the cache dtype, block stride = padded page size.
    """
    nb, two, hk, b, d = kv_cache.shape
    ds = summary_dim(summary, head_size)
    page = kv_cache.stride(0)
    kv_elems = two * hk * b * d
    ratio = SUMMARY_DTYPE.itemsize // kv_cache.element_size()   # cache elems per fp32
    if page < kv_elems + hk * ds * ratio:
        raise RuntimeError(
            f"the KV cache pages have no room for DASH block summaries ({summary!r}): the DASH "
            "page padding was not applied (is vllm_dash registered in this process?)")
    raw = torch.as_strided(kv_cache, size=(nb, hk, ds * ratio), stride=(page, ds * ratio, 1),
                           storage_offset=kv_cache.storage_offset() + kv_elems)
    return raw.view(SUMMARY_DTYPE) if ratio != 1 else raw
