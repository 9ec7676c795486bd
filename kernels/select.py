"""Stage 1 of DASH on vLLM's paged layout (docs/design.md §3.3, §4.2), three launches.

``select_blocks_paged`` computes, per (sequence, KV head), the blocks stage 2 reads, as a
compacted list of PHYSICAL block ids in ascending LOGICAL order (so the current, partial
block is the entry at ``count - 1``), the log-prior ``log(pi_c)`` of each listed block and
the count. The semantics are exactly :func:`reference.select_blocks` (the spec); the torch
twin :func:`reference.select_blocks_paged` runs the reference and converts its ``Selection``
into the same compacted format.

Kernels: three launches (K1, K2, K3b; four with K3a when a row does not fit registers)
with fixed grids from the capacities (num_seqs, Hq, Hk, max_blocks_per_seq), no host sync,
no allocation when a :class:`SelectWorkspace` is passed (CUDA-graph capturable). Sequences
of length <= 0 give count 0; sequences shorter than ``dense_below`` skip K1-K3a and K3b
lists every block with log-prior 0.

  K1 scores (kernels/scores.py), grid (S, Hk, P), P <= ceil(n_max / CHUNK) programs per
     pair looping over chunks: the block scores u of the summary kind (mean / attn_pool:
     scale * q_h . kbar_c; minmax: Quest's bound) for the G heads of the KV head over CHUNK
     blocks at a time with ``tl.dot`` (fp32 inputs, "tf32x3" precision), stored to the
     workspace [S, Hq, n_max].
  K2 threshold, grid (S, Hq), one program per query head, its row in registers when the
     capacity fits ``_RESIDENT_MAX`` blocks, else passes over tiles in global memory (L1/L2);
     the bodies and their arguments are in kernels/entmax.py: z (score_scale * u, or
     standardized) written back in place, the head's entmax probabilities p_h and its
     min_blocks floor flags (the k = min(min_blocks, n) largest z, ties to the lowest id).
  K3a group: pbar = mean over the group of p_h (summed head by head), the forced / floor
     (any head) / selected flags and, for the cap, the group-mean z. When the row fits
     registers K3b computes them itself (one launch fewer: in a CUDA-graph decode step
     every launch costs ~1-2 us even when its programs exit at once, which is what the
     dense_below regime pays); otherwise a launch with grid (S, Hk, ceil(n_max / CHUNK))
     writes them to the workspace per (sequence, KV head) for K3b's tiled passes.
  K3b cap + compaction, grid (S, Hk) (the row in registers when it fits, else tiles):
     max pbar; the max_blocks cap: forced blocks always stay (the argument check guarantees
     room); the other selected blocks are ranked by (pbar, group-mean z, -block id) — the
     same order as the reference's two stable sorts — and the top ``max_blocks - #forced``
     are kept, found by two exact k-th largest searches (pbar, then group score among the
     pbar ties; kernels/entmax.py) and a prefix count for the last ties (only when the cap
     binds); then the compaction in ascending logical order (prefix sums) with the log
     priors and counts.

Performance: the previous single-launch version (every pass a serial loop over global
scratch) took 125 us for 32/8 heads B=64 1 x 128K on an H200; this one: see
benchmarks/bench_select.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference as ref
from .checks import check_call, check_heads, check_output, check_select
from .entmax import (ENTMAX_ITERS, _cap_keep, _kth_largest, _kth_largest_tiled, _skey,
                     _threshold_resident, _threshold_tiled)
from .params import DashParams
from .scores import SCORE_CHUNK, _active, launch_scores

__all__ = ["ENTMAX_ITERS", "SelectWorkspace", "select_blocks_paged"]

_BISECT_STEPS = 32          # exact k-th largest over the 2^32 int32 keys
#: Rows of up to this many blocks (capacity, rounded up to a power of two) stay in
#: registers in K2 / K3b; longer rows use the tiled passes (tiles of _FALLBACK_TILE).
_RESIDENT_MAX = 8192
_FALLBACK_TILE = 2048
_RADIX_BITS = 4            # bits per round of the register-resident k-th largest
_TINY = float(torch.finfo(torch.float32).tiny)


# ---- kernel helpers --------------------------------------------------------------------
@triton.jit
def _emit(c, cm, fl, keep, pbar, pnorm, pos0, bt_row, stride_btb, ids_row, stride_ib, lp_row,
          stride_lb, PRIOR_MAX: tl.constexpr, TINY: tl.constexpr):
    """Append the kept blocks of one tile at positions pos0, pos0 + 1, ... (prefix sums):
    physical id and log prior (0 for forced / floor blocks; pbar / pnorm with PRIOR_MAX).
    Returns the next position."""
    if PRIOR_MAX:
        prior = pbar / pnorm
    else:
        prior = pbar
    logp = tl.where((fl & 6) != 0, 0.0, tl.log(tl.maximum(tl.where(keep, prior, 1.0), TINY)))
    kint = keep.to(tl.int32)
    pos = pos0 + tl.cumsum(kint, 0) - 1
    pid = tl.load(bt_row + c * stride_btb, mask=cm, other=0)
    tl.store(ids_row + pos * stride_ib, pid.to(tl.int32), mask=keep)
    tl.store(lp_row + pos * stride_lb, logp, mask=keep)
    return pos0 + tl.sum(kint, 0)


# ---- K2: per query head z, entmax threshold, p, floor flags; grid (S, Hq) --------------
@triton.jit
def _threshold_kernel(
    u_ptr, p_ptr, fl_ptr, lens_ptr,
    stride_us, stride_uh, stride_ps, stride_ph, stride_fs, stride_fh,
    score_scale, am1, r, block_size, min_blocks, dense_below,
    N_ITER: tl.constexpr, POW_MODE: tl.constexpr, STANDARDIZE: tl.constexpr,
    HAS_MIN: tl.constexpr, RESIDENT: tl.constexpr, BLOCK: tl.constexpr,
    BISECT: tl.constexpr, RADIX: tl.constexpr, STD_EPS: tl.constexpr,
    TINY: tl.constexpr, ENTMAX: tl.constexpr,
):
    s = tl.program_id(0)
    h = tl.program_id(1)
    n, active = _active(lens_ptr, s, block_size, dense_below)
    if active:
        nf = n.to(tl.float32)
        urow = u_ptr + s.to(tl.int64) * stride_us + h * stride_uh    # u, then z in place
        prow = p_ptr + s.to(tl.int64) * stride_ps + h * stride_ph
        frow = fl_ptr + s.to(tl.int64) * stride_fs + h * stride_fh
        hi = -tl.exp2(-am1 * tl.log2(nf))          # right end of the bracket: f(hi) <= 0
        kf = tl.minimum(min_blocks, n)
        if RESIDENT:
            _threshold_resident(urow, prow, frow, n, nf, kf, hi, score_scale, am1, r, N_ITER,
                                POW_MODE, STANDARDIZE, HAS_MIN, BLOCK, RADIX, STD_EPS, TINY,
                                ENTMAX)
        else:
            _threshold_tiled(urow, prow, frow, n, nf, kf, hi, score_scale, am1, r, N_ITER,
                             POW_MODE, STANDARDIZE, HAS_MIN, BLOCK, BISECT, STD_EPS, TINY,
                             ENTMAX)


# ---- K3a: per KV head pbar, flags, group score; grid (S, Hk, chunks) -------------------
@triton.jit
def _group_values(z_ptr, p_ptr, f_ptr, s64, kvh, stride_zs, stride_zh, stride_ps, stride_ph,
                  stride_fs, stride_fh, c, cm, n, sink_blocks, local_blocks,
                  G: tl.constexpr, HAS_MIN: tl.constexpr, HAS_CAP: tl.constexpr):
    """For blocks ``c`` of one (sequence, KV head): pbar (mean of the G heads' p, summed
    head by head in order), flags (1 selected, 2 forced, 4 floor of any head) and, with a
    cap, the group-mean z, from the workspace rows of the group's heads."""
    z_row = z_ptr + s64 * stride_zs + kvh * G * stride_zh
    p_row = p_ptr + s64 * stride_ps + kvh * G * stride_ph
    f_row = f_ptr + s64 * stride_fs + kvh * G * stride_fh
    pbar = tl.zeros(c.shape, tl.float32)
    gs = tl.zeros(c.shape, tl.float32)
    floor = c < 0
    for g in tl.static_range(G):
        pbar += tl.load(p_row + g * stride_ph + c, mask=cm, other=0.0)
        if HAS_MIN:
            floor = floor | (tl.load(f_row + g * stride_fh + c, mask=cm, other=0) != 0)
        if HAS_CAP:
            gs += tl.load(z_row + g * stride_zh + c, mask=cm, other=0.0)
    pbar = pbar / G
    gs = gs / G
    forced = cm & ((c == n - 1) | (c < sink_blocks) | (c >= n - local_blocks))
    floor = cm & floor
    sel = cm & ((pbar > 0.0) | forced | floor)
    flags = sel.to(tl.int32) + 2 * forced.to(tl.int32) + 4 * floor.to(tl.int32)
    return pbar, flags, gs


