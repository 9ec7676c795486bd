"""Triton helpers of the selection's thresholds: the alpha-entmax threshold and exact
k-th largest values (used by kernels/select.py; the torch spec is reference.entmax).

alpha-entmax of scores z (1 < alpha <= 2, r = 1 / (alpha - 1) >= 1) is
p_c = [y_c - tau]_+^r with y = (alpha - 1) z - max((alpha - 1) z) and tau the unique value
with sum_c p_c = 1. Every y_c <= 0 and the maximum is 0, so tau lies in the bracket
[-1, hi], hi = -(1/n)^(alpha-1): at tau = -1 the maximum alone contributes 1^r = 1, and at
tau = hi every term is at most (1/n)^((alpha-1) r) = 1/n. A score with y_c <= -1 never
contributes, so y is clipped at -2 (which keeps -inf or huge negative scores finite).

Threshold (:func:`_newton_step`, :func:`_entmax_terms`): Newton's method on
g(tau) = F(tau)^(1/r) - 1 with F(tau) = sum_c [y_c - tau]_+^r. F^(1/r) is the r-norm of
the vector ([y_c - tau]_+)_c, a convex, decreasing function of tau; with
F'(tau) = -r S1(tau), S1 = sum_c [y_c - tau]_+^(r-1), the step is
tau' = tau + F (1 - F^(-1/r)) / S1. Started at the left end tau = -1 (g >= 0) the iterates
increase monotonically towards the root and never pass it in exact arithmetic; a step past
the right end hi (rounding) is replaced by bisection towards hi. On this "r-norm" form
Newton is exact in one step for equal scores and converges in a handful of steps otherwise;
sparsemax (alpha 2, where the iteration is Michelot's algorithm) needs the most. The kernel
runs at most ``ENTMAX_ITERS`` passes and stops early when a step returns its input: the
iteration is a deterministic map, so every later pass would repeat it. The probabilities
are normalised by the last pass's F (p = [y - tau]_+^r / F(tau) at the last evaluated tau),
so they sum to 1 up to rounding even before convergence. alpha 1.5 (r = 2) and alpha 2
(r = 1) use exact powers (``POW_MODE`` 2 and 1); other alphas use exp2/log2.

k-th largest (:func:`_skey`, :func:`_kth_largest`): the min_blocks floor and the max_blocks
cap rank fp32 values exactly. ``_skey`` maps fp32 to int32 preserving order (through the bit
pattern: negative values have their magnitude bits flipped), so ranking fp32 values is
ranking integers, and the k-th largest key is found exactly by a radix select over the row
in registers (or, for rows in global memory, a 32-step bisection over the key range in
select.py); ties at the threshold are resolved by the caller (lowest block id first).
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
