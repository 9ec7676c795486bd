"""Every block selected: the dense selection that benchmarks time kernels/decode.py's
sparse_decode over (the "dash-dense" rows of bench_kernels.py, the tests' dense
cross-checks). Not part of the serving path: there the selection kernel lists every block
itself for sequences below dense_below (kernels/select.py).

Import rule: benchmarks/common.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fill_dense_selection"]


@triton.jit
def _fill_dense_kernel(
    bt_ptr, len_ptr, ids_ptr, lp_ptr, cnt_ptr,
    stride_bts, stride_btc,
    stride_is, stride_ih, stride_ic,
    stride_ls, stride_lh, stride_lc,
    stride_cs, stride_ch,
    ncols, Hk,
    B: tl.constexpr, BLOCK: tl.constexpr,
):
    s = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK
    c = c0 + tl.arange(0, BLOCK)
    seq_len = tl.load(len_ptr + s).to(tl.int32)
    n = (seq_len + B - 1) // B
    ok = c < ncols
    row = tl.load(bt_ptr + s.to(tl.int64) * stride_bts + c * stride_btc, mask=ok & (c < n),
                  other=0)
    for h in range(0, Hk):
        tl.store(ids_ptr + s.to(tl.int64) * stride_is + h * stride_ih + c * stride_ic,
                 row.to(ids_ptr.dtype.element_ty), mask=ok)
        tl.store(lp_ptr + s.to(tl.int64) * stride_ls + h * stride_lh + c * stride_lc,
                 tl.zeros([BLOCK], tl.float32).to(lp_ptr.dtype.element_ty), mask=ok)
        if c0 == 0:
            tl.store(cnt_ptr + s * stride_cs + h * stride_ch, n.to(cnt_ptr.dtype.element_ty))


def fill_dense_selection(*, block_table: torch.Tensor, seq_lens: torch.Tensor,
                         num_kv_heads: int, block_size: int, out_block_ids: torch.Tensor,
                         out_log_prior: torch.Tensor, out_counts: torch.Tensor) -> None:
    """Dense path: every block of each sequence selected, log prior 0, for every KV head.

    block_table [S, max_blocks] physical ids; seq_lens [S]. Writes rows ``[:S]`` of
    out_block_ids/out_log_prior [S_cap, Hk, M] (columns ``min(M, max_blocks)``, entries past a
    sequence's ``ceil(seq_len / B)`` blocks are written as 0 and ignored) and out_counts
    [S_cap, Hk] = ceil(seq_len / B). One small Triton kernel; no host sync.
    """
    S = block_table.shape[0]
    if S == 0:
        return
    Hk = int(num_kv_heads)
    if out_block_ids.dim() != 3 or out_block_ids.shape[0] < S or out_block_ids.shape[1] != Hk \
            or out_log_prior.shape != out_block_ids.shape or out_counts.dim() != 2 \
            or out_counts.shape[0] < S or out_counts.shape[1] != Hk:
        raise ValueError(
            f"fill_dense_selection: outputs must be [S_cap >= {S}, Hk={Hk}, M] (ids, log "
            f"prior) and [S_cap, Hk] (counts), got {tuple(out_block_ids.shape)}, "
            f"{tuple(out_log_prior.shape)}, {tuple(out_counts.shape)}")
    ncols = min(out_block_ids.shape[2], block_table.shape[1])
    BLOCK = min(1024, max(16, triton.next_power_of_2(max(ncols, 1))))
    _fill_dense_kernel[(S, triton.cdiv(ncols, BLOCK))](
        block_table, seq_lens, out_block_ids, out_log_prior, out_counts,
        *block_table.stride(), *out_block_ids.stride(), *out_log_prior.stride(),
        *out_counts.stride(), ncols, Hk, B=block_size, BLOCK=BLOCK,
    )
