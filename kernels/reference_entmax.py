"""alpha-entmax in plain torch: the reference's stage-1 distribution (reference.py).

Checked against the independent `entmax` package (tests); the selection kernel's Triton
threshold search (entmax.py) is checked against this through the reference. Exact
sort-based thresholds for alpha 1.5 and 2 (sparsemax), a safeguarded Newton solve with a
fixed iteration count otherwise. No vLLM import here.
"""
from __future__ import annotations

import torch

__all__ = ["ENTMAX_N_ITER", "ENTMAX_TOL", "entmax", "entmax_threshold"]

#: Fixed iteration count of the general-alpha threshold solver (no data-dependent loop).
ENTMAX_N_ITER = 30
#: Stated tolerance of :func:`entmax` (fp32 compute): max |p - p_exact| per entry.
ENTMAX_TOL = 1e-5


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number in (1, 2], got {alpha!r}") from None
    if not (1.0 < a <= 2.0):
        raise ValueError(
            f"alpha must be in (1, 2] (alpha=1 is softmax, which has no sparse support; "
            f"alpha=2 is sparsemax), got {alpha!r}"
        )
    return a


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(x: torch.Tensor, alpha: float):
    """y = (alpha - 1) * x in the compute dtype, shifted so that every row's max is 0.

    Entries below max - 1 can never be in the support (tau >= max - 1), so -inf entries are
    replaced by -2 (still outside) to keep every later sum finite. Rows that are entirely
    -inf are flagged and produce all zeros.
    """
    xc = x.to(_compute_dtype(x.dtype))
    m = xc.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(m)
    # shift first (exact for entries near the max), then scale: no rounding of large values
    y = (xc - torch.where(empty, torch.zeros_like(m), m)) * (alpha - 1.0)
    y = torch.where(empty, torch.zeros_like(y), y)
    y = y.clamp_min(-2.0)
    return y, empty


def _threshold_sort_15(y: torch.Tensor) -> torch.Tensor:
    """Exact tau for alpha=1.5 (rows of y already scaled by 1/2): sum_i [y_i - tau]_+^2 = 1.

    For a support of the k largest entries, tau solves k tau^2 - 2 tau S1 + S2 - 1 = 0:
    tau_k = mean_k - sqrt((1 - ss_k) / k), ss_k = S2 - k mean_k^2. The support size is the
    largest k with tau_k < y_(k).
    """
    ys, _ = torch.sort(y, dim=-1, descending=True)
    k = torch.arange(1, y.shape[-1] + 1, device=y.device, dtype=y.dtype)
    mean = ys.cumsum(-1) / k
    mean_sq = (ys * ys).cumsum(-1) / k
    ss = k * (mean_sq - mean * mean)
    tau = mean - torch.sqrt(((1.0 - ss) / k).clamp_min(0.0))
    support = (tau < ys).sum(dim=-1, keepdim=True).clamp_min(1)
    return tau.gather(-1, support - 1)


def _threshold_sort_2(y: torch.Tensor) -> torch.Tensor:
    """Exact tau for alpha=2 (sparsemax): sum_i [y_i - tau]_+ = 1."""
    ys, _ = torch.sort(y, dim=-1, descending=True)
    k = torch.arange(1, y.shape[-1] + 1, device=y.device, dtype=y.dtype)
    tau = (ys.cumsum(-1) - 1.0) / k
    support = (tau < ys).sum(dim=-1, keepdim=True).clamp_min(1)
    return tau.gather(-1, support - 1)


def _threshold_newton(y: torch.Tensor, alpha: float, n_iter: int) -> torch.Tensor:
    """tau with f(tau) = sum_i [y_i - tau]_+^(1/(alpha-1)) - 1 = 0, any alpha in (1, 2].

    f is convex and decreasing on the bracket [max - 1, max - d^(1-alpha)] (f >= 0 at the
    left end, <= 0 at the right). Newton's step from a point left of the root lands between
    that point and the root, so the iteration starts at the left end and stays inside the
    bracket; a step that leaves the bracket numerically is replaced by bisection. Fixed
    iteration count: no data-dependent loop, the same shape of work as the GPU kernel.
    """
    r = 1.0 / (alpha - 1.0)
    d = y.shape[-1]
    lo = torch.full_like(y[..., :1], -1.0)  # rows are shifted: max = 0
    hi = torch.full_like(lo, -(1.0 / d) ** (alpha - 1.0))
    tau = lo.clone()
    for _ in range(n_iter):
        diff = (y - tau).clamp_min(0.0)
        f = diff.pow(r).sum(-1, keepdim=True) - 1.0
        df = -r * diff.pow(r - 1.0).sum(-1, keepdim=True) if r > 1.0 else \
            -(diff > 0).to(y.dtype).sum(-1, keepdim=True)
        lo = torch.where(f >= 0, tau, lo)
        hi = torch.where(f < 0, tau, hi)
        step = tau - f / df.clamp_max(-1e-30)
        inside = (step >= lo) & (step <= hi)
        tau = torch.where(inside, step, 0.5 * (lo + hi))
    return tau


def _threshold(y: torch.Tensor, alpha: float, n_iter: int) -> torch.Tensor:
    """tau for prepared rows: exact sort-based for alpha 1.5 and 2, Newton otherwise."""
    if alpha == 1.5:
        return _threshold_sort_15(y)
    if alpha == 2.0:
        return _threshold_sort_2(y)
    return _threshold_newton(y, alpha, n_iter)


def entmax_threshold(x: torch.Tensor, alpha: float = 1.5, dim: int = -1,
                     n_iter: int = ENTMAX_N_ITER) -> torch.Tensor:
    """The threshold tau of alpha-entmax along ``dim`` for the shifted, scaled rows
    ``(alpha - 1) * (x - max x)`` (returned with ``dim`` kept, compute dtype)."""
    alpha = _check_alpha(alpha)
    y, _ = _prepare(x.movedim(dim, -1), alpha)
    return _threshold(y, alpha, n_iter).movedim(-1, dim)


def entmax(x: torch.Tensor, alpha: float = 1.5, dim: int = -1,
           n_iter: int = ENTMAX_N_ITER) -> torch.Tensor:
    """alpha-entmax along ``dim``: p_i = [(alpha-1) x_i - tau]_+^(1/(alpha-1)), sum p = 1.

    * alpha in (1, 2]; 1.5 and 2 (sparsemax) use the exact sort-based threshold, other
      values a safeguarded Newton solve with a fixed ``n_iter`` (default 30) iterations.
    * Tolerance: max |p - p_exact| <= ENTMAX_TOL (1e-5) per entry for fp32/bf16/fp16 inputs
      (computed in fp32; fp64 inputs in fp64); the result is renormalised to sum to 1.
    * Entries may be -inf (probability exactly 0); a row that is entirely -inf gives all
      zeros. Ties get equal probability. +inf and NaN are not allowed.
    * Returns the input dtype.
    """
    alpha = _check_alpha(alpha)
    xt = x.movedim(dim, -1)
    y, empty = _prepare(xt, alpha)
    tau = _threshold(y, alpha, n_iter)
    p = (y - tau).clamp_min(0.0).pow(1.0 / (alpha - 1.0))
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    p = torch.where(empty | torch.isneginf(xt), torch.zeros_like(p), p)
    return p.to(x.dtype).movedim(-1, dim)
