"""Triton helpers of the selection's thresholds (kernels/select.py): the alpha-entmax
threshold of one query head's block scores and exact k-th largest values for the min_blocks
floor and the max_blocks cap; the torch spec is reference.entmax / reference.select_blocks.

alpha-entmax of scores z (1 < alpha <= 2, r = 1 / (alpha - 1) >= 1) is
p_c = [y_c - tau]_+^r with y = (alpha - 1) z - max((alpha - 1) z) and tau the unique value
with sum_c p_c = 1. Every y_c <= 0 and the maximum is 0, so tau lies in the bracket
[-1, hi], hi = -(1/n)^(alpha-1): at tau = -1 the maximum alone contributes 1^r = 1, and at
tau = hi every term is at most (1/n)^((alpha-1) r) = 1/n. A score with y_c <= -1 never
contributes, so y is clipped at -2 (which keeps -inf or huge negative scores finite).

Threshold (:func:`_entmax_threshold`): Newton's method on g(tau) = F(tau)^(1/r) - 1 with
F(tau) = sum_c [y_c - tau]_+^r. F^(1/r) is the r-norm of the vector ([y_c - tau]_+)_c, a
convex, decreasing function of tau; with F'(tau) = -r S1(tau), S1 = sum_c [y_c - tau]_+^(r-1),
the step is tau' = tau + F (1 - F^(-1/r)) / S1 (:func:`_newton_step`). Started at the left
end tau = -1 (g >= 0) the iterates increase monotonically towards the root and never pass
it in exact arithmetic; a step past the right end hi (rounding) is replaced by bisection
towards hi. On this "r-norm" form Newton is exact in one step for equal scores and
converges in a handful of steps otherwise; sparsemax (alpha 2, where the iteration is
Michelot's algorithm) needs the most. At most ``ENTMAX_ITERS`` passes, stopping early when
a step returns its input: the iteration is a deterministic map, so every later pass would
repeat it. The probabilities are normalised by the last pass's F (p = [y - tau]_+^r / F(tau)
at the last evaluated tau), so they sum to 1 up to rounding even before convergence.
alpha 1.5 (r = 2) and alpha 2 (r = 1) use exact powers (``POW_MODE`` 2 and 1); other
alphas use exp2/log2.

k-th largest: the floor and the cap rank fp32 values exactly. :func:`_skey` maps fp32 to
int32 preserving order (through the bit pattern: negative values have their magnitude bits
flipped), so ranking values is ranking integers; the k-th largest key t is found exactly by
a radix select over a row in registers (:func:`_kth_largest`) or a 32-step bisection over
the key range with one pass over a row's tiles per step (:func:`_kth_largest_tiled`). With
c = #{key > t}, the k largest are the keys above t plus the first k - c keys equal to t in
block order (a prefix count carried across tiles: :func:`_floor_flags`, and for the cap's
two-level order (pbar, then group score) :func:`_cap_keep`), which is the order of the
reference's stable sorts (ties to the lowest block id).

K2 bodies (:func:`_threshold_resident`, :func:`_threshold_tiled`; one program per
(sequence, query head), row pointers into the select workspace): z = score_scale * u, or
score_scale * (u - mean) / std (population std floored at reference.STD_EPS), written back
in place; the entmax probabilities (zeros for the top-k selector); with a floor, the flags
of the k = min(min_blocks, n) largest z. The resident body keeps the row in registers (one
load, one store per output); the tiled body makes the same passes over tiles in global
memory (L1/L2) for rows longer than select._RESIDENT_MAX.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["ENTMAX_ITERS"]

#: Fixed number of Newton passes of the kernel's entmax threshold solve (see module doc).
#: In a torch model of the same iteration (fp32, n up to 8192, random / heavy-tailed /
#: linear / geometric / log-spaced scores over 4 decades of scale) the probabilities were
#: within 1e-6 of converged after at most 12 passes (sparsemax), 10 (alpha 1.75),
#: 8 (alpha 1.5), 6 (alpha 1.25): 20 leaves a margin.
ENTMAX_ITERS = 20


@triton.jit
def _skey(x):
    """Order-preserving map fp32 -> int32 through the bit pattern (x not NaN; -0 and +0 map
    to the same key). Signed keys: -inf -> -2^31 + 0x007FFFFF ... +inf -> 0x7F800000."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _pow_r(d, r):
    """d^r and d^(r-1) for d >= 0, general r >= 1 (alpha not 1.5 or 2)."""
    pos = d > 0.0
    lg = tl.log2(tl.where(pos, d, 1.0))
    pw = tl.where(pos, tl.exp2(lg * r), 0.0)
    pw1 = tl.where(pos, tl.exp2(lg * (r - 1.0)), 0.0)
    return pw, pw1


