"""Block summaries in plain torch: what each summary kind holds and how stage 1 scores it.

Part of the reference (the spec in code, re-exported by :mod:`reference`); the fused cache
write kernel (summaries.py) and the scores kernel (scores.py) are tested against it.

A block's summary is a pure function of the keys in its written slots ``[0, fill)`` (as the
cache holds them, fp32 math), per KV head ``h``:
  "mean"       kbar = mean_t k_t                                    [D]
  "minmax"     (min_t k_t, max_t k_t) per channel, concatenated     [2D]   (Quest)
  "attn_pool"  kbar = sum_t softmax_t(pool_h . k_t / sqrt(D)) k_t   [D]
               with the layer's learned pooling vectors ``pool`` fp32 [Hk, D]
               (DashAttention's ``indexer_q``; autograd flows to ``pool``).
Stage-1 score of a block for query head ``q_h`` (before score_norm / score_scale):
  mean, attn_pool   u = scale * q_h . kbar
  minmax            u = scale * sum_d max(q_d min_d, q_d max_d): the largest logit any key
                    inside the block's per-channel box can reach, so u >= scale * q . k_t
                    for every key of the block (an upper bound of its best logit).
A block with no written slot has the zero summary.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .checks import check_block_size, check_summary, check_write

__all__ = ["summarize_blocks", "summary_scores", "block_summaries", "block_summaries_paged",
           "write_kv_and_summaries"]


def _seq_lens_tensor(seq_lens, num_seqs: int, max_len: int, device) -> torch.Tensor:
    if seq_lens is None:
        return torch.full((num_seqs,), max_len, dtype=torch.long, device=device)
    lens = torch.as_tensor(seq_lens, device=device).to(torch.long).reshape(-1)
    if lens.numel() != num_seqs:
        raise ValueError(f"seq_lens must have one entry per sequence ({num_seqs}), "
                         f"got {lens.numel()}")
    if num_seqs and (int(lens.min()) < 1 or int(lens.max()) > max_len):
        raise ValueError(f"seq_lens must be in [1, {max_len}], got {lens.tolist()}")
    return lens


def _num_blocks(lens: torch.Tensor, block_size: int) -> torch.Tensor:
    return (lens + block_size - 1) // block_size


def summarize_blocks(keys: torch.Tensor, present: torch.Tensor, *, summary: str = "mean",
                     pool: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The summaries of a batch of blocks.

    keys [..., B, Hk, D] (any float dtype, math in fp32; absent slots may hold anything,
    NaN included), present bool [..., B] (the written slots) -> fp32 [..., Hk, Ds].
    Differentiable in ``pool`` (no NaN reaches the graph, also for empty blocks).
    """
    Hk, D = keys.shape[-2], keys.shape[-1]
    check_summary(summary, pool, Hk, D)
    m = present[..., None, None]
    kz = torch.where(m, keys.float(), 0.0)
    count = present.sum(-1)                                          # [...]
    if summary == "mean":
        return kz.sum(-3) / count.clamp_min(1).float()[..., None, None]
    if summary == "minmax":
        inf = torch.tensor(float("inf"), device=keys.device)
        mn = torch.where(m, kz, inf).amin(-3)
        mx = torch.where(m, kz, -inf).amax(-3)
        out = torch.cat([mn, mx], dim=-1)
        return torch.where((count == 0)[..., None, None], 0.0, out)
    logits = torch.einsum("...bhd,hd->...bh", kz, pool) / math.sqrt(D)     # [..., B, Hk]
    keep = present | (count == 0)[..., None]        # empty block: uniform over zero keys
    w = torch.softmax(logits.masked_fill(~keep[..., None], float("-inf")), dim=-2)
    return torch.einsum("...bh,...bhd->...hd", w, kz)


