"""Shape checks of the kernels' entry points, shared with their torch twins (reference.py).

The method's knobs are checked once, where their DashParams is built (params.py); the entry
points check only what a call brings: tensor ranks, shapes, dtypes and the block size. No
triton and no vLLM import here.
"""
from __future__ import annotations

import math

import torch

from .params import DashParams, is_number, summary_dim

__all__ = ["check_call", "check_block_size", "check_heads", "check_summary", "check_write",
           "check_select", "check_output", "check_decode"]


def check_call(params: DashParams, block_size: int, scale=None) -> None:
    """What every entry point checks besides shapes: a DashParams (valid by construction),
    a power-of-two block size and the softmax scale (a model fact, not a knob)."""
    if not isinstance(params, DashParams):
        raise TypeError(f"params must be a DashParams, got {type(params).__name__}")
    check_block_size(block_size)
    if scale is not None and (not is_number(scale) or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be None or a finite number > 0, got {scale!r}")


def check_block_size(block_size) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1 \
            or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a positive power of two, got {block_size!r}")


def check_heads(num_q_heads: int, num_kv_heads: int) -> int:
    """G = Hq / Hk, the GQA group size."""
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"q: the number of query heads ({num_q_heads}) must be a multiple of the number "
            f"of KV heads ({num_kv_heads})")
    return num_q_heads // num_kv_heads


def check_summary(summary, pool, num_kv_heads: int, head_size: int, *,
                  need_pool: bool = True) -> int:
    """The summary kind and its pooling vectors; returns the summary's last dim Ds.

    ``pool`` (DashAttention's per-layer ``indexer_q`` as [Hk, D]) belongs to "attn_pool" only:
    required there (unless ``need_pool`` is False: the caller brings ready summaries), an
    error with any other kind (a pool silently ignored would hide a configuration mistake).
    """
    ds = summary_dim(summary, head_size)          # ValueError naming summary and the kinds
    if pool is None:
        if summary == "attn_pool" and need_pool:
            raise ValueError("summary='attn_pool' needs pool: the fp32 [Hk, D] pooling "
                             f"vectors of this layer ([{num_kv_heads}, {head_size}]), got None")
        return ds
    if summary != "attn_pool":
        raise ValueError(f"pool is only used with summary='attn_pool', got summary={summary!r} "
                         f"and a pool {tuple(pool.shape)}: pass pool=None")
    if not isinstance(pool, torch.Tensor) or pool.dtype != torch.float32 or \
            tuple(pool.shape) != (num_kv_heads, head_size):
        got = (f"{pool.dtype} {tuple(pool.shape)}" if isinstance(pool, torch.Tensor)
               else type(pool).__name__)
        raise ValueError(f"pool must be fp32 [Hk={num_kv_heads}, D={head_size}], got {got}")
    return ds