@triton.jit
def _entmax_terms(z, cm, ymax, tau, am1, r, POW_MODE: tl.constexpr):
    """[y - tau]_+^r and [y - tau]_+^(r-1) (0 where ~cm), y = max((alpha-1) z - ymax, -2)."""
    y = tl.maximum(z * am1 - ymax, -2.0)
    dd = tl.where(cm, tl.maximum(y - tau, 0.0), 0.0)
    if POW_MODE == 2:        # alpha = 1.5: r = 2
        pw = dd * dd
        pw1 = dd
    elif POW_MODE == 1:      # alpha = 2 (sparsemax): r = 1
        pw = dd
        pw1 = tl.where(dd > 0.0, 1.0, 0.0)
    else:
        pw, pw1 = _pow_r(dd, r)
    return pw, pw1


@triton.jit
def _newton_step(tau, F, S1, hi, am1, POW_MODE: tl.constexpr, TINY: tl.constexpr):
    """One safeguarded Newton step on g(tau) = F(tau)^(1/r) - 1 (see module doc)."""
    if POW_MODE == 2:
        Finv = 1.0 / tl.sqrt(F)
    elif POW_MODE == 1:
        Finv = 1.0 / F
    else:
        Finv = tl.exp2(-am1 * tl.log2(F))
    nxt = tau + F * (1.0 - Finv) / tl.maximum(S1, TINY)
    return tl.where(nxt <= hi, tl.maximum(nxt, -1.0), 0.5 * (tau + hi))


@triton.jit
def _sum2(a, b):
    """(sum a, sum b) of two 1-D tensors with one reduction."""
    return tl.split(tl.sum(tl.join(a, b), 0))


@triton.jit
def _entmax_threshold(z, cm, zrow, n, ymax, hi, am1, r, N_ITER: tl.constexpr,
                      POW_MODE: tl.constexpr, TINY: tl.constexpr, RESIDENT: tl.constexpr,
                      BLOCK: tl.constexpr):
    """The Newton iteration of the module doc over one row of scores: ``z`` masked by
    ``cm`` in registers (RESIDENT), else the ``n`` values at ``zrow`` in tiles of BLOCK
    (one pass over the tiles per step; ``z``, ``cm`` unused). ``ymax`` = (alpha-1) max z,
    ``hi`` the bracket's right end. Returns (tau, F(tau)) of the last evaluated step."""
    # (no loop-carried name may be initialised as an alias of another, e.g.
    # `tau_ev = tau`: with Triton 3.6 on the GPU it then keeps its entry value)
    tau = tl.full([], -1.0, tl.float32)
    tau_ev = tl.full([], -1.0, tl.float32)
    F_ev = tl.full([], 1.0, tl.float32)
    it = tl.full([], 0, tl.int32)
    moving = tl.full([], 1, tl.int32)
    while (it < N_ITER) & (moving != 0):      # exact early exit: see the module doc
        if RESIDENT:
            pw, pw1 = _entmax_terms(z, cm, ymax, tau, am1, r, POW_MODE)
            F, S1 = _sum2(pw, pw1)
        else:
            Fa = tl.zeros([BLOCK], tl.float32)
            Sa = tl.zeros([BLOCK], tl.float32)
            for start in range(0, n, BLOCK):
                c = start + tl.arange(0, BLOCK)
                ct = c < n
                pw, pw1 = _entmax_terms(tl.load(zrow + c, mask=ct, other=0.0), ct, ymax, tau,
                                        am1, r, POW_MODE)
                Fa += pw
                Sa += pw1
            F, S1 = _sum2(Fa, Sa)
        tau_ev = tau
        F_ev = F
        nxt = _newton_step(tau, F, S1, hi, am1, POW_MODE, TINY)
        moving = (nxt != tau).to(tl.int32)
        tau = nxt
        it += 1
    return tau_ev, F_ev


