"""Fused paged K/V cache write + block summary update (docs/design.md §4.1), one kernel launch.

``write_kv_and_summaries`` stores this step's keys and values into vLLM's paged cache and
makes the summary of every block it touched equal to the summary of the keys in the block's
slots ``[0, fill)``, ``fill`` = (largest offset written to the block this step) + 1. The
summary kind (a constexpr: one compiled kernel per kind, one launch per step) is "mean",
"minmax" (per-channel min, then max: 2D floats) or "attn_pool" (the keys pooled with
softmax_t(pool[h] . k_t / sqrt(D)) over the slots [0, fill)); see reference_summaries.py.
Every kind is computed in fp32 from the keys *as stored in the cache* (rounded to the cache
dtype), i.e. exactly what :func:`reference.block_summaries_paged` computes from the cache.
Each kind is a function of the whole slot range [0, fill), recomputed from it (never an
incremental update of the old summary), so the argument below holds for all three alike.

Race freedom inside one launch. Grid (token, KV head). Every program writes its own token's
K/V slot. The program that owns the LAST token a block receives in this step (its next
token is not the next slot of the same block) recomputes the block's summary from
  * slots ``[0, first)`` read from the cache: written in EARLIER steps, so no program of
    this launch writes them (``first`` = first offset of this step's run in the block);
  * slots ``[first, fill)`` read from ``key`` (this step's new tokens), not from the cache,
    so it never depends on another program's store in the same launch.
The run of this step's tokens in the block is found from ``slot_mapping`` alone: tokens of
one block are contiguous and increasing within a step (vLLM's layout), so the run is the
longest backward stretch ``t-j`` with ``slot[t-j] == slot[t] - j`` (at most the offset + 1).

Why this is right under
  * prefix caching: a full block shared with another sequence is never in ``slot_mapping``
    (it is read, not written), so neither its K/V nor its summary is touched;
  * block reuse: a freed block handed to another sequence is written from offset 0, so
    ``first == 0`` and the summary is computed from this step's keys only; old content in
    slots ``>= fill`` is never read (and a later step appends from ``fill`` on, reading
    slots ``[0, fill)`` that this and later steps wrote);
  * every kind: slots ``>= fill`` are never loaded (masked loads), and minmax / attn_pool
    mask them out of the reductions (+-inf, a -inf logit), so stale content of any value
    never reaches a summary. ``pool`` is read only (a per-layer constant).
Padding slots (-1) are skipped.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import check_write
from .params import SUMMARY_KINDS

__all__ = ["write_kv_and_summaries"]


@triton.jit
def _store_summary(kb, valid, fill, pool_ptr, stride_ph, stride_pd, out_ptr, stride_sd, h, d,
                   dmask, inv_sqrt_d, D: tl.constexpr, KIND: tl.constexpr):
    """The summary of one block's keys ``kb`` fp32 [BLOCK_SIZE, D_P2] (zero outside the
    ``valid`` slots [0, fill) and past D), stored at ``out_ptr``: KIND 0 mean, 1 minmax
    (min at [0, D), max at [D, 2D)), 2 attn_pool (softmax of pool[h] . k / sqrt(D))."""
    if KIND == 0:
        mean = tl.sum(kb, axis=0) / fill.to(tl.float32)
        tl.store(out_ptr + d * stride_sd, mean, mask=dmask)
    elif KIND == 1:
        mn = tl.min(tl.where(valid[:, None], kb, float("inf")), axis=0)
        mx = tl.max(tl.where(valid[:, None], kb, float("-inf")), axis=0)
        tl.store(out_ptr + d * stride_sd, mn, mask=dmask)
        tl.store(out_ptr + (D + d) * stride_sd, mx, mask=dmask)
    else:
        w = tl.load(pool_ptr + h * stride_ph + d * stride_pd, mask=dmask, other=0.0)
        logit = tl.sum(kb * w[None, :], axis=1) * inv_sqrt_d           # [BLOCK_SIZE]
        logit = tl.where(valid, logit, float("-inf"))
        e = tl.where(valid, tl.exp(logit - tl.max(logit, axis=0)), 0.0)
        pooled = tl.sum(kb * e[:, None], axis=0) / tl.sum(e, axis=0)
        tl.store(out_ptr + d * stride_sd, pooled, mask=dmask)


_KIND = {kind: i for i, kind in enumerate(SUMMARY_KINDS)}     # mean 0, minmax 1, attn_pool 2


@triton.jit
def _write_kv_and_summaries_kernel(
    key_ptr, value_ptr, kc_ptr, vc_ptr, sum_ptr, slot_ptr, pool_ptr,
    num_tokens, inv_sqrt_d,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_sb, stride_sh, stride_sd, stride_ph, stride_pd,
    BLOCK_SIZE: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, KIND: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        d = tl.arange(0, D_P2)
        dmask = d < D
        cache_ty = kc_ptr.dtype.element_ty

        # 1. this token's K/V -> its cache slot (converted to the cache dtype)
        k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d * stride_kd, mask=dmask)
        v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d * stride_vd, mask=dmask)
        tl.store(kc_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d * stride_kcd,
                 k.to(cache_ty), mask=dmask)
        tl.store(vc_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d * stride_vcd,
                 v.to(vc_ptr.dtype.element_ty), mask=dmask)

        # 2. does this token end its block's run in this step?
        nxt = tl.load(slot_ptr + t + 1, mask=t + 1 < num_tokens, other=-1).to(tl.int64)
        owner = (off == BLOCK_SIZE - 1) | (nxt != slot + 1)
        if owner:
            # first offset of this step's run: j = 0..off walks back over the run
            j = tl.arange(0, BLOCK_SIZE)
            prev = tl.load(slot_ptr + t - j, mask=(j <= off) & (t - j >= 0), other=-1)
            broken = (prev.to(tl.int64) != slot - j) | (j > off)
            run = tl.min(tl.where(broken, j, BLOCK_SIZE), axis=0)  # tokens t-run+1 .. t
            first = off + 1 - run
            fill = off + 1
            o = tl.arange(0, BLOCK_SIZE)
            old = o < first
            new = (o >= first) & (o < fill)
            k_old = tl.load(kc_ptr + blk * stride_kcb + o[:, None] * stride_kcs + h * stride_kch
                            + d[None, :] * stride_kcd, mask=old[:, None] & dmask[None, :],
                            other=0.0).to(tl.float32)
            src = t - off + o          # token index holding offset o of this step's run
            k_new = tl.load(key_ptr + src[:, None] * stride_kt + h * stride_kh
                            + d[None, :] * stride_kd, mask=new[:, None] & dmask[None, :],
                            other=0.0)
            k_new = k_new.to(cache_ty).to(tl.float32)   # the value the cache holds
            _store_summary(k_old + k_new, o < fill, fill, pool_ptr, stride_ph, stride_pd,
                           sum_ptr + blk * stride_sb + h * stride_sh, stride_sd, h, d, dmask,
                           inv_sqrt_d, D, KIND)


def write_kv_and_summaries(*, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, summaries: torch.Tensor,
                           slot_mapping: torch.Tensor, summary: str = "mean",
                           pool: Optional[torch.Tensor] = None) -> None:
    """Write this step's K/V into the paged cache and update the touched blocks' summaries.

    key, value     [T, Hk, D] (any float dtype; converted to the cache dtype)
    key_cache,     [num_blocks, B, Hk, D] indexed through strides (vLLM's NHD layout, or a
    value_cache    head-major [num_blocks, Hk, B, D] cache passed as ``.transpose(1, 2)``)
    summaries      fp32 [num_blocks, Hk, Ds], by physical block id (updated in place);
                   Ds = params.summary_dim(summary, D)
    slot_mapping   int [T]: slot = block * B + offset, -1 = padding (skipped). Tokens of one
                   block must be contiguous and increasing within the step (vLLM's layout).
    summary        "mean" | "minmax" | "attn_pool" (params.SUMMARY_KINDS; module docstring)
    pool           fp32 [Hk, D]: the layer's pooling vectors, "attn_pool" only (required)

    One launch, grid (T, Hk); no host sync, no allocation (CUDA-graph capturable).
    """
    check_write(key, value, key_cache, value_cache, summaries, slot_mapping, summary, pool)
    T = key.shape[0]
    if T == 0:
        return
    nb, B, Hk, D = key_cache.shape
    pool_t = summaries if pool is None else pool        # never read unless attn_pool
    _write_kv_and_summaries_kernel[(T, Hk)](
        key, value, key_cache, value_cache, summaries, slot_mapping, pool_t,
        T, 1.0 / math.sqrt(D),
        *key.stride(), *value.stride(),
        *key_cache.stride(), *value_cache.stride(),
        *summaries.stride(), pool_t.stride(0), pool_t.stride(1),
        BLOCK_SIZE=B, D=D, D_P2=triton.next_power_of_2(D), KIND=_KIND[summary],
        num_warps=4 if B * D >= 4096 else 2,
    )
