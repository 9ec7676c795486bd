"""Stage 1 of DASH on vLLM's paged layout (DESIGN.md §3 "Stage 1", §4.2), one launch.

``select_blocks_paged`` computes, per (sequence, KV head), the blocks stage 2 reads, as a
compacted list of PHYSICAL block ids in ascending LOGICAL order (so the current, partial
block is the entry at ``count - 1``), the log-prior ``log(pi_c)`` of each listed block and
the count. The semantics are exactly :func:`reference.select_blocks` (the spec); the torch
twin :func:`select_blocks_paged_torch` runs the reference and converts its ``Selection``
into the same compacted format.

Kernel: grid (num_seqs, Hk), one program per (sequence, KV head), no host sync, no
allocation when a :class:`SelectWorkspace` is passed (CUDA-graph capturable). The program
makes fixed-count passes over its sequence's blocks, tile by tile:

  1. scores u = scale * q_h . kbar_c for the G heads of the group with ``tl.dot`` (the G
     rows padded to 16; fp32 inputs, "tf32x3" precision: three TF32 tensor-core products,
     fp32-level accuracy, measured |dz|/max|z| ~5e-7 on H200), written to the workspace
     (fp32, ``[.., G, n]`` rows);
  2. per-head max and mean (and, for score_norm="standardize", a second pass for the
     population variance); z = score_scale * u or score_scale * (u - mean) / std;
  3. the alpha-entmax threshold tau per head: ``ENTMAX_ITERS`` Newton steps on
     g(tau) = (sum_c [y_c - tau]_+^r)^(1/r) - 1 (r = 1/(alpha-1), y = (alpha-1)(z - max z)),
     started at the left end tau = -1 of the bracket [-1, -(1/n)^(alpha-1)]. g is convex
     and decreasing, so the iterates increase monotonically towards the root and never
     leave the bracket in exact arithmetic (a step past the right end is replaced by
     bisection). Newton on this "r-norm" form is exact in one step for equal scores and
     converges in a handful of steps otherwise (sparsemax, where it is Michelot's
     algorithm, needs the most); the probabilities are renormalised by the last pass's sum;
  4. pbar = mean over the group of p_h (written to the workspace) and max pbar;
  5. min_blocks floor: per head, the k-th largest z (k = min(min_blocks, n)), found exactly
     by a 32-step bisection over the order-preserving int32 image of the fp32 z (each step
     one counting pass), the ties at the threshold taken from the lowest block id by a
     running count;
  6. flags (selected / forced / floor) per block, written to the workspace;
  7. max_blocks cap: forced blocks always stay (the argument check guarantees room); the
     other selected blocks are ranked by (pbar, group-mean z, -block id) — the same order
     as the reference's two stable sorts — and the top ``max_blocks - #forced`` are kept,
     found by two exact 32-step bisections (pbar, then group score among the pbar ties)
     and a running count for the last ties;
  8. compaction in ascending logical order (prefix sum within the tile + carry).
Sequences shorter than ``dense_below`` skip 1–7 and list every block with log-prior 0.

Performance (H200, CUDA-graph replay, D=128, bf16/fp16 q): 32/8 heads B=64: 1 x 128K
125 us (220 us with min_blocks=8 + a binding max_blocks), 1 x 32K 41 us, 8 x 32K 66 us,
32 x 32K with min/max caps 142 us, 32 x 32K B=16 with min_blocks 291 us; 32/2 heads
(G=16): 1 x 128K B=64 with floor + cap 518 us, 4 x 64K B=16 with standardize + floor
1.1 ms. Every pass re-reads the program's [G, n] fp32 scores from the workspace (L1/L2)
tile by tile, one program per (sequence, KV head), so the latency grows with the number of
passes (~25, plus 32 per bisection) times the tiles per pass; the 32-step bisections
(floor; cap only when it binds) dominate at large G * n. Ways to speed it up, not done
yet: keep the scores in registers when G * n is small, split a sequence's blocks over
several programs for the score pass, fewer bisection steps (narrow the key range first).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference as ref

__all__ = [
    "ENTMAX_ITERS",
    "SelectWorkspace",
    "select_blocks_paged",
    "select_blocks_paged_torch",
    "selection_to_compact",
]

#: Fixed number of Newton passes of the kernel's entmax threshold solve (see module doc).
#: In a torch model of the same iteration (fp32, n up to 8192, random / heavy-tailed /
#: linear / geometric / log-spaced scores over 4 decades of scale) the probabilities were
#: within 1e-6 of converged after at most 12 passes (sparsemax), 10 (alpha 1.75),
#: 8 (alpha 1.5), 6 (alpha 1.25): 20 leaves a margin.
ENTMAX_ITERS = 20
_BISECT_STEPS = 32          # exact k-th largest over the 2^32 int32 keys
_TINY = float(torch.finfo(torch.float32).tiny)


# --------------------------------------------------------------------------------------
# kernel helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _ukey(x):
    """Order-preserving map fp32 -> int64 in [0, 2^32) through the int32 bit pattern
    (x not NaN; -0 and +0 map to the same key)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648


