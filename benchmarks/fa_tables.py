"""Compacted page tables for the second stage-2 path: an external paged-decode kernel
(vLLM's FlashAttention-3 `flash_attn_varlen_func` with `block_table` / `seqused_k`) run over
the selected blocks of every (sequence, KV head) (docs/design.md §4.4).

With a head-major cache [num_blocks, Hk, B, D] for K and for V, the view
[num_blocks * Hk, B, 1, D] makes (block b, KV head h) the page b * Hk + h. Every
(sequence, KV head) then becomes one "sequence" of G query heads and one KV head whose table
lists only its selected pages, in ascending logical order with the current (partial) block
last, and seqused_k = (count - 1) * B + fill of the current block. That path cannot add the
log-prior: it is exact for prior_weight = 0 only.

Pure torch ops writing into preallocated outputs (no host sync, CUDA-graph capturable);
no vLLM import here: the benchmark (bench_kernels.py, fa3-sparse rows) passes the kernel in.
Benchmark code, not part of the serving path. Import rule: benchmarks/common.py.
"""
from __future__ import annotations

import torch

__all__ = ["head_major_page_view", "compact_head_major_tables", "head_major_decode_torch",
           "queries_as_groups", "groups_as_queries"]


def head_major_page_view(cache_hnd: torch.Tensor) -> torch.Tensor:
    """[num_blocks, Hk, B, D] (contiguous) -> [num_blocks * Hk, B, 1, D] page view."""
    nb, hk, b, d = cache_hnd.shape
    if not cache_hnd.is_contiguous():
        raise ValueError("cache_hnd must be a contiguous head-major [num_blocks, Hk, B, D] tensor")
    return cache_hnd.view(nb * hk, b, 1, d)


def compact_head_major_tables(*, block_ids: torch.Tensor, counts: torch.Tensor,
                              seq_lens: torch.Tensor, block_size: int,
                              out_block_table: torch.Tensor, out_seqused_k: torch.Tensor) -> None:
    """Fill the per-(sequence, KV head) page tables from a compacted selection.

    block_ids int32 [S_cap, Hk, M] (physical ids, ascending logical order, current block at
    index count-1), counts int32 [S_cap, Hk], seq_lens int32 [S]; writes
    out_block_table int32 [S * Hk, M] (rows (s, h) -> s * Hk + h; page = id * Hk + h; entries
    past the count are set to page 0 and never read) and
    out_seqused_k int32 [S * Hk].
    """
    S = seq_lens.shape[0]
    hk, m = block_ids.shape[1], block_ids.shape[2]
    ids = block_ids[:S]
    heads = torch.arange(hk, device=ids.device, dtype=ids.dtype).view(1, hk, 1)
    valid = (torch.arange(m, device=ids.device, dtype=counts.dtype).view(1, 1, m)
             < counts[:S, :, None])
    table = out_block_table[: S * hk].view(S, hk, m)
    torch.mul(ids, hk, out=table)
    table.add_(heads)
    table.mul_(valid)                       # entries past the count -> page 0 (never read)
    fill = seq_lens.to(counts.dtype) - (seq_lens.to(counts.dtype) - 1) // block_size * block_size
    used = out_seqused_k[: S * hk].view(S, hk)
    torch.sub(counts[:S], 1, out=used)
    used.mul_(block_size).add_(fill[:, None])


def queries_as_groups(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[S, Hq, D] -> [S * Hk, G, D] (a view: query head h = kv * G + g)."""
    s, hq, d = q.shape
    return q.view(s * num_kv_heads, hq // num_kv_heads, d)


def groups_as_queries(o: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """[S * Hk, G, D] -> [S, Hq, D] (a view)."""
    return o.view(num_seqs, -1, o.shape[-1])


def head_major_decode_torch(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                            block_table: torch.Tensor, seqused_k: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Readable twin of the external kernel's contract on these tables: every row r of
    q_groups [R, G, D] attends, with plain softmax, to the first seqused_k[r] tokens of its
    pages (pages listed in block_table[r], B tokens each). Returns [R, G, D] fp32."""
    R, G, D = q.shape
    B = k_pages.shape[1]
    out = torch.empty(R, G, D, dtype=torch.float32, device=q.device)
    for r in range(R):
        n = int(seqused_k[r])
        pages = block_table[r, : -(-n // B)].long()
        k = k_pages[pages, :, 0].reshape(-1, D)[:n].float()
        v = v_pages[pages, :, 0].reshape(-1, D)[:n].float()
        a = torch.softmax(scale * q[r].float() @ k.T, dim=-1)
        out[r] = a @ v
    return out