def check_write(key, value, key_cache, value_cache, summaries, slot_mapping,
                summary: str = "mean", pool=None) -> None:
    """Shapes of the cache write (:func:`summaries.write_kv_and_summaries` and its twin)."""
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"key and value must both be [T, Hk, D], got key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(f"key_cache and value_cache must both be [num_blocks, B, Hk, D], got "
                         f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    nb, B, Hk, D = key_cache.shape
    if key.shape[1:] != (Hk, D):
        raise ValueError(f"key {tuple(key.shape)} does not match the cache's heads/dim "
                         f"({Hk}, {D})")
    if B < 1 or B & (B - 1):
        raise ValueError(f"block size must be a power of two, got {B}")
    ds = check_summary(summary, pool, Hk, D)
    if summaries.dtype != torch.float32 or summaries.dim() != 3 or \
            summaries.shape[1:] != (Hk, ds) or summaries.shape[0] < nb:
        raise ValueError(f"summaries must be fp32 [num_blocks>={nb}, {Hk}, {ds}] for "
                         f"summary={summary!r}, got {summaries.dtype} "
                         f"{tuple(summaries.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0] or \
            slot_mapping.dtype.is_floating_point:
        raise ValueError(f"slot_mapping must be an integer tensor [T={key.shape[0]}], got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")


def check_select(q, summaries, block_table, seq_lens, summary: str = "mean"):
    """Shapes of stage 1's inputs (:func:`select.select_blocks_paged` and its twin);
    returns (S, Hq, D, Hk, G, max_blocks_per_seq)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [num_seqs, Hq, D], got {tuple(q.shape)}")
    S, Hq, D = q.shape
    ds = summary_dim(summary, D)
    if summaries.dim() != 3 or summaries.dtype != torch.float32 or summaries.shape[2] != ds:
        raise ValueError(f"summaries must be fp32 [num_blocks, Hk, {ds}] for "
                         f"summary={summary!r} (D={D}), got {summaries.dtype} "
                         f"{tuple(summaries.shape)}")
    Hk = summaries.shape[1]
    G = check_heads(Hq, Hk)
    if block_table.dim() != 2 or block_table.shape[0] < S or block_table.dtype.is_floating_point:
        raise ValueError(f"block_table must be an integer tensor [>={S}, max_blocks], got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] < S or seq_lens.dtype.is_floating_point:
        raise ValueError(f"seq_lens must be an integer tensor [>={S}], got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)}")
    return S, Hq, D, Hk, G, block_table.shape[1]


def check_output(name, t, dtype, S, Hk, nmax) -> None:
    """A preallocated output of stage 1: [>=S, Hk] (nmax None) or [>=S, Hk, >=nmax]."""
    if t.dtype != dtype or t.dim() < 2 or t.shape[0] < S or t.shape[1] != Hk or \
            (nmax is not None and (t.dim() != 3 or t.shape[2] < nmax)) or \
            (nmax is None and t.dim() != 2):
        want = f"[>={S}, {Hk}" + (f", >={nmax}]" if nmax is not None else "]")
        raise ValueError(f"{name} must be {dtype} {want}, got {t.dtype} {tuple(t.shape)}")


def check_decode(q, key_cache, value_cache, block_ids, log_prior, counts, seq_lens, out,
                 block_size):
    """Shapes of stage 2's inputs (:func:`decode.sparse_decode` and its twin);
    returns (S, Hq, D, B, Hk)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [num_seqs, Hq, D], got {tuple(q.shape)}")
    S, Hq, D = q.shape
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(f"key_cache/value_cache must be 4-D [num_blocks, B, Hk, D] views of "
                         f"the same shape, got {tuple(key_cache.shape)} and "
                         f"{tuple(value_cache.shape)}")
    _, B, Hk, Dk = key_cache.shape
    if B != block_size:
        raise ValueError(f"block_size ({block_size}) does not match the cache's block "
                         f"dimension ({B})")
    if Dk != D:
        raise ValueError(f"head size of q ({D}) and of the cache ({Dk}) differ")
    if Hk < 1 or Hq % Hk:
        raise ValueError(f"number of query heads ({Hq}) must be a multiple of the number of "
                         f"KV heads ({Hk})")
    if block_ids.dim() != 3 or block_ids.shape[0] < S or block_ids.shape[1] != Hk:
        raise ValueError(f"block_ids must be [S_cap >= {S}, Hk={Hk}, max_blocks], got "
                         f"{tuple(block_ids.shape)}")
    if log_prior.shape != block_ids.shape:
        raise ValueError(f"log_prior shape {tuple(log_prior.shape)} must equal block_ids "
                         f"shape {tuple(block_ids.shape)}")
    if counts.dim() != 2 or counts.shape[0] < S or counts.shape[1] != Hk:
        raise ValueError(f"counts must be [S_cap >= {S}, Hk={Hk}], got {tuple(counts.shape)}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] < S:
        raise ValueError(f"seq_lens must be [>= {S}], got {tuple(seq_lens.shape)}")
    if out.shape != q.shape:
        raise ValueError(f"out shape {tuple(out.shape)} must equal q shape {tuple(q.shape)}")
    if block_ids.dtype not in (torch.int32, torch.int64) or \
            counts.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_ids and counts must be int32 (or int64) tensors")
    return S, Hq, D, B, Hk
