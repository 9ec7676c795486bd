"""alpha-entmax: the reference (kernels/reference_entmax.py, through reference) against the
independent `entmax` package, and the selection kernels' Triton threshold helpers
(kernels/entmax.py) against torch, on the CPU (the Triton interpreter) and on a GPU."""
import zlib

import pytest
import torch
import triton
import triton.language as tl

from kernel_helpers import DEVICES, INTERPRETER_WARNINGS
from vllm_dash.kernels import reference as R
from vllm_dash.kernels.entmax import _kth_largest

pytestmark = INTERPRETER_WARNINGS

ALPHAS = [1.25, 1.5, 1.75, 2.0]


def oracle_entmax(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The `entmax` package in float64 (its exact paths where it has them)."""
    oracle = pytest.importorskip("entmax")      # the tests' extra (pyproject [test])
    xd = x.double()
    if alpha == 1.5:
        return oracle.entmax15(xd, dim=-1)
    if alpha == 2.0:
        return oracle.sparsemax(xd, dim=-1)
    return oracle.entmax_bisect(xd, alpha=alpha, dim=-1, n_iter=200)


def _inputs(kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.randn(64, 37, generator=gen) * 2.0
    if kind == "large":
        return torch.randn(32, 300, generator=gen) * 1e3
    if kind == "small":
        return torch.randn(32, 300, generator=gen) * 1e-3
    if kind == "ties":
        x = torch.randn(16, 24, generator=gen).round()  # many exact ties
        x[0] = 0.25                                       # a whole row of ties
        x[1, :12] = 3.0                                   # tied maxima
        return x
    if kind == "wide":
        return torch.randn(4, 4096, generator=gen) * 4.0
    raise AssertionError(kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", ["random", "large", "small", "ties", "wide"])
def test_matches_entmax_package(device, alpha, kind):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{alpha}-{kind}".encode()))
    x = _inputs(kind, gen)
    p = R.entmax(x.to(device), alpha).cpu()
    ref = oracle_entmax(x, alpha)
    assert p.dtype == x.dtype
    assert (p.double() - ref).abs().max().item() <= R.ENTMAX_TOL
    torch.testing.assert_close(p.sum(-1), torch.ones(x.shape[0]), atol=1e-5, rtol=0)
    # support: entries the oracle gives clear mass to are in ours and vice versa
    assert torch.equal(p[ref > 1e-4] > 0, torch.ones_like(p[ref > 1e-4], dtype=torch.bool))
    assert (p[ref == 0] <= R.ENTMAX_TOL).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_neg_inf_entries(device, alpha):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 33, generator=gen) * 3
    x[:, ::3] = float("-inf")
    x[0] = float("-inf")
    x[0, 1] = 0.5                     # a single finite entry
    p = R.entmax(x.to(device), alpha).cpu()
    finite = torch.where(torch.isinf(x), torch.full_like(x, -1e4), x)
    ref = oracle_entmax(finite, alpha)
    assert torch.isfinite(p).all()
    assert (p[torch.isinf(x)] == 0).all()
    assert (p.double() - ref).abs().max().item() <= R.ENTMAX_TOL
    assert p[0, 1] == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_all_neg_inf_row_is_zero(device, alpha):
    x = torch.full((2, 5), float("-inf"))
    x[1, 2] = 0.0
    p = R.entmax(x.to(device), alpha).cpu()
    assert torch.equal(p[0], torch.zeros(5))
    assert torch.equal(p[1], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_uniform_row_and_ties(device, alpha):
    x = torch.zeros(3, 10)
    x[1, :4] = 5.0
    p = R.entmax(x.to(device), alpha).cpu()
    torch.testing.assert_close(p[0], torch.full((10,), 0.1))
    # tied entries get equal mass
    assert torch.allclose(p[1, :4], p[1, :1].expand(4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(device, alpha, dtype):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(32, 50, generator=gen) * 3).to(dtype).to(device)
    p = R.entmax(x, alpha)
    assert p.dtype == dtype
    ref = oracle_entmax(x.float().cpu(), alpha)  # same (rounded) inputs, exact oracle
    tol = 2 * torch.finfo(dtype).eps            # output rounding only
    assert (p.double().cpu() - ref).abs().max().item() <= tol
    # computed in fp32: the fp32 result rounds to the same output
    assert torch.equal(p, R.entmax(x.float(), alpha).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [1.25, 1.75])
def test_newton_solver_matches_bisection_oracle_many_rows(device, alpha):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=gen) * torch.rand(512, 1, generator=gen) * 20
    p = R.entmax(x.to(device), alpha).cpu()
    ref = oracle_entmax(x, alpha)
    assert (p.double() - ref).abs().max().item() <= R.ENTMAX_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_dim_argument(device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 9, 4, generator=gen).to(device)
    p = R.entmax(x, 1.5, dim=1)
    torch.testing.assert_close(p, R.entmax(x.transpose(1, 2), 1.5).transpose(1, 2))
    torch.testing.assert_close(p.sum(1), torch.ones(6, 4, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_defines_probabilities(device):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(8, 30, generator=gen).to(device)
    for alpha in ALPHAS:
        tau = R.entmax_threshold(x, alpha)
        y = (alpha - 1) * (x - x.amax(-1, keepdim=True))
        p = (y - tau).clamp_min(0) ** (1 / (alpha - 1))
        torch.testing.assert_close(p.sum(-1), torch.ones(8, device=device), atol=1e-5,
                                   rtol=0)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.5, -1, float("nan"), "x"])
def test_invalid_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        R.entmax(torch.zeros(3), alpha)


# --------------------------------------------------------------------------------------
# Triton helpers of kernels/entmax.py
# --------------------------------------------------------------------------------------
@triton.jit
def _kth_kernel(key_ptr, valid_ptr, out_ptr, n_k, N: tl.constexpr, RB: tl.constexpr):
    i = tl.arange(0, N)
    key = tl.load(key_ptr + i)
    valid = tl.load(valid_ptr + i) != 0
    for k in range(1, n_k + 1):
        t, gt = _kth_largest(key, valid, k, RB)
        tl.store(out_ptr + 2 * (k - 1), t)
        tl.store(out_ptr + 2 * (k - 1) + 1, gt)


@pytest.mark.parametrize("device", DEVICES)
def test_kth_largest_radix_select(device):
    """kernels.entmax._kth_largest (radix select over int32 keys) vs torch: extreme keys,
    many duplicates, masked entries, every k."""
    g = torch.Generator().manual_seed(4)
    N = 32
    pools = [
        torch.randint(-2**31, 2**31 - 1, (N,), generator=g, dtype=torch.int64),
        torch.tensor([-2**31, 2**31 - 1, 0, -1, 1] * 6 + [5, -7]),
        torch.randint(-3, 3, (N,), generator=g, dtype=torch.int64),
    ]
    for keys in pools:
        keys = keys.to(torch.int32)
        valid = (torch.rand(N, generator=g) < 0.8).to(torch.int32)
        nv = int(valid.sum())
        for RB in (4, 2):
            out = torch.zeros(2 * nv, dtype=torch.int32, device=device)
            _kth_kernel[(1,)](keys.to(device), valid.to(device), out, nv, N=N, RB=RB)
            out = out.cpu()
            vk = keys[valid.bool()].long().sort(descending=True).values
            for k in range(1, nv + 1):
                t = int(vk[k - 1])
                assert int(out[2 * (k - 1)]) == t, (RB, k)
                assert int(out[2 * (k - 1) + 1]) == int((vk > t).sum()), (RB, k)