@triton.jit
def _group_kernel(
    z_ptr, p_ptr, fl_ptr, lens_ptr, gw_ptr,
    stride_zs, stride_zh, stride_ps, stride_ph, stride_fs, stride_fh,
    stride_gs, stride_gh, stride_gr,
    block_size, sink_blocks, local_blocks, dense_below,
    G: tl.constexpr, CHUNK: tl.constexpr, HAS_MIN: tl.constexpr, HAS_CAP: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    start = tl.program_id(2) * CHUNK
    n, active = _active(lens_ptr, s, block_size, dense_below)
    if active & (start < n):
        c = start + tl.arange(0, CHUNK)
        cm = c < n
        s64 = s.to(tl.int64)
        pbar, flags, gs = _group_values(z_ptr, p_ptr, fl_ptr, s64, kvh, stride_zs, stride_zh,
                                        stride_ps, stride_ph, stride_fs, stride_fh, c, cm, n,
                                        sink_blocks, local_blocks, G, HAS_MIN, HAS_CAP)
        gw = gw_ptr + s64 * stride_gs + kvh * stride_gh
        tl.store(gw + c, pbar, mask=cm)
        tl.store(gw + stride_gr + c, flags.to(tl.float32), mask=cm)
        if HAS_CAP:
            tl.store(gw + 2 * stride_gr + c, gs, mask=cm)


# ---- K3b: cap and compaction; grid (S, Hk) ---------------------------------------------
@triton.jit
def _compact_resident(z_ptr, p_ptr, fl_ptr, s64, kvh, stride_zs, stride_zh, stride_ps,
                      stride_ph, stride_fs, stride_fh, n, max_blocks, sink_blocks,
                      local_blocks, bt_row, stride_btb, ids_row, stride_ib, lp_row, stride_lb,
                      BLOCK: tl.constexpr, PRIOR_MAX: tl.constexpr, HAS_CAP: tl.constexpr,
                      RADIX: tl.constexpr, TINY: tl.constexpr, G: tl.constexpr,
                      HAS_MIN: tl.constexpr):
    """K3b with the row in registers: K3a's group values computed here (no group launch),
    the cap by two radix selects. Returns the count."""
    c = tl.arange(0, BLOCK)
    cm = c < n
    pbar, fl, gsc = _group_values(z_ptr, p_ptr, fl_ptr, s64, kvh, stride_zs, stride_zh,
                                  stride_ps, stride_ph, stride_fs, stride_fh, c, cm, n,
                                  sink_blocks, local_blocks, G, HAS_MIN, HAS_CAP)
    sel = cm & ((fl & 1) != 0)
    forced = (fl & 2) != 0
    keep = sel
    if HAS_CAP:
        cand = sel & (~forced)
        n_cand = tl.sum(cand.to(tl.int32), 0)
        ke = tl.minimum(tl.maximum(max_blocks - tl.sum(forced.to(tl.int32), 0), 0), n_cand)
        if ke < n_cand:     # else every candidate is kept
            kp = _skey(pbar)
            kg = _skey(gsc)
            # level 1: the ke-th largest pbar key among the candidates; level 2: among
            # its ties, the (ke - c1)-th largest group score
            k1, c1 = _kth_largest(kp, cand, ke, RADIX)
            need1 = ke - c1
            k2, c2 = _kth_largest(kg, cand & (kp == k1), need1, RADIX)
            keep, carry = _cap_keep(sel, forced, kp, kg, k1, k2, need1 - c2, 1, 0)
    pnorm = tl.maximum(tl.max(pbar, 0), TINY)
    return _emit(c, cm, fl, keep, pbar, pnorm, 0, bt_row, stride_btb, ids_row, stride_ib,
                 lp_row, stride_lb, PRIOR_MAX, TINY)


@triton.jit
def _compact_tiled(gw_p, stride_gr, n, max_blocks, bt_row, stride_btb, ids_row, stride_ib,
                   lp_row, stride_lb, BLOCK: tl.constexpr, PRIOR_MAX: tl.constexpr,
                   HAS_CAP: tl.constexpr, BISECT: tl.constexpr, TINY: tl.constexpr):
    """K3b as passes over tiles of K3a's group values (pbar at ``gw_p``, then the flags and
    the group score ``stride_gr`` apart): max pbar and the cap's counts, two bisections
    when the cap binds, then the compaction. Returns the count."""
    gw_f = gw_p + stride_gr                                 # flags: 1 sel, 2 forced, 4 floor
    gw_g = gw_p + 2 * stride_gr                             # group-mean z (cap only)
    pmax_t = tl.zeros([BLOCK], tl.float32)
    nf_t = tl.zeros([BLOCK], tl.int32)
    nc_t = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        c = start + tl.arange(0, BLOCK)
        cm = c < n
        fl = tl.load(gw_f + c, mask=cm, other=0.0).to(tl.int32)
        pmax_t = tl.maximum(pmax_t, tl.load(gw_p + c, mask=cm, other=0.0))
        nf_t += ((fl & 2) != 0).to(tl.int32)
        nc_t += ((fl & 3) == 1).to(tl.int32)
    k1 = tl.full([], -2147483648, tl.int32)
    k2 = tl.full([], -2147483648, tl.int32)
    need2 = tl.full([], 0, tl.int32)
    capped = tl.full([], 0, tl.int32)
    if HAS_CAP:
        n_cand = tl.sum(nc_t, 0)
        ke = tl.minimum(tl.maximum(max_blocks - tl.sum(nf_t, 0), 0), n_cand)
        if ke < n_cand:
            capped = tl.full([], 1, tl.int32)
            k1, c1 = _kth_largest_tiled(gw_p, gw_f, gw_p, 0, n, ke, BLOCK, BISECT, True, False)
            need1 = ke - c1
            k2, c2 = _kth_largest_tiled(gw_g, gw_f, gw_p, k1, n, need1, BLOCK, BISECT, True, True)
            need2 = need1 - c2
    pos0 = tl.full([], 0, tl.int32)
    tie_carry = tl.full([], 0, tl.int32)
    pnorm = tl.maximum(tl.max(pmax_t, 0), TINY)
    for start in range(0, n, BLOCK):
        c = start + tl.arange(0, BLOCK)
        cm = c < n
        fl = tl.load(gw_f + c, mask=cm, other=0.0).to(tl.int32)
        pbar = tl.load(gw_p + c, mask=cm, other=0.0)
        keep = cm & ((fl & 1) != 0)
        if HAS_CAP:
            kg = _skey(tl.load(gw_g + c, mask=cm, other=0.0))
            keep, tie_carry = _cap_keep(keep, (fl & 2) != 0, _skey(pbar), kg, k1, k2, need2,
                                        capped, tie_carry)
        pos0 = _emit(c, cm, fl, keep, pbar, pnorm, pos0, bt_row, stride_btb, ids_row,
                     stride_ib, lp_row, stride_lb, PRIOR_MAX, TINY)
    return pos0


@triton.jit
def _store_count(cnt_ptr, cnt2_ptr, s, kvh, stride_cs, stride_ch, stride_c2s, stride_c2h, count,
                 COPY_COUNTS: tl.constexpr):
    tl.store(cnt_ptr + s * stride_cs + kvh * stride_ch, count)
    if COPY_COUNTS:             # the backend's statistics buffer
        tl.store(cnt2_ptr + s * stride_c2s + kvh * stride_c2h, count)


@triton.jit
def _compact_kernel(
    bt_ptr, lens_ptr, ids_ptr, lp_ptr, cnt_ptr, cnt2_ptr, gw_ptr, z_ptr, p_ptr, fl_ptr,
    stride_bts, stride_btb, stride_is, stride_ih, stride_ib, stride_ls, stride_lh, stride_lb,
    stride_cs, stride_ch, stride_c2s, stride_c2h, stride_gs, stride_gh, stride_gr,
    stride_zs, stride_zh, stride_ps, stride_ph, stride_fs, stride_fh,
    block_size, max_blocks, dense_below, sink_blocks, local_blocks,
    RESIDENT: tl.constexpr, BLOCK: tl.constexpr, PRIOR_MAX: tl.constexpr,
    HAS_CAP: tl.constexpr, BISECT: tl.constexpr, RADIX: tl.constexpr, TINY: tl.constexpr,
    G: tl.constexpr, HAS_MIN: tl.constexpr, COPY_COUNTS: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    n, active = _active(lens_ptr, s, block_size, dense_below)
    s64 = s.to(tl.int64)
    bt_row = bt_ptr + s64 * stride_bts
    ids_row = ids_ptr + s64 * stride_is + kvh * stride_ih
    lp_row = lp_ptr + s64 * stride_ls + kvh * stride_lh
    if active == 0:
        # dense (or empty): every block of the sequence, flat prior
        for start in range(0, n, BLOCK):
            c = start + tl.arange(0, BLOCK)
            cm = c < n
            pid = tl.load(bt_row + c * stride_btb, mask=cm, other=0)
            tl.store(ids_row + c * stride_ib, pid.to(tl.int32), mask=cm)
            tl.store(lp_row + c * stride_lb, tl.zeros([BLOCK], tl.float32), mask=cm)
        _store_count(cnt_ptr, cnt2_ptr, s, kvh, stride_cs, stride_ch, stride_c2s, stride_c2h, n,
                     COPY_COUNTS)
    elif RESIDENT:
        count = _compact_resident(z_ptr, p_ptr, fl_ptr, s64, kvh, stride_zs, stride_zh,
                                  stride_ps, stride_ph, stride_fs, stride_fh, n, max_blocks,
                                  sink_blocks, local_blocks, bt_row, stride_btb, ids_row,
                                  stride_ib, lp_row, stride_lb, BLOCK, PRIOR_MAX, HAS_CAP,
                                  RADIX, TINY, G, HAS_MIN)
        _store_count(cnt_ptr, cnt2_ptr, s, kvh, stride_cs, stride_ch, stride_c2s, stride_c2h,
                     count, COPY_COUNTS)
    else:
        count = _compact_tiled(gw_ptr + s64 * stride_gs + kvh * stride_gh, stride_gr, n,
                               max_blocks, bt_row, stride_btb, ids_row, stride_ib, lp_row,
                               stride_lb, BLOCK, PRIOR_MAX, HAS_CAP, BISECT, TINY)
        _store_count(cnt_ptr, cnt2_ptr, s, kvh, stride_cs, stride_ch, stride_c2s, stride_c2h,
                     count, COPY_COUNTS)


# ---- host side -------------------------------------------------------------------------
class SelectWorkspace:
    """Scratch memory of :func:`select_blocks_paged`, sized once from capacities.

    ``scores`` fp32 [max_num_seqs, Hq, n]: per (sequence, query head) the block scores u,
    then z in place; ``probs`` fp32 [max_num_seqs, Hq, n]: the head's entmax probabilities;
    ``floor`` int8 [max_num_seqs, Hq, n]: the head's min_blocks floor flags; ``group`` fp32
    [max_num_seqs, Hk, 3, n]: per (sequence, KV head) pbar, flags and the group-mean score
    (n = max_blocks_per_seq). Allocate it once (before CUDA-graph capture) and pass it to
    every call: the call then allocates nothing.
    """

    def __init__(self, max_num_seqs: int, num_q_heads: int, num_kv_heads: int,
                 max_blocks_per_seq: int, device=None):
        check_heads(num_q_heads, num_kv_heads)
        self.max_num_seqs = int(max_num_seqs)
        self.num_q_heads = int(num_q_heads)
        self.num_kv_heads = int(num_kv_heads)
        self.max_blocks_per_seq = int(max_blocks_per_seq)
        S, n = self.max_num_seqs, max(self.max_blocks_per_seq, 1)
        self.scores = torch.empty(S, num_q_heads, n, dtype=torch.float32, device=device)
        self.probs = torch.empty(S, num_q_heads, n, dtype=torch.float32, device=device)
        self.floor = torch.empty(S, num_q_heads, n, dtype=torch.int8, device=device)
        self.group = torch.empty(S, num_kv_heads, 3, n, dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.scores, self.probs, self.floor, self.group))

    def fits(self, num_seqs: int, num_q_heads: int, num_kv_heads: int,
             max_blocks_per_seq: int) -> bool:
        return (num_seqs <= self.max_num_seqs and num_q_heads == self.num_q_heads
                and num_kv_heads == self.num_kv_heads
                and max_blocks_per_seq <= self.max_blocks_per_seq)


def _launch_plan(nmax: int, G: int, tile: Optional[int]):
    """Launch geometry from shapes only (fixed under CUDA graphs): ``(resident, row_block,
    chunk1, chunk3, row_warps)``: whether K2 / K3b keep a row in registers, their tile (the
    whole row when resident), K1's and K3a's chunks of blocks, K2 / K3b's warps."""
    n_p2 = max(16, triton.next_power_of_2(max(nmax, 1)))
    resident = tile is None and n_p2 <= _RESIDENT_MAX
    if resident:
        row_block = n_p2                       # the whole row in registers
    else:
        row_block = tile if tile is not None else min(n_p2, _FALLBACK_TILE)
    chunk1 = min(SCORE_CHUNK, n_p2) if tile is None else min(SCORE_CHUNK, tile)
    G_P2 = max(2, triton.next_power_of_2(G))
    chunk3 = max(16, min(n_p2, 2048 // G_P2)) if tile is None else tile
    return resident, row_block, chunk1, chunk3, min(16, max(4, row_block // 512))


def _pow_mode(alpha: float) -> int:
    if alpha == 1.5:
        return 2
    if alpha == 2.0:
        return 1
    return 0


def select_blocks_paged(*, q: torch.Tensor, summaries: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, out_block_ids: torch.Tensor,
                        out_log_prior: torch.Tensor, out_counts: torch.Tensor,
                        params: DashParams, block_size: int, scale: Optional[float] = None,
                        workspace: Optional[SelectWorkspace] = None,
                        n_iter: int = ENTMAX_ITERS, tile: Optional[int] = None,
                        out_counts_copy: Optional[torch.Tensor] = None) -> None:
    """Stage 1 on the paged layout: fill the preallocated compacted selection outputs.

    q              [S, Hq, D] fp16/bf16/fp32 decode queries (one per sequence)
    summaries      fp32 [num_blocks, Hk, Ds] block summaries of kind ``params.summary`` by
                   physical block id (Ds = params.summary_dim(params.summary, D))
    block_table    int [S, max_blocks_per_seq] physical block ids (entries past a
                   sequence's blocks are never read)
    seq_lens       int [S] context lengths (the query's own token included); a length <= 0
                   gives count 0 (padding rows of a captured batch)
    out_block_ids  int32 [>=S, Hk, >=max_blocks_per_seq]: selected physical ids, ascending
                   logical order (the current block last)
    out_log_prior  fp32 same shape: log(pi_c) of each listed block (0 for forced / floor
                   blocks and dense sequences)
    out_counts     int32 [>=S, Hk]
    out_counts_copy  optional int32 [>=S, Hk]: a second destination of the counts, written by
                   the same kernel (the backend's statistics buffer: no extra copy launch)
    Entries past a row's count are left as they were. ``params`` (validated when built) and
    ``scale``: as :func:`reference.select_blocks`. ``workspace``: a :class:`SelectWorkspace`
    that fits (otherwise one is allocated for this call). Three launches with fixed grids
    (four when the row does not fit registers), no host sync.
    ``n_iter``: Newton passes of the entmax threshold. ``tile``: None (default) keeps a
    row in registers when ``max_blocks_per_seq <= 8192`` and otherwise loops over tiles;
    an int (a power of two >= 16) forces the tiled loops with that many blocks per tile
    (tests use small tiles to exercise the carries between tiles).
    """
    check_call(params, block_size, scale)
    S, Hq, D, Hk, G, nmax = check_select(q, summaries, block_table, seq_lens, params.summary)
    check_output("out_block_ids", out_block_ids, torch.int32, S, Hk, nmax)
    check_output("out_log_prior", out_log_prior, torch.float32, S, Hk, nmax)
    check_output("out_counts", out_counts, torch.int32, S, Hk, None)
    if out_counts_copy is not None:
        check_output("out_counts_copy", out_counts_copy, torch.int32, S, Hk, None)
    if not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
    if tile is not None and (not isinstance(tile, int) or tile < 16 or tile & (tile - 1)):
        raise ValueError(f"tile must be None or a power of two >= 16, got {tile!r}")
    if workspace is None:
        workspace = SelectWorkspace(S, Hq, Hk, nmax, device=q.device)
    elif not workspace.fits(S, Hq, Hk, nmax):
        raise ValueError(
            f"workspace (max_num_seqs={workspace.max_num_seqs}, Hq={workspace.num_q_heads}, "
            f"Hk={workspace.num_kv_heads}, max_blocks_per_seq={workspace.max_blocks_per_seq}) "
            f"does not fit num_seqs={S}, Hq={Hq}, Hk={Hk}, max_blocks_per_seq={nmax}")
    if S == 0:
        return
    resident, row_block, chunk1, chunk3, row_warps = _launch_plan(nmax, G, tile)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    alpha, dense_below = float(params.alpha), params.dense_below
    has_min, has_cap = params.min_blocks > 0, params.max_blocks is not None
    u, p, fl, gw = workspace.scores, workspace.probs, workspace.floor, workspace.group
    launch_scores(q, summaries, block_table, seq_lens, u, scale=scale, block_size=block_size,
                  dense_below=dense_below, chunk=chunk1, minmax=params.summary == "minmax")
    _threshold_kernel[(S, Hq)](
        u, p, fl, seq_lens,
        u.stride(0), u.stride(1), p.stride(0), p.stride(1), fl.stride(0), fl.stride(1),
        float(params.score_scale), alpha - 1.0, 1.0 / (alpha - 1.0), block_size,
        params.min_blocks, dense_below,
        N_ITER=n_iter, POW_MODE=_pow_mode(alpha),
        STANDARDIZE=params.score_norm == "standardize", HAS_MIN=has_min, RESIDENT=resident,
        BLOCK=row_block, BISECT=_BISECT_STEPS, RADIX=_RADIX_BITS, STD_EPS=ref.STD_EPS,
        TINY=_TINY, ENTMAX=params.selector == "entmax", num_warps=row_warps,
    )
    if not resident:
        _group_kernel[(S, Hk, triton.cdiv(nmax, chunk3))](
            u, p, fl, seq_lens, gw,
            u.stride(0), u.stride(1), p.stride(0), p.stride(1), fl.stride(0), fl.stride(1),
            *gw.stride()[:3],
            block_size, params.sink_blocks, params.local_blocks, dense_below,
            G=G, CHUNK=chunk3, HAS_MIN=has_min, HAS_CAP=has_cap, num_warps=4,
        )
    c2 = out_counts if out_counts_copy is None else out_counts_copy
    _compact_kernel[(S, Hk)](
        block_table, seq_lens, out_block_ids, out_log_prior, out_counts, c2, gw, u, p, fl,
        *block_table.stride(), *out_block_ids.stride(), *out_log_prior.stride(),
        *out_counts.stride(), *c2.stride(), *gw.stride()[:3],
        u.stride(0), u.stride(1), p.stride(0), p.stride(1), fl.stride(0), fl.stride(1),
        block_size, params.max_blocks if has_cap else 0, dense_below, params.sink_blocks,
        params.local_blocks,
        RESIDENT=resident, BLOCK=row_block, PRIOR_MAX=params.prior_norm == "max",
        HAS_CAP=has_cap, BISECT=_BISECT_STEPS, RADIX=_RADIX_BITS, TINY=_TINY, G=G,
        HAS_MIN=has_min, COPY_COUNTS=out_counts_copy is not None, num_warps=row_warps,
    )
