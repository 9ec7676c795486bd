"""Fused paged K/V cache write + block summary update (DESIGN.md §4.1), one kernel launch.

``write_kv_and_summaries`` stores this step's keys and values into vLLM's paged cache and
makes the summary of every block it touched equal to the mean of the keys in the block's
slots ``[0, fill)``, ``fill`` = (largest offset written to the block this step) + 1. The
summary is the fp32 mean of the keys *as stored in the cache* (rounded to the cache dtype),
i.e. exactly what :func:`reference.block_summaries_paged` computes from the cache.

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
    slots ``[0, fill)`` that this and later steps wrote).
Padding slots (-1) are skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["write_kv_and_summaries", "write_kv_and_summaries_torch"]


@triton.jit
def _write_kv_and_summaries_kernel(
    key_ptr, value_ptr, kc_ptr, vc_ptr, sum_ptr, slot_ptr,
    num_tokens,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_sb, stride_sh, stride_sd,
    BLOCK_SIZE: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
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
            mean = tl.sum(k_old + k_new, axis=0) / fill.to(tl.float32)
            tl.store(sum_ptr + blk * stride_sb + h * stride_sh + d * stride_sd, mean, mask=dmask)


def _check(key, value, key_cache, value_cache, summaries, slot_mapping):
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
    if summaries.dtype != torch.float32 or summaries.dim() != 3 or \
            summaries.shape[1:] != (Hk, D) or summaries.shape[0] < nb:
        raise ValueError(f"summaries must be fp32 [num_blocks>={nb}, {Hk}, {D}], got "
                         f"{summaries.dtype} {tuple(summaries.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0] or \
            slot_mapping.dtype.is_floating_point:
        raise ValueError(f"slot_mapping must be an integer tensor [T={key.shape[0]}], got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")


def write_kv_and_summaries(*, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, summaries: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
    """Write this step's K/V into the paged cache and update the touched blocks' summaries.

    key, value     [T, Hk, D] (any float dtype; converted to the cache dtype)
    key_cache,     [num_blocks, B, Hk, D] indexed through strides (vLLM's NHD layout, or a
    value_cache    head-major [num_blocks, Hk, B, D] cache passed as ``.transpose(1, 2)``)
    summaries      fp32 [num_blocks, Hk, D], by physical block id (updated in place)
    slot_mapping   int [T]: slot = block * B + offset, -1 = padding (skipped). Tokens of one
                   block must be contiguous and increasing within the step (vLLM's layout).

    One launch, grid (T, Hk); no host sync, no allocation (CUDA-graph capturable).
    """
    _check(key, value, key_cache, value_cache, summaries, slot_mapping)
    T = key.shape[0]
    if T == 0:
        return
    nb, B, Hk, D = key_cache.shape
    _write_kv_and_summaries_kernel[(T, Hk)](
        key, value, key_cache, value_cache, summaries, slot_mapping,
        T,
        *key.stride(), *value.stride(),
        *key_cache.stride(), *value_cache.stride(),
        *summaries.stride(),
        BLOCK_SIZE=B, D=D, D_P2=triton.next_power_of_2(D),
        num_warps=4 if B * D >= 4096 else 2,
    )


def write_kv_and_summaries_torch(*, key: torch.Tensor, value: torch.Tensor,
                                 key_cache: torch.Tensor, value_cache: torch.Tensor,
                                 summaries: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Readable torch twin of :func:`write_kv_and_summaries` (same arguments and effect):
    write K/V, then set each touched block's summary to the mean of its slots [0, fill)."""
    _check(key, value, key_cache, value_cache, summaries, slot_mapping)
    B = key_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    if slots.numel() == 0:
        return
    blocks, offsets = slots // B, slots % B
    key_cache[blocks, offsets] = key[keep].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[keep].to(value_cache.dtype)
    touched = torch.unique(blocks)
    fill = torch.zeros(key_cache.shape[0], dtype=torch.long, device=key.device)
    fill.scatter_reduce_(0, blocks, offsets + 1, reduce="amax")
    fill = fill[touched]                                           # [n_touched]
    present = torch.arange(B, device=key.device)[None, :] < fill[:, None]
    sums = (key_cache[touched].float() * present[:, :, None, None]).sum(1)
    summaries[touched] = sums / fill.float()[:, None, None]