def summary_scores(q: torch.Tensor, summaries: torch.Tensor, summary: str,
                   scale: float) -> torch.Tensor:
    """u [S, Hq, n] (see the module docstring) for queries q [S, Hq, D] against logical
    summaries [S, Hk, n, Ds] (GQA: query head h reads KV head h // G)."""
    G = q.shape[1] // summaries.shape[1]
    s = summaries.float().repeat_interleave(G, dim=1)                  # [S, Hq, n, Ds]
    qf = q.float()
    if summary != "minmax":
        return scale * torch.einsum("shd,shcd->shc", qf, s)
    D = q.shape[-1]
    lo = qf[:, :, None, :] * s[..., :D]
    hi = qf[:, :, None, :] * s[..., D:]
    return scale * torch.maximum(lo, hi).sum(-1)


def block_summaries(k: torch.Tensor, block_size: int, seq_lens=None, *, summary: str = "mean",
                    pool: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Summaries of every block of a contiguous cache.

    k [num_seqs, Hk, L_max, D] -> fp32 [num_seqs, Hk, n_max, Ds], n_max = ceil(L_max / B);
    blocks past a sequence's end are zero. ``pool`` [Hk, D]: see the module docstring.
    """
    check_block_size(block_size)
    S, Hk, L, D = k.shape
    check_summary(summary, pool, Hk, D)
    lens = _seq_lens_tensor(seq_lens, S, L, k.device)
    n_max = -(-L // block_size)
    pad = n_max * block_size - L
    present = (torch.arange(n_max * block_size, device=k.device)[None, :] < lens[:, None])
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad))
    keys = kp.view(S, Hk, n_max, block_size, D).permute(0, 2, 3, 1, 4)   # [S, n, B, Hk, D]
    out = summarize_blocks(keys, present.view(S, n_max, block_size), summary=summary,
                           pool=pool)                                    # [S, n, Hk, Ds]
    return out.permute(0, 2, 1, 3)


def block_summaries_paged(key_cache: torch.Tensor, block_table: torch.Tensor, seq_lens,
                          num_blocks: Optional[int] = None, *, summary: str = "mean",
                          pool: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Summaries of every block of a paged cache, indexed by physical block id.

    key_cache [num_blocks, B, Hk, D], block_table [num_seqs, max_blocks] -> fp32
    [num_blocks, Hk, Ds]. A block's fill is taken from the sequences that reference it
    (a block shared through prefix caching is full in all of them); blocks no sequence
    references stay zero. A summary is a pure function of the block's contents.
    """
    nb, B, Hk, D = key_cache.shape
    check_summary(summary, pool, Hk, D)
    num_blocks = nb if num_blocks is None else num_blocks
    lens = _seq_lens_tensor(seq_lens, block_table.shape[0], block_table.shape[1] * B,
                            key_cache.device)
    fill = torch.zeros(num_blocks, dtype=torch.long, device=key_cache.device)
    for s in range(block_table.shape[0]):
        n = int(_num_blocks(lens[s], B))
        ids = block_table[s, :n].long()
        f = (lens[s] - torch.arange(n, device=key_cache.device) * B).clamp(max=B)
        fill[ids] = torch.maximum(fill[ids], f)
    present = torch.arange(B, device=key_cache.device)[None, :] < fill[:, None]
    return summarize_blocks(key_cache[:num_blocks], present, summary=summary, pool=pool)


def write_kv_and_summaries(*, key: torch.Tensor, value: torch.Tensor,
                           key_cache: torch.Tensor, value_cache: torch.Tensor,
                           summaries: torch.Tensor, slot_mapping: torch.Tensor,
                           summary: str = "mean", pool: Optional[torch.Tensor] = None) -> None:
    """Twin of :func:`summaries.write_kv_and_summaries` (same arguments and effect): write
    K/V, then set each touched block's summary to the summary of its slots [0, fill),
    fill = the largest offset written to it in this step + 1."""
    check_write(key, value, key_cache, value_cache, summaries, slot_mapping, summary, pool)
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
    present = torch.arange(B, device=key.device)[None, :] < fill[touched][:, None]
    summaries[touched] = summarize_blocks(key_cache[touched], present, summary=summary,
                                          pool=pool)