@triton.jit
def _pow_r(d, r):
    """d^r and d^(r-1) for d >= 0, general r >= 1 (alpha not 1.5 or 2)."""
    pos = d > 0.0
    lg = tl.log2(tl.where(pos, d, 1.0))
    pw = tl.where(pos, tl.exp2(lg * r), 0.0)
    pw1 = tl.where(pos, tl.exp2(lg * (r - 1.0)), 0.0)
    return pw, pw1


@triton.jit
def _select_kernel(
    q_ptr, summ_ptr, bt_ptr, lens_ptr, ids_ptr, lp_ptr, cnt_ptr, ws_ptr,
    stride_qs, stride_qh, stride_qd,
    stride_sb, stride_sh, stride_sd,
    stride_bts, stride_btb,
    stride_is, stride_ih, stride_ib,
    stride_ls, stride_lh, stride_lb,
    stride_cs, stride_ch,
    stride_ws, stride_wh, stride_wr,
    scale, score_scale, am1, r, block_size,
    sink_blocks, local_blocks, max_blocks, min_blocks, dense_below,
    G: tl.constexpr, G_DOT: tl.constexpr, G_P2: tl.constexpr,
    D: tl.constexpr, D_P2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K1: tl.constexpr,
    N_ITER: tl.constexpr, POW_MODE: tl.constexpr, STANDARDIZE: tl.constexpr,
    PRIOR_MAX: tl.constexpr, HAS_MIN: tl.constexpr, HAS_CAP: tl.constexpr,
    BISECT: tl.constexpr,
    STD_EPS: tl.constexpr, TINY: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    L = tl.maximum(tl.load(lens_ptr + s).to(tl.int32), 0)
    n = (L + block_size - 1) // block_size

    bt_row = bt_ptr + s.to(tl.int64) * stride_bts
    ids_row = ids_ptr + s.to(tl.int64) * stride_is + kvh * stride_ih
    lp_row = lp_ptr + s.to(tl.int64) * stride_ls + kvh * stride_lh
    ws = ws_ptr + s.to(tl.int64) * stride_ws + kvh * stride_wh   # rows [0, G): z per head
    ws_p = ws + G * stride_wr          # pbar
    ws_f = ws + (G + 1) * stride_wr    # flags: 1 selected, 2 forced, 4 floor
    ws_g = ws + (G + 2) * stride_wr    # group-mean z (cap only)

    if (L < dense_below) | (n <= 0):
        # dense (or empty): every block of the sequence, flat prior
        for start in range(0, n, BLOCK_P):
            c = start + tl.arange(0, BLOCK_P)
            cm = c < n
            pid = tl.load(bt_row + c * stride_btb, mask=cm, other=0)
            tl.store(ids_row + c * stride_ib, pid.to(tl.int32), mask=cm)
            tl.store(lp_row + c * stride_lb, tl.zeros([BLOCK_P], tl.float32), mask=cm)
        tl.store(cnt_ptr + s * stride_cs + kvh * stride_ch, n)
    else:
        nf = n.to(tl.float32)
        g = tl.arange(0, G_P2)
        gm = g < G                      # rows >= G: all-zero dummies, never counted
        # ---- 1. scores u = scale * q_h . kbar_c -> workspace ---------------------------
        gd = tl.arange(0, G_DOT)
        d = tl.arange(0, D_P2)
        qv = tl.load(q_ptr + s.to(tl.int64) * stride_qs + (kvh * G + gd)[:, None] * stride_qh
                     + d[None, :] * stride_qd,
                     mask=(gd < G)[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        for start in range(0, n, BLOCK_N):
            c = start + tl.arange(0, BLOCK_N)
            cm = c < n
            pid = tl.load(bt_row + c * stride_btb, mask=cm, other=0).to(tl.int64)
            kT = tl.load(summ_ptr + pid[None, :] * stride_sb + kvh * stride_sh
                         + d[:, None] * stride_sd, mask=cm[None, :] & (d < D)[:, None],
                         other=0.0).to(tl.float32)                       # [D, BLOCK_N]
            u = tl.dot(qv, kT, input_precision=DOT_PRECISION) * scale     # [G_DOT, BLOCK_N]
            tl.store(ws + gd[:, None] * stride_wr + c[None, :], u,
                     mask=(gd < G)[:, None] & cm[None, :])
        tl.debug_barrier()

        # ---- 2. z = score_scale * u, or score_scale * (u - mean) / std ------------------
        mean = tl.zeros([G_P2], tl.float32)
        std = tl.full([G_P2], 1.0, tl.float32)
        if STANDARDIZE:
            acc = tl.zeros([G_P2, BLOCK_P], tl.float32)
            for start in range(0, n, BLOCK_P):
                c = start + tl.arange(0, BLOCK_P)
                m2 = gm[:, None] & (c < n)[None, :]
                acc += tl.load(ws + g[:, None] * stride_wr + c[None, :], mask=m2, other=0.0)
            mean = tl.sum(acc, 1) / nf
            acc = tl.zeros([G_P2, BLOCK_P], tl.float32)
            for start in range(0, n, BLOCK_P):
                c = start + tl.arange(0, BLOCK_P)
                cm = c < n
                u = tl.load(ws + g[:, None] * stride_wr + c[None, :],
                            mask=gm[:, None] & cm[None, :], other=0.0)
                dv = tl.where(cm[None, :], u - mean[:, None], 0.0)
                acc += dv * dv
            std = tl.maximum(tl.sqrt(tl.sum(acc, 1) / nf), STD_EPS)   # population std
        zmax_t = tl.full([G_P2, BLOCK_P], float("-inf"), tl.float32)
        for start in range(0, n, BLOCK_P):
            c = start + tl.arange(0, BLOCK_P)
            cm = c < n
            wp = ws + g[:, None] * stride_wr + c[None, :]
            u = tl.load(wp, mask=gm[:, None] & cm[None, :], other=0.0)
            if STANDARDIZE:
                z = score_scale * (u - mean[:, None]) / std[:, None]
            else:
                z = score_scale * u
            tl.store(wp, z, mask=gm[:, None] & cm[None, :])
            zmax_t = tl.maximum(zmax_t, tl.where(cm[None, :], z, float("-inf")))
        tl.debug_barrier()
        ymax = tl.max(zmax_t, 1) * am1      # y = (alpha-1) z - max, clamped at -2

        # ---- 3. entmax threshold per head: Newton on g(tau) = F(tau)^(1/r) - 1 ----------
        tau = tl.full([G_P2], -1.0, tl.float32)
        hi = -tl.exp2(-am1 * tl.log2(nf))          # right end of the bracket: f(hi) <= 0
        # (tau_ev must not be initialised as `tau_ev = tau`: with Triton 3.6 on the GPU a
        # loop-carried name that aliases another at loop entry keeps its entry value)
        tau_ev = tl.full([G_P2], -1.0, tl.float32)
        F_ev = tl.full([G_P2], 1.0, tl.float32)
        for it in range(N_ITER):
            Fa = tl.zeros([G_P2, BLOCK_P], tl.float32)
            Sa = tl.zeros([G_P2, BLOCK_P], tl.float32)
            for start in range(0, n, BLOCK_P):
                c = start + tl.arange(0, BLOCK_P)
                cm = c < n
                z = tl.load(ws + g[:, None] * stride_wr + c[None, :],
                            mask=gm[:, None] & cm[None, :], other=0.0)
                y = tl.maximum(z * am1 - ymax[:, None], -2.0)
                dd = tl.where(cm[None, :], tl.maximum(y - tau[:, None], 0.0), 0.0)
                if POW_MODE == 2:        # alpha = 1.5: r = 2
                    Fa += dd * dd
                    Sa += dd
                elif POW_MODE == 1:      # alpha = 2 (sparsemax): r = 1
                    Fa += dd
                    Sa += tl.where(dd > 0.0, 1.0, 0.0)
                else:
                    pw, pw1 = _pow_r(dd, r)
                    Fa += pw
                    Sa += pw1
            F, S1 = tl.split(tl.sum(tl.join(Fa, Sa), 1))     # F(tau), sum d^(r-1)
            tau_ev = tau
            F_ev = F
            if POW_MODE == 2:
                Finv = 1.0 / tl.sqrt(F)
            elif POW_MODE == 1:
                Finv = 1.0 / F
            else:
                Finv = tl.exp2(-am1 * tl.log2(F))
            # Newton step on g: -g/g' = F (1 - F^(-1/r)) / sum d^(r-1)
            nxt = tau + F * (1.0 - Finv) / tl.maximum(S1, TINY)
            tau = tl.where(nxt <= hi, tl.maximum(nxt, -1.0), 0.5 * (tau + hi))
        tau = tau_ev                       # the last evaluated point and its sum
        Fz = tl.maximum(F_ev, TINY)

        # ---- 4. pbar = mean_h p_h -> workspace; max pbar ------------------------------
        pmax_t = tl.zeros([BLOCK_P], tl.float32)
        for start in range(0, n, BLOCK_P):
            c = start + tl.arange(0, BLOCK_P)
            cm = c < n
            z = tl.load(ws + g[:, None] * stride_wr + c[None, :],
                        mask=gm[:, None] & cm[None, :], other=0.0)
            y = tl.maximum(z * am1 - ymax[:, None], -2.0)
            dd = tl.where(cm[None, :], tl.maximum(y - tau[:, None], 0.0), 0.0)
            if POW_MODE == 2:
                pw = dd * dd
            elif POW_MODE == 1:
                pw = dd
            else:
                pw, pw1 = _pow_r(dd, r)
            p = tl.where(gm[:, None], pw / Fz[:, None], 0.0)
            pbar = tl.sum(p, 0) / G
            tl.store(ws_p + c, pbar, mask=cm)
            pmax_t = tl.maximum(pmax_t, pbar)
        pmax = tl.max(pmax_t, 0)

        # ---- 5. floor: k-th largest z per head (exact bisection on the int keys) --------
        kf = tl.minimum(min_blocks, n)
        f_thr = tl.zeros([G_P2], tl.int64)
        f_need = tl.zeros([G_P2], tl.int32)
        if HAS_MIN:
            if kf < n:          # else every valid block is in the floor (f_thr = 0)
                # invariant: #{key >= lo} >= kf > #{key >= lo + width} = cnt_hi
                lo = tl.zeros([G_P2], tl.int64)
                cnt_hi = tl.zeros([G_P2], tl.int32)
                width = tl.full([], 1 << 32, tl.int64)
                for it in range(BISECT):
                    width = width // 2
                    mid = lo + width
                    acc_c = tl.zeros([G_P2, BLOCK_P], tl.int32)
                    for start in range(0, n, BLOCK_P):
                        c = start + tl.arange(0, BLOCK_P)
                        cm = c < n
                        z = tl.load(ws + g[:, None] * stride_wr + c[None, :],
                                    mask=gm[:, None] & cm[None, :], other=0.0)
                        acc_c += (cm[None, :] & (_ukey(z) >= mid[:, None])).to(tl.int32)
                    cnt = tl.sum(acc_c, 1)
                    ge = cnt >= kf
                    lo = tl.where(ge, mid, lo)
                    cnt_hi = tl.where(ge, cnt_hi, cnt)
                f_thr = lo                       # key of the k-th largest z
                f_need = kf - cnt_hi             # how many of the ties at f_thr (lowest ids)
        tl.debug_barrier()

        # ---- 6. flags per block -> workspace; counts ----------------------------------
        carry = tl.zeros([G_P2], tl.int32)
        nf_t = tl.zeros([BLOCK_P], tl.int32)
        nc_t = tl.zeros([BLOCK_P], tl.int32)
        for start in range(0, n, BLOCK_P):
            c = start + tl.arange(0, BLOCK_P)
            cm = c < n
            forced = cm & ((c == n - 1) | (c < sink_blocks) | (c >= n - local_blocks))
            pbar = tl.load(ws_p + c, mask=cm, other=0.0)
            floor = c < 0
            if HAS_MIN or HAS_CAP:
                z = tl.load(ws + g[:, None] * stride_wr + c[None, :],
                            mask=gm[:, None] & cm[None, :], other=0.0)
            if HAS_MIN:
                key = _ukey(z)
                vm = gm[:, None] & cm[None, :]
                eq = (vm & (key == f_thr[:, None])).to(tl.int32)
                cum = tl.cumsum(eq, 1) + carry[:, None]
                carry += tl.sum(eq, 1)
                fl = vm & ((key > f_thr[:, None]) | ((eq > 0) & (cum <= f_need[:, None])))
                floor = tl.max(fl.to(tl.int32), 0) > 0
            sel = cm & ((pbar > 0.0) | forced | floor)
            flags = sel.to(tl.int32) + 2 * forced.to(tl.int32) + 4 * floor.to(tl.int32)
            tl.store(ws_f + c, flags.to(tl.float32), mask=cm)
            if HAS_CAP:
                gs = tl.sum(tl.where(gm[:, None], z, 0.0), 0) / G
                tl.store(ws_g + c, gs, mask=cm)
            nf_t += forced.to(tl.int32)
            nc_t += (sel & (~forced)).to(tl.int32)
        tl.debug_barrier()

        # ---- 7. cap: top (max_blocks - #forced) of the others by (pbar, gs, -id) --------
        t1 = tl.full([], 0, tl.int64)
        t2 = tl.full([], 0, tl.int64)
        need2 = tl.full([], 0, tl.int32)
        if HAS_CAP:
            n_forced = tl.sum(nf_t, 0)
            n_cand = tl.sum(nc_t, 0)
            ke = tl.minimum(tl.maximum(max_blocks - n_forced, 0), n_cand)
            if ke < n_cand:     # else every candidate is kept (t1 = 0)
                # level 1: the ke-th largest pbar key among the candidates
                ch1 = tl.full([], 0, tl.int32)
                wk = tl.full([], 1 << 32, tl.int64)
                for it in range(BISECT):
                    wk = wk // 2
                    midk = t1 + wk
                    acck = tl.zeros([BLOCK_K1], tl.int32)
                    for start in range(0, n, BLOCK_K1):
                        ck = start + tl.arange(0, BLOCK_K1)
                        cmk = ck < n
                        flk = tl.load(ws_f + ck, mask=cmk, other=0.0).to(tl.int32)
                        kpk = _ukey(tl.load(ws_p + ck, mask=cmk, other=0.0))
                        acck += (cmk & ((flk & 3) == 1) & (kpk >= midk)).to(tl.int32)
                    cntk = tl.sum(acck, 0)
                    gek = cntk >= ke
                    t1 = tl.where(gek, midk, t1)
                    ch1 = tl.where(gek, ch1, cntk)
                need1 = ke - ch1
                # level 2: among the candidates tied at t1, the need1-th largest group score
                ch2 = tl.full([], 0, tl.int32)
                wk = tl.full([], 1 << 32, tl.int64)
                for it in range(BISECT):
                    wk = wk // 2
                    midk = t2 + wk
                    acck = tl.zeros([BLOCK_K1], tl.int32)
                    for start in range(0, n, BLOCK_K1):
                        ck = start + tl.arange(0, BLOCK_K1)
                        cmk = ck < n
                        flk = tl.load(ws_f + ck, mask=cmk, other=0.0).to(tl.int32)
                        kpk = _ukey(tl.load(ws_p + ck, mask=cmk, other=0.0))
                        kgk = _ukey(tl.load(ws_g + ck, mask=cmk, other=0.0))
                        tiek = cmk & ((flk & 3) == 1) & (kpk == t1)
                        acck += (tiek & (kgk >= midk)).to(tl.int32)
                    cntk = tl.sum(acck, 0)
                    gek = cntk >= need1
                    t2 = tl.where(gek, midk, t2)
                    ch2 = tl.where(gek, ch2, cntk)
                need2 = need1 - ch2

        # ---- 8. compaction in ascending logical order ----------------------------------
        pos0 = tl.full([], 0, tl.int32)
        tie_carry = tl.full([], 0, tl.int32)
        pnorm = tl.maximum(pmax, TINY)
        for start in range(0, n, BLOCK_P):
            c = start + tl.arange(0, BLOCK_P)
            cm = c < n
            fl = tl.load(ws_f + c, mask=cm, other=0.0).to(tl.int32)
            pbar = tl.load(ws_p + c, mask=cm, other=0.0)
            sel = (fl & 1) != 0
            forced = (fl & 2) != 0
            floor = (fl & 4) != 0
            keep = sel & cm
            if HAS_CAP:
                cand = sel & (~forced)
                kp = _ukey(pbar)
                kg = _ukey(tl.load(ws_g + c, mask=cm, other=0.0))
                tie = (cand & (kp == t1) & (kg == t2)).to(tl.int32)
                cum = tl.cumsum(tie, 0) + tie_carry
                tie_carry += tl.sum(tie, 0)
                win = (kp > t1) | ((kp == t1) & ((kg > t2) | ((tie > 0) & (cum <= need2))))
                keep = cm & (forced | (cand & win))
            if PRIOR_MAX:
                prior = pbar / pnorm
            else:
                prior = pbar
            logp = tl.where(forced | floor, 0.0,
                            tl.log(tl.maximum(tl.where(keep, prior, 1.0), TINY)))
            kint = keep.to(tl.int32)
            pos = pos0 + tl.cumsum(kint, 0) - 1
            pid = tl.load(bt_row + c * stride_btb, mask=cm, other=0)
            tl.store(ids_row + pos * stride_ib, pid.to(tl.int32), mask=keep)
            tl.store(lp_row + pos * stride_lb, logp, mask=keep)
            pos0 += tl.sum(kint, 0)
        tl.store(cnt_ptr + s * stride_cs + kvh * stride_ch, pos0)


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------
class SelectWorkspace:
    """Scratch memory of :func:`select_blocks_paged`, sized once from capacities.

    ``scratch`` fp32 [max_num_seqs, Hk, G + 3, max_blocks_per_seq]: per (sequence, KV head)
    the G heads' block scores, then pbar, flags and the group-mean score. Allocate it once
    (before CUDA-graph capture) and pass it to every call: the call then allocates nothing.
    """

    def __init__(self, max_num_seqs: int, num_q_heads: int, num_kv_heads: int,
                 max_blocks_per_seq: int, device=None):
        G = ref._check_heads(num_q_heads, num_kv_heads)
        self.max_num_seqs = int(max_num_seqs)
        self.num_q_heads = int(num_q_heads)
        self.num_kv_heads = int(num_kv_heads)
        self.max_blocks_per_seq = int(max_blocks_per_seq)
        self.scratch = torch.empty(self.max_num_seqs, num_kv_heads, G + 3,
                                   max(self.max_blocks_per_seq, 1), dtype=torch.float32,
                                   device=device)

    @property
    def nbytes(self) -> int:
        return self.scratch.numel() * self.scratch.element_size()

    def fits(self, num_seqs: int, num_q_heads: int, num_kv_heads: int,
             max_blocks_per_seq: int) -> bool:
        return (num_seqs <= self.max_num_seqs and num_q_heads == self.num_q_heads
                and num_kv_heads == self.num_kv_heads
                and max_blocks_per_seq <= self.max_blocks_per_seq)


def _pow_mode(alpha: float) -> int:
    if alpha == 1.5:
        return 2
    if alpha == 2.0:
        return 1
    return 0


def _check_outputs(name, t, dtype, S, Hk, nmax):
    if t.dtype != dtype or t.dim() < 2 or t.shape[0] < S or t.shape[1] != Hk or \
            (nmax is not None and (t.dim() != 3 or t.shape[2] < nmax)) or \
            (nmax is None and t.dim() != 2):
        want = f"[>={S}, {Hk}" + (f", >={nmax}]" if nmax is not None else "]")
        raise ValueError(f"{name} must be {dtype} {want}, got {t.dtype} {tuple(t.shape)}")


def select_blocks_paged(*, q: torch.Tensor, summaries: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, out_block_ids: torch.Tensor,
                        out_log_prior: torch.Tensor, out_counts: torch.Tensor,
                        block_size: int, alpha: float = 1.5, score_scale: float = 1.0,
                        sink_blocks: int = 0, local_blocks: int = 0,
                        max_blocks: Optional[int] = None, min_blocks: int = 0,
                        dense_below: int = 0, score_norm: str = "none",
                        prior_norm: str = "none", scale: Optional[float] = None,
                        workspace: Optional[SelectWorkspace] = None,
                        n_iter: int = ENTMAX_ITERS, tile: Optional[int] = None) -> None:
    """Stage 1 on the paged layout: fill the preallocated compacted selection outputs.

    q              [S, Hq, D] fp16/bf16/fp32 decode queries (one per sequence)
    summaries      fp32 [num_blocks, Hk, D] block summaries by physical block id
    block_table    int [S, max_blocks_per_seq] physical block ids (entries past a
                   sequence's blocks are never read)
    seq_lens       int [S] context lengths (the query's own token included); a length <= 0
                   gives count 0 (padding rows of a captured batch)
    out_block_ids  int32 [>=S, Hk, >=max_blocks_per_seq]: selected physical ids, ascending
                   logical order (the current block last)
    out_log_prior  fp32 same shape: log(pi_c) of each listed block (0 for forced / floor
                   blocks and dense sequences)
    out_counts     int32 [>=S, Hk]
    Entries past a row's count are left as they were. Other arguments: as
    :func:`reference.select_blocks`. ``workspace``: a :class:`SelectWorkspace` that fits
    (otherwise one is allocated for this call). One launch, grid (S, Hk), no host sync.
    ``n_iter``: Newton passes of the entmax threshold. ``tile``: blocks per tile of the
    per-block passes (a power of two >= 16; default from the capacity; tests use small
    tiles to exercise the carries between tiles).
    """
    ref.validate_dash_args(block_size=block_size, alpha=alpha, score_scale=score_scale,
                           sink_blocks=sink_blocks, local_blocks=local_blocks,
                           max_blocks=max_blocks, min_blocks=min_blocks,
                           dense_below=dense_below, score_norm=score_norm,
                           prior_norm=prior_norm, scale=scale)
    if q.dim() != 3:
        raise ValueError(f"q must be [num_seqs, Hq, D], got {tuple(q.shape)}")
    S, Hq, D = q.shape
    if summaries.dim() != 3 or summaries.dtype != torch.float32 or summaries.shape[2] != D:
        raise ValueError(f"summaries must be fp32 [num_blocks, Hk, D={D}], got "
                         f"{summaries.dtype} {tuple(summaries.shape)}")
    Hk = summaries.shape[1]
    G = ref._check_heads(Hq, Hk)
    if block_table.dim() != 2 or block_table.shape[0] < S or block_table.dtype.is_floating_point:
        raise ValueError(f"block_table must be an integer tensor [>={S}, max_blocks], got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] < S or seq_lens.dtype.is_floating_point:
        raise ValueError(f"seq_lens must be an integer tensor [>={S}], got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)}")
    nmax = block_table.shape[1]
    _check_outputs("out_block_ids", out_block_ids, torch.int32, S, Hk, nmax)
    _check_outputs("out_log_prior", out_log_prior, torch.float32, S, Hk, nmax)
    _check_outputs("out_counts", out_counts, torch.int32, S, Hk, None)
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
    alpha = float(alpha)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    G_P2 = max(2, triton.next_power_of_2(G))
    D_P2 = max(16, triton.next_power_of_2(D))
    BLOCK_N = 32            # fewest registers (the dot tile is [D, BLOCK_N] fp32)
    BLOCK_P = max(64, min(triton.next_power_of_2(max(nmax, 1)), 4096 // G_P2))
    BLOCK_K1 = max(64, min(triton.next_power_of_2(max(nmax, 1)), 4096))
    if tile is not None:
        BLOCK_N = min(BLOCK_N, tile)
        BLOCK_P = BLOCK_K1 = tile
    ws = workspace.scratch
    _select_kernel[(S, Hk)](
        q, summaries, block_table, seq_lens, out_block_ids, out_log_prior, out_counts, ws,
        *q.stride(), *summaries.stride(), *block_table.stride(),
        *out_block_ids.stride(), *out_log_prior.stride(), *out_counts.stride(),
        ws.stride(0), ws.stride(1), ws.stride(2),
        scale, float(score_scale), alpha - 1.0, 1.0 / (alpha - 1.0), block_size,
        sink_blocks, local_blocks, 0 if max_blocks is None else max_blocks, min_blocks,
        dense_below,
        G=G, G_DOT=max(16, triton.next_power_of_2(G)), G_P2=G_P2, D=D, D_P2=D_P2,
        BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P, N_ITER=n_iter, POW_MODE=_pow_mode(alpha),
        STANDARDIZE=score_norm == "standardize", PRIOR_MAX=prior_norm == "max",
        HAS_MIN=min_blocks > 0, HAS_CAP=max_blocks is not None, BISECT=_BISECT_STEPS,
        BLOCK_K1=BLOCK_K1,
        STD_EPS=ref.STD_EPS, TINY=_TINY, DOT_PRECISION="tf32x3",
        num_warps=4,
    )


# --------------------------------------------------------------------------------------
# torch twin
# --------------------------------------------------------------------------------------
def selection_to_compact(sel: "ref.Selection", block_table: torch.Tensor):
    """reference.Selection -> the kernel's compacted format.

    Returns ``(block_ids int32 [S, Hk, n_max], log_prior fp32 [S, Hk, n_max],
    counts int32 [S, Hk])``: physical ids of the selected blocks in ascending logical order,
    log(pi) of each, and the count; entries past the count are -1 / 0.
    """
    n_max = sel.selected.shape[-1]
    logical = torch.arange(n_max, device=sel.selected.device).expand_as(sel.selected)
    order = torch.where(sel.selected, logical, n_max + logical).argsort(-1)
    sel_sorted = sel.selected.gather(-1, order)
    phys = block_table[:, :n_max].long()[:, None, :].expand_as(sel.selected).gather(-1, order)
    prior = sel.prior.gather(-1, order)
    ids = torch.where(sel_sorted, phys, torch.full_like(phys, -1)).to(torch.int32)
    logp = torch.where(sel_sorted, prior.clamp_min(_TINY).log(), torch.zeros_like(prior))
    return ids, logp.float(), sel.counts.to(torch.int32)


def select_blocks_paged_torch(*, q: torch.Tensor, summaries: torch.Tensor,
                              block_table: torch.Tensor, seq_lens: torch.Tensor,
                              block_size: int, **kwargs):
    """Readable twin of :func:`select_blocks_paged`: gather the sequences' summaries through
    the block table, run :func:`reference.select_blocks`, compact. Returns
    ``(block_ids, log_prior, counts, selection)`` (see :func:`selection_to_compact`)."""
    S = q.shape[0]
    lens = seq_lens[:S].long()
    n_max = int(((lens.max() + block_size - 1) // block_size).item()) if S else 0
    ids = block_table[:S, :n_max].long().clamp(0, summaries.shape[0] - 1)
    kbar = summaries[ids].permute(0, 2, 1, 3)                  # [S, Hk, n_max, D]
    sel = ref.select_blocks(q, kbar, lens, block_size=block_size, **kwargs)
    bids, logp, counts = selection_to_compact(sel, block_table[:S])
    return bids, logp, counts, sel
