"""What the kernel tests share: the device parametrisation, test settings as DashParams, and
the random inputs and comparisons of each op (paged caches, block tables, selections).

Every builder takes ``device`` and draws its random numbers from a generator on that device,
so a CPU case (small shapes, Triton interpreter) and a GPU case (real shapes) go through the
same code. Which of the two runs in a process is decided in conftest.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from vllm_dash.kernels import reference as ref
from vllm_dash.kernels.params import DashParams
from vllm_dash.kernels.select import SelectWorkspace, select_blocks_paged

#: the interpreter's scalar __index__ (range over a loaded length) warns on NumPy >= 1.25
INTERPRETER_WARNINGS = pytest.mark.filterwarnings(
    "ignore:Conversion of an array:DeprecationWarning")


# --------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def on_devices(cpu=(), cuda=()):
    """pytest params ``(device, case)``: the CPU cases (interpreter, small shapes) and the
    CUDA cases (real shapes, marked ``gpu``)."""
    return ([pytest.param("cpu", c, id=f"cpu-{i}") for i, c in enumerate(cpu)]
            + [pytest.param("cuda", c, id=f"cuda-{i}", marks=pytest.mark.gpu)
               for i, c in enumerate(cuda)])


def generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------
def split_params(kw):
    """Test settings as one dict -> (DashParams of the knobs, the other keyword arguments)."""
    knobs = {k: v for k, v in kw.items() if k in DashParams.keys()}
    return DashParams(**knobs), {k: v for k, v in kw.items() if k not in knobs}


def select_twin(**kw):
    """reference.select_blocks_paged with the knobs as keywords."""
    params, rest = split_params(kw)
    return ref.select_blocks_paged(params=params, **rest)


# --------------------------------------------------------------------------------------
# selection (kernels/select.py)
# --------------------------------------------------------------------------------------
MARGIN = 1e-5           # min |y - tau| (threshold units) required for the exact comparisons
PROB_ATOL = 1e-5


def select_case(S, Hq, Hk, D, B, lens, *, seed, device="cpu", q_scale=2.0, nmax=None,
                num_blocks=None, q_dtype=torch.float32, shared_prefix=0, extra_blocks=8):
    """Random queries / summaries and a block table with distinct (shuffled) physical ids;
    the first ``shared_prefix`` logical blocks of every sequence share the same physical
    blocks (prefix caching); entries past a sequence's blocks are garbage (never read)."""
    g = generator(device, seed)
    n = [-(-L // B) for L in lens]
    nmax = nmax or max(n)
    num_blocks = num_blocks or (S * nmax + extra_blocks)
    summ = torch.randn(num_blocks, Hk, D, generator=g, device=device)
    q = (torch.randn(S, Hq, D, generator=g, device=device) * q_scale).to(q_dtype)
    perm = torch.randperm(num_blocks, generator=g, device=device)
    bt = perm[: S * nmax].view(S, nmax).clone()
    if shared_prefix:
        bt[:, :shared_prefix] = bt[0, :shared_prefix]
    bt = bt.to(torch.int32)
    for s in range(S):
        bt[s, n[s]:] = -12345
    return q, summ, bt, torch.tensor(lens, dtype=torch.int32, device=device)


def run_select(q, summ, bt, lens, *, cap_extra=2, workspace=None, **kw):
    """The kernel into outputs with ``cap_extra`` capacity rows and a second counts
    destination (a stats buffer); checks that rows past S stay untouched."""
    S, Hq, _ = q.shape
    Hk, nmax, dev = summ.shape[1], bt.shape[1], q.device
    ids = torch.full((S + cap_extra, Hk, nmax), -777, dtype=torch.int32, device=dev)
    lp = torch.full((S + cap_extra, Hk, nmax), 777.0, device=dev)
    cnt = torch.full((S + cap_extra, Hk), -777, dtype=torch.int32, device=dev)
    if workspace is None:
        workspace = SelectWorkspace(S + cap_extra, Hq, Hk, nmax, device=dev)
    cnt2 = torch.full((S + cap_extra + 1, Hk), -555, dtype=torch.int32, device=dev)
    params, rest = split_params(kw)
    select_blocks_paged(q=q, summaries=summ, block_table=bt, seq_lens=lens, out_block_ids=ids,
                        out_log_prior=lp, out_counts=cnt, workspace=workspace,
                        out_counts_copy=cnt2, params=params, **rest)
    assert (cnt[S:] == -777).all() and (ids[S:] == -777).all()
    assert torch.equal(cnt2[:S], cnt[:S]) and (cnt2[S:] == -555).all()
    return ids[:S], lp[:S], cnt[:S]


def threshold_margin(sel: ref.Selection, alpha: float) -> float:
    """min over valid (seq, head, block) of |y - tau| with the reference's own tau."""
    z = sel.scores
    tau = ref.entmax_threshold(z, alpha=alpha)
    y = z * (alpha - 1.0)
    y = (y - y.amax(-1, keepdim=True)).clamp_min(-2.0)
    gap = (y - tau).abs()
    return float(gap[torch.isfinite(z)].min())


def logical_ids(bt, s, n):
    """{physical id: logical block} of sequence s's first n blocks."""
    return {p: c for c, p in enumerate(bt[s, :n].tolist())}


def compare_selection(kernel_out, twin_out, bt, *, alpha, max_flips=0, check_margin=True,
                      prob_atol=PROB_ATOL):
    """Kernel vs twin: same counts and ids (up to ``max_flips`` entmax-boundary blocks, each
    with reference probability < 1e-5), probabilities to ``prob_atol``, the logs of those
    above 1e-3 to 1e-3. With no flips allowed (and ``check_margin``) the data must keep
    every block MARGIN away from the threshold. Returns the number of flips."""
    ids, lp, cnt = (t.cpu() for t in kernel_out)
    rids, rlp, rcnt, sel = twin_out
    rids, rlp, rcnt, bt = rids.cpu(), rlp.cpu(), rcnt.cpu(), bt.cpu()
    pbar = sel.mean_probs.cpu()
    if check_margin and max_flips == 0:
        assert threshold_margin(sel, alpha) > MARGIN, "test data too close to the boundary"
    S, Hk = cnt.shape
    flips = 0
    for s in range(S):
        where = logical_ids(bt, s, int(sel.num_blocks[s]))
        for h in range(Hk):
            k, rk = int(cnt[s, h]), int(rcnt[s, h])
            got, want = ids[s, h, :k].tolist(), rids[s, h, :rk].tolist()
            if got != want:
                for p in set(got) ^ set(want):
                    assert float(pbar[s, h, where[p]]) < 1e-5, (s, h, got, want)
                    flips += 1
                assert flips <= max_flips, (s, h, got, want)
                continue
            torch.testing.assert_close(lp[s, h, :k].exp(), rlp[s, h, :k].exp(),
                                       rtol=0, atol=prob_atol)
            big = rlp[s, h, :k] > math.log(1e-3)
            torch.testing.assert_close(lp[s, h, :k][big], rlp[s, h, :k][big], rtol=0,
                                       atol=1e-3)
    return flips


def check_selection(q, summ, bt, lens, *, block_size, max_flips=0, check_margin=True,
                    tile=None, prob_atol=PROB_ATOL, **kw):
    """Kernel (run_select) and twin on the same inputs, compared; returns
    ``(kernel_out, twin_out, flips)``."""
    out = run_select(q, summ, bt, lens, block_size=block_size, tile=tile, **kw)
    twin = select_twin(q=q, summaries=summ, block_table=bt, seq_lens=lens,
                       block_size=block_size, **kw)
    flips = compare_selection(out, twin, bt, alpha=kw.get("alpha", 1.5), max_flips=max_flips,
                              check_margin=check_margin, prob_atol=prob_atol)
    return out, twin, flips


# --------------------------------------------------------------------------------------
# decode (kernels/decode.py)
# --------------------------------------------------------------------------------------
def poisoned_paged_cache(lens, Hk, D, B, dtype, layout="nhd", *, device="cpu", seed=0,
                         extra_blocks=3):
    """Paged K/V caches with NaN in every slot no sequence owns, a shuffled block table with
    stale tail entries, and the id of an all-NaN block (to poison unused list entries).
    ``layout`` "hnd": a head-major cache, returned as its [num_blocks, B, Hk, D] view."""
    g = generator(device, seed)
    S = len(lens)
    n = [-(-L // B) for L in lens]
    nb = sum(n) + extra_blocks
    shape = (nb, B, Hk, D) if layout == "nhd" else (nb, Hk, B, D)
    kc = torch.full(shape, float("nan"), dtype=dtype, device=device)
    vc = torch.full(shape, float("nan"), dtype=dtype, device=device)
    k_view = kc if layout == "nhd" else kc.transpose(1, 2)
    v_view = vc if layout == "nhd" else vc.transpose(1, 2)
    perm = torch.randperm(nb, generator=g, device=device)
    nan_block = int(perm[-1])
    bt = torch.full((S, max(n) + 2), nan_block, dtype=torch.int32, device=device)
    pos = 0
    for s, L in enumerate(lens):
        ids = perm[pos:pos + n[s]]
        pos += n[s]
        bt[s, :n[s]] = ids.to(torch.int32)
        for c, b in enumerate(ids.tolist()):
            fill = min(B, L - c * B)
            k_view[b, :fill] = torch.randn(fill, Hk, D, generator=g, device=device).to(dtype)
            v_view[b, :fill] = torch.randn(fill, Hk, D, generator=g, device=device).to(dtype)
    return k_view, v_view, bt, nan_block


def random_selection(lens, Hk, B, density, *, device="cpu", seed=0):
    """A reference Selection: each block kept with probability ``density``, the current
    block always (forced, prior 1), random priors in (0.05, 1] for the others."""
    g = generator(device, seed + 1)
    S = len(lens)
    lens_t = torch.tensor(lens, dtype=torch.long, device=device)
    n = (lens_t + B - 1) // B
    n_max = int(n.max())
    c = torch.arange(n_max, device=device)
    valid = c[None, :] < n[:, None]
    selected = (torch.rand(S, Hk, n_max, generator=g, device=device) < density)
    selected &= valid[:, None, :]
    current = (c[None, :] == (n - 1)[:, None])[:, None, :].expand(S, Hk, n_max)
    selected |= current
    prior = 0.05 + 0.95 * torch.rand(S, Hk, n_max, generator=g, device=device)
    prior = torch.where(current, torch.ones_like(prior), prior)
    prior = torch.where(selected, prior, torch.zeros_like(prior))
    dummy = torch.zeros(S, Hk, n_max, device=device)
    return ref.Selection(selected=selected, prior=prior, probs=dummy, mean_probs=dummy,
                         scores=dummy, num_blocks=n, seq_lens=lens_t,
                         dense=torch.zeros(S, dtype=torch.bool, device=device), block_size=B)


def to_compact(sel, block_table, S_cap, max_blocks, poison_block):
    """Reference Selection -> (block_ids int32, log_prior fp32, counts int32), the stage-1
    output format: physical ids in ascending logical order, current block last. Entries past
    counts point at an all-NaN block (log prior NaN); rows past S are garbage."""
    S, Hk, n_max = sel.selected.shape
    dev = sel.selected.device
    ids = torch.full((S_cap, Hk, max_blocks), poison_block, dtype=torch.int32, device=dev)
    lp = torch.full((S_cap, Hk, max_blocks), float("nan"), dtype=torch.float32, device=dev)
    counts = torch.full((S_cap, Hk), 10**6, dtype=torch.int32, device=dev)
    tiny = torch.finfo(torch.float32).tiny
    for s in range(S):
        for h in range(Hk):
            logical = sel.selected[s, h].nonzero().flatten()
            k = logical.numel()
            ids[s, h, :k] = block_table[s, logical].to(torch.int32)
            lp[s, h, :k] = sel.prior[s, h, logical].clamp_min(tiny).log()
            counts[s, h] = k
    return ids, lp, counts


def gathered(cache, bt, lens):
    """The contiguous [S, Hk, L, D] view the reference attends over (NaN slots as 0)."""
    return ref.gather_paged(torch.nan_to_num(cache, nan=0.0), bt, lens)


def sparse_reference(q, kc, vc, bt, lens, sel, prior_weight, scale=None):
    return ref.sparse_attention(q, gathered(kc, bt, lens), gathered(vc, bt, lens), sel,
                                params=DashParams(prior_weight=prior_weight), scale=scale)


def dense_reference(q, kc, vc, bt, lens, scale=None):
    """Dense decode attention (torch SDPA, fp32) over the paged cache."""
    G = q.shape[1] // kc.shape[2]
    lens_t = torch.as_tensor(lens, device=q.device)
    k = gathered(kc, bt, lens_t).float().repeat_interleave(G, dim=1)
    v = gathered(vc, bt, lens_t).float().repeat_interleave(G, dim=1)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < lens_t[:, None]   # [S, L]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return o[:, :, 0, :].to(q.dtype)


# --------------------------------------------------------------------------------------
# reference (kernels/reference.py)
# --------------------------------------------------------------------------------------
def dash_inputs(seed, S, Hq, Hk, L, D, dtype=torch.float32, lens=None, device="cpu"):
    """q [S, Hq, D], contiguous k/v [S, Hk, L, D] with clearly different block summaries
    (runs of 8 tokens share an offset) and seq_lens (the first sequence full). Drawn on the
    CPU, then moved: every device sees the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(S, Hq, D, generator=gen).to(dtype)
    k = torch.randn(S, Hk, L, D, generator=gen)
    runs = torch.randn(S, Hk, -(-L // 8), D, generator=gen).repeat_interleave(8, dim=2)
    k = k + 1.5 * runs[:, :, :L]
    v = torch.randn(S, Hk, L, D, generator=gen)
    if lens is None:
        lens = torch.randint(1, L + 1, (S,), generator=gen)
        lens[0] = L
    return (q.to(device), k.to(dtype).to(device), v.to(dtype).to(device),
            torch.as_tensor(lens).to(device))


def to_paged(k, v, lens, block_size, seed=0, extra_blocks=3):
    """Scatter contiguous K/V into a paged cache (garbage elsewhere) with a shuffled block
    table, on k's device."""
    S, Hk, L, D = k.shape
    dev = k.device
    n_max = -(-L // block_size)
    num_blocks = S * n_max + extra_blocks
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen)
    table = perm[: S * n_max].view(S, n_max).to(torch.int32)
    kc = torch.randn(num_blocks, block_size, Hk, D, generator=gen).to(k.dtype).to(dev)
    vc = torch.randn(num_blocks, block_size, Hk, D, generator=gen).to(v.dtype).to(dev)
    pad = n_max * block_size - L
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(S, Hk, n_max, block_size, D)
    vp = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(S, Hk, n_max, block_size, D)
    for s in range(S):
        n = -(-int(lens[s]) // block_size)
        for c in range(n):
            filled = min(block_size, int(lens[s]) - c * block_size)
            kc[table[s, c], :filled] = kp[s, :, c, :filled].transpose(0, 1)
            vc[table[s, c], :filled] = vp[s, :, c, :filled].transpose(0, 1)
    return kc, vc, table.to(dev)