@triton.jit
def _kth_largest(key, valid, k, RB: tl.constexpr):
    """Exact k-th largest of the int32 ``key`` among ``valid`` (1 <= k <= #valid), by a
    radix select of RB bits per round (32 / RB rounds, each one reduction of 2^RB counts).
    Returns (t, cnt_gt): the key and #{valid & key > t}."""
    NB: tl.constexpr = 1 << RB
    b = tl.arange(0, NB).to(tl.int64)
    # invariant: #{key >= lo} >= k > #{key >= lo + NB * width} = cnt_hi
    lo = tl.full([], -2147483648, tl.int64)
    cnt_hi = tl.full([], 0, tl.int32)
    width = tl.full([], 1 << 32, tl.int64)
    for it in range(32 // RB):
        width = width >> RB
        th = (lo + b * width).to(tl.int32)                             # [NB] ascending
        cnt = tl.sum((valid[:, None] & (key[:, None] >= th[None, :])).to(tl.int32), 0)
        ge = cnt >= k                                                   # a prefix of b
        j = tl.sum(ge.to(tl.int32), 0) - 1
        above = tl.max(tl.where(ge, -1, cnt), 0)                        # cnt[j + 1]
        lo = lo + j.to(tl.int64) * width
        cnt_hi = tl.where(above >= 0, above, cnt_hi)
    return lo.to(tl.int32), cnt_hi


@triton.jit
def _kth_largest_tiled(key_ptr, fl_ptr, tie_ptr, tie_key, n, k, BLOCK: tl.constexpr,
                       BISECT: tl.constexpr, CAND: tl.constexpr, TIE: tl.constexpr):
    """:func:`_kth_largest` for a row of n fp32 values in global memory (keys ``_skey``):
    a BISECT-step bisection over the int32 keys, one pass over the tiles per step. Counted:
    every block, or with CAND only the cap's candidates (flags row ``fl_ptr``: selected, not
    forced) and with TIE only those whose ``tie_ptr`` value has the key ``tie_key``.
    Returns (t, #{counted & key > t}); 1 <= k <= #counted."""
    lo = tl.full([], -2147483648, tl.int64)
    cnt_hi = tl.full([], 0, tl.int32)
    width = tl.full([], 1 << 32, tl.int64)
    for it in range(BISECT):
        width = width // 2
        mid = lo + width
        acc = tl.zeros([BLOCK], tl.int32)
        for start in range(0, n, BLOCK):
            c = start + tl.arange(0, BLOCK)
            cm = c < n
            ok = cm
            if CAND:
                ok = ok & ((tl.load(fl_ptr + c, mask=cm, other=0.0).to(tl.int32) & 3) == 1)
            if TIE:
                ok = ok & (_skey(tl.load(tie_ptr + c, mask=cm, other=0.0)) == tie_key)
            key = _skey(tl.load(key_ptr + c, mask=cm, other=0.0))
            acc += (ok & (key >= mid.to(tl.int32))).to(tl.int32)
        cnt = tl.sum(acc, 0)
        ge = cnt >= k
        lo = tl.where(ge, mid, lo)
        cnt_hi = tl.where(ge, cnt_hi, cnt)
    return lo.to(tl.int32), cnt_hi


@triton.jit
def _floor_flags(key, cm, thr, need, carry, everything):
    """Floor flags (int8) of one tile: keys above the k-th largest key ``thr`` and, of those
    equal to it, the first ``need`` in block order (``carry`` ties in earlier tiles); every
    block when ``everything`` (k >= n). Returns (flags, carry)."""
    eq = cm & (key == thr)
    cum = tl.cumsum(eq.to(tl.int32), 0) + carry
    flo = cm & (everything | (key > thr) | (eq & (cum <= need)))
    return flo.to(tl.int8), carry + tl.sum(eq.to(tl.int32), 0)


@triton.jit
def _cap_keep(sel, forced, kp, kg, k1, k2, need2, capped, carry):
    """The max_blocks cap on one tile: forced blocks stay; a candidate (selected, not forced)
    stays when the cap does not bind (``capped`` 0), when its (pbar, group score) keys
    (kp, kg) rank above the thresholds (k1, k2), or when it ties both and is among the first
    ``need2`` such ties in block order (``carry`` in earlier tiles). Returns (keep, carry)."""
    cand = sel & (~forced)
    tie = (cand & (kp == k1) & (kg == k2)).to(tl.int32)
    cum = tl.cumsum(tie, 0) + carry
    win = (kp > k1) | ((kp == k1) & ((kg > k2) | ((tie > 0) & (cum <= need2))))
    return forced | (cand & ((capped == 0) | win)), carry + tl.sum(tie, 0)


@triton.jit
def _zscore(u, mean, std, score_scale, STANDARDIZE: tl.constexpr):
    """z of scores u: score_scale * u, or standardized with the row's mean and std."""
    if STANDARDIZE:
        z = score_scale * (u - mean) / std
    else:
        z = score_scale * u
    return z


@triton.jit
def _threshold_resident(urow, prow, frow, n, nf, kf, hi, score_scale, am1, r,
                        N_ITER: tl.constexpr, POW_MODE: tl.constexpr,
                        STANDARDIZE: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK: tl.constexpr,
                        RADIX: tl.constexpr, STD_EPS: tl.constexpr, TINY: tl.constexpr,
                        ENTMAX: tl.constexpr):
    """K2 with the head's whole row in registers (one load, one store per output)."""
    c = tl.arange(0, BLOCK)
    cm = c < n
    u = tl.load(urow + c, mask=cm, other=0.0)
    mean = 0.0
    std = 1.0
    if STANDARDIZE:
        mean = tl.sum(u, 0) / nf
        dv = tl.where(cm, u - mean, 0.0)
        std = tl.maximum(tl.sqrt(tl.sum(dv * dv, 0) / nf), STD_EPS)
    z = _zscore(u, mean, std, score_scale, STANDARDIZE)
    tl.store(urow + c, z, mask=cm)
    ymax = tl.max(tl.where(cm, z, float("-inf")), 0) * am1
    if ENTMAX:
        tau, F = _entmax_threshold(z, cm, urow, n, ymax, hi, am1, r, N_ITER, POW_MODE, TINY,
                                   True, BLOCK)
        pw, pw1 = _entmax_terms(z, cm, ymax, tau, am1, r, POW_MODE)
        tl.store(prow + c, pw / tl.maximum(F, TINY), mask=cm)
    else:                                           # top-k: no entmax support
        tl.store(prow + c, tl.zeros([BLOCK], tl.float32), mask=cm)
    if HAS_MIN:
        key = _skey(z)
        flo = cm.to(tl.int8)                 # k >= n: every block
        if kf < n:
            thr, cnt_gt = _kth_largest(key, cm, kf, RADIX)   # kf-th largest key
            # ties at thr taken, lowest ids first
            flo, carry = _floor_flags(key, cm, thr, kf - cnt_gt, 0, False)
        tl.store(frow + c, flo, mask=cm)


@triton.jit
def _threshold_tiled(urow, prow, frow, n, nf, kf, hi, score_scale, am1, r,
                     N_ITER: tl.constexpr, POW_MODE: tl.constexpr, STANDARDIZE: tl.constexpr,
                     HAS_MIN: tl.constexpr, BLOCK: tl.constexpr, BISECT: tl.constexpr,
                     STD_EPS: tl.constexpr, TINY: tl.constexpr, ENTMAX: tl.constexpr):
    """K2 as passes over tiles of the row in global memory (rows too long for registers)."""
    mean = 0.0
    std = 1.0
    if STANDARDIZE:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            c = start + tl.arange(0, BLOCK)
            acc += tl.load(urow + c, mask=c < n, other=0.0)
        mean = tl.sum(acc, 0) / nf
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            c = start + tl.arange(0, BLOCK)
            cm = c < n
            dv = tl.where(cm, tl.load(urow + c, mask=cm, other=0.0) - mean, 0.0)
            acc += dv * dv
        std = tl.maximum(tl.sqrt(tl.sum(acc, 0) / nf), STD_EPS)
    zmax_t = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, n, BLOCK):
        c = start + tl.arange(0, BLOCK)
        cm = c < n
        z = _zscore(tl.load(urow + c, mask=cm, other=0.0), mean, std, score_scale, STANDARDIZE)
        tl.store(urow + c, z, mask=cm)
        zmax_t = tl.maximum(zmax_t, tl.where(cm, z, float("-inf")))
    tl.debug_barrier()
    ymax = tl.max(zmax_t, 0) * am1
    tau = tl.full([], -1.0, tl.float32)
    F = tl.full([], 1.0, tl.float32)
    if ENTMAX:
        tau, F = _entmax_threshold(0.0, 0, urow, n, ymax, hi, am1, r, N_ITER, POW_MODE, TINY,
                                   False, BLOCK)
    Fz = tl.maximum(F, TINY)
    for start in range(0, n, BLOCK):
        c = start + tl.arange(0, BLOCK)
        cm = c < n
        p = tl.zeros([BLOCK], tl.float32)           # top-k: no entmax support
        if ENTMAX:
            pw, pw1 = _entmax_terms(tl.load(urow + c, mask=cm, other=0.0), cm, ymax, tau, am1,
                                    r, POW_MODE)
            p = pw / Fz
        tl.store(prow + c, p, mask=cm)
    if HAS_MIN:
        thr = tl.full([], -2147483648, tl.int32)
        need = tl.full([], 0, tl.int32)
        if kf < n:
            thr, cnt_gt = _kth_largest_tiled(urow, urow, urow, 0, n, kf, BLOCK, BISECT,
                                             False, False)
            need = kf - cnt_gt
        carry = tl.full([], 0, tl.int32)
        for start in range(0, n, BLOCK):
            c = start + tl.arange(0, BLOCK)
            cm = c < n
            key = _skey(tl.load(urow + c, mask=cm, other=0.0))
            flo, carry = _floor_flags(key, cm, thr, need, carry, kf >= n)
            tl.store(frow + c, flo, mask=cm)
