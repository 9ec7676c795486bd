"""kernels/select.py under the Triton interpreter vs reference.select_blocks (through the
torch twin reference.select_blocks_paged, which compacts the reference's Selection).

Exactness policy. The kernel's block set must equal the reference's exactly. The only
legitimate source of a difference is a block at the entmax support boundary: its
probability is ~0 in both (|y - tau| within the fp32 error of the two thresholds, ~1e-7),
so `pbar > 0` can flip. The tests with exact comparison therefore check, on the
reference's own numbers, that every valid block is at least MARGIN away from the threshold
in every head before comparing. Ranking ties of the floor / cap are either exact by
construction (identical summaries: test_exact_ties_break_to_lower_block_id, where both
sides see the same tie) or, in random data, far apart (a near-tie would show as a
mismatch). One test on plain random data allows a small, documented number of boundary
flips, each of which must be a block whose reference probability is below 1e-5.
Probabilities (exp of the log-prior) must match to 1e-5.
"""
import math

import pytest
import torch
import triton
import triton.language as tl

from vllm_dash.kernels import reference as ref
from vllm_dash.kernels.params import DashParams
from vllm_dash.kernels.select import SelectWorkspace, _kth_largest, select_blocks_paged


def split_params(kw):
    """Test settings as one dict -> (DashParams of the knobs, the other keyword arguments)."""
    knobs = {k: v for k, v in kw.items() if k in DashParams.keys()}
    return DashParams(**knobs), {k: v for k, v in kw.items() if k not in knobs}


def select_blocks_paged_torch(**kw):
    """The twin (reference.select_blocks_paged) called with the knobs as keywords."""
    params, rest = split_params(kw)
    return ref.select_blocks_paged(params=params, **rest)

# the interpreter's scalar __index__ (range over a loaded length) warns on NumPy >= 1.25
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")

MARGIN = 1e-5           # min |y - tau| (threshold units) required for the exact comparisons
PROB_ATOL = 1e-5


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def make_case(S, Hq, Hk, D, B, lens, *, seed, q_scale=2.0, nmax=None, num_blocks=None,
              q_dtype=torch.float32, shared_prefix=0):
    """Random queries / summaries and a block table with distinct (shuffled) physical ids;
    the first ``shared_prefix`` logical blocks of every sequence share the same physical
    blocks (prefix caching)."""
    g = torch.Generator().manual_seed(seed)
    n = [-(-L // B) for L in lens]
    nmax = nmax or max(n)
    num_blocks = num_blocks or (S * nmax + 8)
    summ = torch.randn(num_blocks, Hk, D, generator=g)
    q = (torch.randn(S, Hq, D, generator=g) * q_scale).to(q_dtype)
    perm = torch.randperm(num_blocks, generator=g)
    bt = perm[: S * nmax].view(S, nmax).clone()
    if shared_prefix:
        bt[:, :shared_prefix] = bt[0, :shared_prefix]
    bt = bt.to(torch.int32)
    # garbage past each sequence's blocks: must never be read
    for s in range(S):
        bt[s, n[s]:] = -12345
    return q, summ, bt, torch.tensor(lens, dtype=torch.int32)


def run_kernel(q, summ, bt, lens, *, cap_extra=2, workspace=None, **kw):
    S, Hq, _ = q.shape
    Hk = summ.shape[1]
    nmax = bt.shape[1]
    ids = torch.full((S + cap_extra, Hk, nmax), -777, dtype=torch.int32)
    lp = torch.full((S + cap_extra, Hk, nmax), 777.0)
    cnt = torch.full((S + cap_extra, Hk), -777, dtype=torch.int32)
    if workspace is None:
        workspace = SelectWorkspace(S + cap_extra, Hq, Hk, nmax)
    cnt2 = torch.full((S + cap_extra + 1, Hk), -555, dtype=torch.int32)   # a stats buffer
    params, rest = split_params(kw)
    select_blocks_paged(q=q, summaries=summ, block_table=bt, seq_lens=lens, out_block_ids=ids,
                        out_log_prior=lp, out_counts=cnt, workspace=workspace,
                        out_counts_copy=cnt2, params=params, **rest)
    # rows past S (capacity) are untouched; the second destination holds the same counts
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
    valid = torch.isfinite(z)
    return float(gap[valid].min())


def compare(kernel_out, twin_out, sel, bt, *, alpha, max_flips=0, check_margin=True,
            prob_atol=PROB_ATOL):
    """Kernel vs twin: same counts and ids (up to ``max_flips`` boundary blocks, each with
    reference probability < 1e-5), probabilities to ``prob_atol``. Returns the flips."""
    ids, lp, cnt = kernel_out
    rids, rlp, rcnt, _ = twin_out
    S, Hk = cnt.shape
    if check_margin and max_flips == 0:
        assert threshold_margin(sel, alpha) > MARGIN, "test data too close to the boundary"
    flips = 0
    for s in range(S):
        table = bt[s, :int(sel.num_blocks[s])].tolist()
        for h in range(Hk):
            k, rk = int(cnt[s, h]), int(rcnt[s, h])
            got = ids[s, h, :k].tolist()
            want = rids[s, h, :rk].tolist()
            if got != want:
                for p in set(got) ^ set(want):
                    assert float(sel.mean_probs[s, h, table.index(p)]) < 1e-5, (s, h, got, want)
                    flips += 1
                assert flips <= max_flips, (s, h, got, want)
                continue
            # probabilities (exp of the log-prior) to prob_atol, large ones' logs to 1e-3
            torch.testing.assert_close(lp[s, h, :k].exp(), rlp[s, h, :k].exp(),
                                       rtol=0, atol=prob_atol)
            big = rlp[s, h, :k] > math.log(1e-3)
            torch.testing.assert_close(lp[s, h, :k][big], rlp[s, h, :k][big], rtol=0,
                                       atol=1e-3)
    return flips


def check(q, summ, bt, lens, *, block_size, max_flips=0, check_margin=True, tile=None,
          prob_atol=PROB_ATOL, **kw):
    out = run_kernel(q, summ, bt, lens, block_size=block_size, tile=tile, **kw)
    twin = select_blocks_paged_torch(q=q, summaries=summ, block_table=bt, seq_lens=lens,
                                     block_size=block_size, **kw)
    sel = twin[3]
    flips = compare(out, twin, sel, bt, alpha=kw.get("alpha", 1.5), max_flips=max_flips,
                    check_margin=check_margin, prob_atol=prob_atol)
    return out, twin, flips


# --------------------------------------------------------------------------------------
# exact comparisons on data with clear margins
# --------------------------------------------------------------------------------------
SHAPES = [  # (Hq, Hk, D, B)
    (4, 2, 32, 16),
    (8, 1, 64, 64),
    (4, 2, 64, 64),
    (8, 1, 32, 16),
]

SETTINGS = [
    dict(),
    dict(alpha=1.25),
    dict(alpha=2.0),
    dict(score_norm="standardize", score_scale=2.0),
    dict(prior_norm="max", alpha=1.25, score_norm="standardize"),
    dict(alpha=2.0, prior_norm="max"),
    dict(sink_blocks=1, local_blocks=2),
    dict(min_blocks=3, sink_blocks=2),
    dict(min_blocks=4, score_norm="standardize", alpha=2.0),
    dict(max_blocks=4, sink_blocks=1, local_blocks=1),
    dict(max_blocks=5, min_blocks=4, local_blocks=2, score_scale=0.5),
    dict(max_blocks=3, min_blocks=6, alpha=1.25, prior_norm="max", score_norm="standardize",
         score_scale=4.0),
    dict(dense_below=24 * 16, sink_blocks=1),
    dict(score_scale=1.5, min_blocks=6, max_blocks=8, sink_blocks=1, local_blocks=3,
         alpha=2.0, dense_below=1),
]


def _lens(B, seed):
    # single partial block, exactly one block, a multiple of B, ragged, a single token, long
    return [B // 2 + 1, B, 3 * B, 23 * B + 5 + seed % 7, 1, 57 * B - 3][: 4 + seed % 3] + \
        [(40 + seed) * B + seed % 5]


@pytest.mark.parametrize("i", range(len(SETTINGS)))
def test_matches_reference(i):
    kw = SETTINGS[i]
    Hq, Hk, D, B = SHAPES[i % len(SHAPES)]
    lens = _lens(B, i)
    q, summ, bt, lt = make_case(len(lens), Hq, Hk, D, B, lens, seed=100 + i,
                                q_dtype=torch.bfloat16 if i % 5 == 4 else torch.float32)
    (ids, lp, cnt), twin, _ = check(q, summ, bt, lt, block_size=B, **kw)
    sel = twin[3]
    # structural facts of the compacted list
    for s, L in enumerate(lens):
        n = -(-L // B)
        for h in range(Hk):
            k = int(cnt[s, h])
            row = ids[s, h, :k].tolist()
            assert row[-1] == int(bt[s, n - 1]), "current block must be last"
            logical = [bt[s, :n].tolist().index(p) for p in row]
            assert logical == sorted(logical)
            if L < kw.get("dense_below", 0):
                assert k == n and (lp[s, h, :k] == 0).all()
    # the setting's features really act on this data
    base = {k: v for k, v in kw.items() if k not in ("max_blocks", "min_blocks", "dense_below")}
    cnt_base = select_blocks_paged_torch(q=q, summaries=summ, block_table=bt, seq_lens=lt,
                                         block_size=B, **base)[2]
    n = sel.num_blocks[:, None]
    assert (cnt_base < n).any(), "entmax must drop blocks somewhere"
    if "min_blocks" in kw:
        nocap = {k: v for k, v in kw.items() if k != "max_blocks"}
        cnt_nocap = select_blocks_paged_torch(q=q, summaries=summ, block_table=bt,
                                              seq_lens=lt, block_size=B, **nocap)[2]
        assert (cnt_nocap > cnt_base).any(), "the floor must add blocks somewhere"
    else:
        cnt_nocap = cnt_base
    if "max_blocks" in kw:
        assert (cnt_nocap > kw["max_blocks"]).any(), "the cap must bind somewhere"
        assert (cnt <= kw["max_blocks"]).all()
    if kw.get("dense_below", 0) > 1:
        dense = [s for s, L in enumerate(lens) if L < kw["dense_below"]]
        assert any((cnt_base[s] < sel.num_blocks[s]).any() for s in dense)


def test_sparse_enough_to_matter():
    """Guard for the data above: the settings must really drop blocks somewhere."""
    Hq, Hk, D, B = SHAPES[0]
    lens = [40 * B + 3]
    q, summ, bt, lt = make_case(1, Hq, Hk, D, B, lens, seed=7, q_scale=4.0)
    (ids, lp, cnt), twin, _ = check(q, summ, bt, lt, block_size=B)
    n = 41
    assert int(cnt.max()) < n // 2
    # the kernel's probabilities (prior_norm none: exp(log prior) = pbar) vs the reference
    sel = twin[3]
    for h in range(Hk):
        k = int(cnt[0, h])
        logical = [bt[0, :n].tolist().index(p) for p in ids[0, h, :k].tolist()]
        pbar = sel.mean_probs[0, h, logical]
        nonforced = torch.tensor([c != n - 1 for c in logical])
        torch.testing.assert_close(lp[0, h, :k].exp()[nonforced], pbar[nonforced],
                                   rtol=0, atol=PROB_ATOL)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25, 1.1, 1.75])
def test_entmax_probabilities_vs_entmax_package(alpha):
    """G = 1 (Hq = Hk), no forced block but the current one: exp(log prior) of every listed
    non-current block is the head's entmax probability, checked against the independent
    `entmax` package (entmax15 / sparsemax / entmax_bisect) to 1e-5."""
    entmax_pkg = pytest.importorskip("entmax")
    Hq = Hk = 2
    D, B = 32, 16
    lens = [50 * B, 37 * B + 2]
    q, summ, bt, lt = make_case(2, Hq, Hk, D, B, lens, seed=int(alpha * 100), q_scale=3.0)
    (ids, lp, cnt), twin, _ = check(q, summ, bt, lt, block_size=B, alpha=alpha)
    z = twin[3].scores.double()
    if alpha == 1.5:
        p_ref = entmax_pkg.entmax15(z, dim=-1)
    elif alpha == 2.0:
        p_ref = entmax_pkg.sparsemax(z, dim=-1)
    else:
        p_ref = entmax_pkg.entmax_bisect(z, alpha=alpha, dim=-1, n_iter=100)
    for s, L in enumerate(lens):
        n = -(-L // B)
        for h in range(Hk):
            k = int(cnt[s, h])
            logical = [bt[s, :n].tolist().index(p) for p in ids[s, h, :k].tolist()]
            got = lp[s, h, :k - 1].exp().double()
            torch.testing.assert_close(got, p_ref[s, h, logical[:-1]], rtol=0,
                                       atol=PROB_ATOL)
            # and every block the kernel did not list has probability 0 in the package
            rest = torch.ones(n, dtype=torch.bool)
            rest[logical] = False
            if rest.any():
                assert float(p_ref[s, h, :n][rest].max()) < 1e-6


def test_multi_tile_carries():
    """Small tiles: several tiles per pass, so the running counts (compaction position,
    floor ties, cap ties) carry across tiles."""
    Hq, Hk, D, B = 4, 2, 32, 16
    lens = [40 * B + 7, 21 * B]
    q, summ, bt, lt = make_case(2, Hq, Hk, D, B, lens, seed=21, q_scale=3.0)
    for kw in (dict(alpha=1.25, min_blocks=5, max_blocks=9, sink_blocks=1, local_blocks=2),
               dict(alpha=2.0, score_norm="standardize", min_blocks=3, prior_norm="max")):
        check(q, summ, bt, lt, block_size=B, tile=16, **kw)


def test_head_dim_not_power_of_two():
    Hq, Hk, D, B = 4, 2, 80, 16
    lens = [30 * B + 3, 7]
    q, summ, bt, lt = make_case(2, Hq, Hk, D, B, lens, seed=13, q_scale=3.0)
    check(q, summ, bt, lt, block_size=B, min_blocks=2)


def test_prefix_shared_blocks():
    """Sequences sharing their first physical blocks (prefix caching) select independently,
    each in its own logical order."""
    Hq, Hk, D, B = 8, 1, 32, 16
    lens = [12 * B + 3, 9 * B, 12 * B + 3]
    q, summ, bt, lt = make_case(3, Hq, Hk, D, B, lens, seed=5, shared_prefix=6)
    q[2] = q[0]                              # same query, same prefix, different suffix
    (ids, lp, cnt), _, _ = check(q, summ, bt, lt, block_size=B, min_blocks=2, sink_blocks=1)
    shared = set(bt[0, :6].tolist())
    a = [p for p in ids[0, 0, :int(cnt[0, 0])].tolist() if p in shared]
    assert a, "the shared prefix must be read by the first sequence"


def test_exact_ties_break_to_lower_block_id():
    """Identical summaries give exactly tied scores in both implementations: the floor and
    the cap must then keep the lowest logical blocks, as the reference's stable sorts.
    Blocks 2..5 are strong (entmax keeps them), 6..13 a tied middle level (entmax drops
    them; the floor takes the lowest), the rest weak."""
    Hq, Hk, D, B = 4, 2, 32, 16
    lens = [20 * B]
    q, summ, bt, lt = make_case(1, Hq, Hk, D, B, lens, seed=3)
    G = Hq // Hk
    phys = bt[0, :20].long()
    # dyadic q and +-1 directions: every product and partial sum is exact in fp32, so tied
    # blocks score bitwise equal whatever order a matmul sums in (the interpreter's numpy
    # matmul rounds identical columns differently on some CPUs)
    q = torch.round(q * 8) / 8
    qdir = torch.sign(q[0].float().view(Hk, G, D).sum(1))            # [Hk, D]
    summ[phys] = -2.0 * qdir                                        # weak
    summ[phys[2:6]] = 4.0 * qdir                                    # strong, tied
    summ[phys[6:14]] = 1.0 * qdir                                   # middle, tied
    cases = [
        (dict(score_scale=3.0), [2, 3, 4, 5, 19]),
        (dict(score_scale=3.0, min_blocks=6), [2, 3, 4, 5, 6, 7, 19]),
        (dict(score_scale=3.0, min_blocks=6, score_norm="standardize"),
         [2, 3, 4, 5, 6, 7, 19]),
        (dict(score_scale=3.0, max_blocks=3, sink_blocks=1), [0, 2, 19]),
        (dict(score_scale=3.0, max_blocks=7, min_blocks=7), [2, 3, 4, 5, 6, 7, 19]),
        (dict(score_scale=3.0, max_blocks=6, min_blocks=8, alpha=2.0), [2, 3, 4, 5, 6, 19]),
        (dict(score_scale=0.0, max_blocks=2, alpha=2.0), [0, 19]),
    ]
    for kw, want in cases:
        (ids, lp, cnt), _, _ = check(q, summ, bt, lt, block_size=B, check_margin=False, **kw)
        for h in range(Hk):
            got = [phys.tolist().index(p) for p in ids[0, h, :int(cnt[0, h])].tolist()]
            assert got == want, (kw, h, got)


def test_all_equal_scores_uniform():
    """score_scale 0 (or equal summaries under standardize) -> uniform entmax: everything
    selected with pbar = 1/n; the cap keeps the lowest ids after the forced ones."""
    Hq, Hk, D, B = 4, 2, 32, 16
    lens = [10 * B, 3 * B + 1]
    q, summ, bt, lt = make_case(2, Hq, Hk, D, B, lens, seed=8)
    for kw in (dict(score_scale=0.0), dict(score_scale=0.0, alpha=2.0, max_blocks=3,
                                           local_blocks=2, prior_norm="max")):
        (ids, lp, cnt), _, _ = check(q, summ, bt, lt, block_size=B, check_margin=False, **kw)
    summ_eq = summ.clone()
    summ_eq[:] = summ[0]
    (ids, lp, cnt), _, _ = check(q, summ_eq, bt, lt, block_size=B, check_margin=False,
                                 score_norm="standardize", alpha=1.25)
    assert cnt[0].tolist() == [10, 10]
    torch.testing.assert_close(lp[0, :, :9].exp(), torch.full((Hk, 9), 0.1), rtol=0,
                               atol=1e-6)


def test_random_data_boundary_flips_are_rare():
    """Plain random data (no margin check). Allowed: at most 2 flipped blocks, each at the
    entmax support boundary (reference probability < 1e-5)."""
    Hq, Hk, D, B = 8, 2, 64, 16
    lens = [60 * B + 3, 47 * B, 31 * B + 9, 64 * B]
    q, summ, bt, lt = make_case(4, Hq, Hk, D, B, lens, seed=99, q_scale=3.0)
    out = run_kernel(q, summ, bt, lt, block_size=B, alpha=1.5, min_blocks=2)
    twin = select_blocks_paged_torch(q=q, summaries=summ, block_table=bt, seq_lens=lt,
                                     block_size=B, alpha=1.5, min_blocks=2)
    ids, lp, cnt = out
    rids, rlp, rcnt, sel = twin
    flips = 0
    for s in range(4):
        n = int(sel.num_blocks[s])
        table = bt[s, :n].tolist()
        for h in range(Hk):
            got = set(ids[s, h, :int(cnt[s, h])].tolist())
            want = set(rids[s, h, :int(rcnt[s, h])].tolist())
            for p in got ^ want:
                assert float(sel.mean_probs[s, h, table.index(p)]) < 1e-5
                flips += 1
    assert flips <= 2


def test_padding_rows_and_dense():
    """seq_len 0 rows (a padded CUDA-graph batch) give count 0; dense_below lists every
    block with log prior 0."""
    Hq, Hk, D, B = 4, 2, 32, 16
    lens = [5 * B + 1, 0, 2 * B]
    q, summ, bt, lt = make_case(3, Hq, Hk, D, B, [5 * B + 1, 16, 2 * B], seed=2)
    lt = torch.tensor(lens, dtype=torch.int32)
    ids, lp, cnt = run_kernel(q, summ, bt, lt, block_size=B, dense_below=2 * B + 1)
    assert cnt[1].tolist() == [0, 0]
    assert cnt[2].tolist() == [2, 2]
    assert ids[2, :, :2].tolist() == [bt[2, :2].tolist()] * 2
    assert (lp[2, :, :2] == 0).all()


def test_workspace_reuse_and_capacity():
    Hq, Hk, D, B = 4, 2, 32, 16
    ws = SelectWorkspace(6, Hq, Hk, 16)
    for seed, lens in ((1, [7 * B, 3]), (2, [16 * B, 9 * B + 2, 40])):
        q, summ, bt, lt = make_case(len(lens), Hq, Hk, D, B, lens, seed=seed, nmax=16)
        out = run_kernel(q, summ, bt, lt, block_size=B, workspace=ws, cap_extra=1,
                         min_blocks=2)
        twin = select_blocks_paged_torch(q=q, summaries=summ, block_table=bt, seq_lens=lt,
                                         block_size=B, min_blocks=2)
        compare(out, twin, twin[3], bt, alpha=1.5)
    with pytest.raises(ValueError, match="workspace"):
        q, summ, bt, lt = make_case(2, Hq, Hk, D, B, [B, B], seed=1, nmax=17)
        run_kernel(q, summ, bt, lt, block_size=B, workspace=ws)


def test_argument_errors():
    Hq, Hk, D, B = 4, 2, 32, 16
    q, summ, bt, lt = make_case(2, Hq, Hk, D, B, [B, B], seed=1)
    with pytest.raises(ValueError, match="alpha"):
        run_kernel(q, summ, bt, lt, block_size=B, alpha=1.0)
    with pytest.raises(ValueError, match="max_blocks"):
        run_kernel(q, summ, bt, lt, block_size=B, max_blocks=1, sink_blocks=1)
    with pytest.raises(ValueError, match="summaries"):
        run_kernel(q, summ.half(), bt, lt, block_size=B)
    with pytest.raises(ValueError, match="query heads"):
        run_kernel(q[:, :3], summ, bt, lt, block_size=B)
    with pytest.raises(ValueError, match="out_counts"):
        select_blocks_paged(q=q, summaries=summ, block_table=bt, seq_lens=lt,
                            out_block_ids=torch.zeros(2, Hk, bt.shape[1], dtype=torch.int32),
                            out_log_prior=torch.zeros(2, Hk, bt.shape[1]),
                            out_counts=torch.zeros(2, Hk), params=DashParams(),
                            block_size=B)
    with pytest.raises(ValueError, match="out_counts_copy"):
        select_blocks_paged(q=q, summaries=summ, block_table=bt, seq_lens=lt,
                            out_block_ids=torch.zeros(2, Hk, bt.shape[1], dtype=torch.int32),
                            out_log_prior=torch.zeros(2, Hk, bt.shape[1]),
                            out_counts=torch.zeros(2, Hk, dtype=torch.int32), block_size=B,
                            params=DashParams(),
                            out_counts_copy=torch.zeros(2, Hk + 1, dtype=torch.int32))


# --------------------------------------------------------------------------------------
# the register-resident rows vs the tiled fallback, the radix select
# --------------------------------------------------------------------------------------
PATH_SETTINGS = [
    dict(alpha=1.25, min_blocks=5, max_blocks=9, sink_blocks=1, local_blocks=2),
    dict(alpha=2.0, score_norm="standardize", min_blocks=3, prior_norm="max"),
    dict(score_scale=1.5, max_blocks=6, min_blocks=30, dense_below=10 * 16),
]


@pytest.mark.parametrize("path", ["resident", "tile16", "fallback"])
def test_resident_and_tiled_paths(path, monkeypatch):
    """The same data through the three code paths of K2 / K3b: rows in registers (the
    default at these sizes), tiles forced by ``tile``, and the automatic fallback for rows
    longer than _RESIDENT_MAX (lowered here, with several fallback tiles per row).
    (tile=16 with the first two settings is test_multi_tile_carries.)"""
    import vllm_dash.kernels.select as sel_mod
    Hq, Hk, D, B = 8, 2, 32, 16
    lens = [50 * B + 5, 23 * B, 3 * B + 1, 0]
    q, summ, bt, lt = make_case(4, Hq, Hk, D, B, [max(L, 1) for L in lens], seed=31,
                                q_scale=3.0)
    lt = torch.tensor(lens, dtype=torch.int32)
    tile = 16 if path == "tile16" else None
    if path == "fallback":
        monkeypatch.setattr(sel_mod, "_RESIDENT_MAX", 32)
        monkeypatch.setattr(sel_mod, "_FALLBACK_TILE", 32)
    for kw in PATH_SETTINGS[2:] if path == "tile16" else PATH_SETTINGS:
        (ids, lp, cnt), _, _ = check(q[:3], summ, bt[:3], lt[:3], block_size=B, tile=tile,
                                     **kw)
    ids, lp, cnt = run_kernel(q, summ, bt, lt, block_size=B, tile=tile, **PATH_SETTINGS[0])
    assert cnt[3].tolist() == [0, 0]


def test_large_row_register_path():
    """A row of ~1500 blocks in registers (BLOCK 2048): floor ties and a binding cap over
    exactly tied scores at that size, and random data with a floor + cap."""
    Hq, Hk, D, B = 4, 1, 32, 16
    n = 1500
    lens = [n * B - 3]
    q, summ, bt, lt = make_case(1, Hq, Hk, D, B, lens, seed=77, q_scale=3.0)
    check(q, summ, bt, lt, block_size=B, min_blocks=9, max_blocks=40, sink_blocks=2,
          local_blocks=3, alpha=1.25, max_flips=2, check_margin=False)
    phys = bt[0, :n].long()
    q = torch.round(q * 8) / 8                        # exact ties: see the test above
    qdir = torch.sign(q[0].float().sum(0))
    summ[phys] = -2.0 * qdir                          # weak
    summ[phys[700:703]] = 4.0 * qdir                  # strong, tied
    summ[phys[100:1400:13]] = 1.0 * qdir              # middle level, tied
    middle = list(range(100, 1400, 13))
    for kw, want in (
        (dict(score_scale=3.0, min_blocks=7), sorted(middle[:4] + [700, 701, 702, n - 1])),
        (dict(score_scale=3.0, min_blocks=20, max_blocks=8, sink_blocks=1),
         sorted([0, 700, 701, 702] + middle[:3] + [n - 1])),
    ):
        (ids, lp, cnt), _, _ = check(q, summ, bt, lt, block_size=B, check_margin=False, **kw)
        got = [phys.tolist().index(p) for p in ids[0, 0, :int(cnt[0, 0])].tolist()]
        assert got == want, (kw, got)


@triton.jit
def _kth_kernel(key_ptr, valid_ptr, out_ptr, n_k, N: tl.constexpr, RB: tl.constexpr):
    i = tl.arange(0, N)
    key = tl.load(key_ptr + i)
    valid = tl.load(valid_ptr + i) != 0
    for k in range(1, n_k + 1):
        t, gt = _kth_largest(key, valid, k, RB)
        tl.store(out_ptr + 2 * (k - 1), t)
        tl.store(out_ptr + 2 * (k - 1) + 1, gt)


def test_kth_largest_radix_select():
    """kernels.select._kth_largest (radix select over int32 keys) vs torch: extreme keys,
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
            out = torch.zeros(2 * nv, dtype=torch.int32)
            _kth_kernel[(1,)](keys, valid, out, nv, N=N, RB=RB)
            vk = keys[valid.bool()].long().sort(descending=True).values
            for k in range(1, nv + 1):
                t = int(vk[k - 1])
                assert int(out[2 * (k - 1)]) == t, (RB, k)
                assert int(out[2 * (k - 1) + 1]) == int((vk > t).sum()), (RB, k)


# --------------------------------------------------------------------------------------
# selector "topk": the baseline (forced blocks + each head's min_blocks best, prior 1)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tile", [None, 16])
def test_topk_selector(tile):
    Hq, Hk, D, B = 8, 2, 32, 16
    lens = [50 * B + 5, 23 * B, 3 * B + 1]
    q, summ, bt, lt = make_case(3, Hq, Hk, D, B, lens, seed=41, q_scale=3.0)
    G = Hq // Hk
    for kw in (dict(min_blocks=4, sink_blocks=1, local_blocks=1),
               dict(min_blocks=6, score_norm="standardize", score_scale=2.0, sink_blocks=1,
                    local_blocks=2, max_blocks=9)):
        (ids, lp, cnt), twin, _ = check(q, summ, bt, lt, block_size=B, tile=tile,
                                        selector="topk", check_margin=False, **kw)
        sel = twin[3]
        for s, L in enumerate(lens):
            n = -(-L // B)
            table = bt[s, :n].tolist()
            for h in range(Hk):
                k = int(cnt[s, h])
                assert (lp[s, h, :k] == 0).all(), "top-k: flat prior"
                got = sorted(table.index(p) for p in ids[s, h, :k].tolist())
                # expected: forced blocks + union over the group of each head's top-k
                want = {n - 1} | set(range(min(kw["sink_blocks"], n))) | \
                    set(range(max(n - kw["local_blocks"], 0), n))
                z = sel.scores[s, h * G:(h + 1) * G, :n]
                kk = min(kw["min_blocks"], n)
                for g in range(G):
                    want |= set(torch.sort(z[g], descending=True, stable=True)
                                .indices[:kk].tolist())
                if "max_blocks" in kw and len(want) > kw["max_blocks"]:
                    assert k == kw["max_blocks"] and set(got) <= want
                else:
                    assert got == sorted(want), (s, h)
        # entmax would select a different set: the selector really changes something
        ent = run_kernel(q, summ, bt, lt, block_size=B, **kw)
        assert not torch.equal(ent[2], cnt) or not torch.equal(ent[0], ids)


def test_topk_needs_min_blocks():
    with pytest.raises(ValueError, match="min_blocks"):
        DashParams(selector="topk", min_blocks=0)
    with pytest.raises(ValueError, match="selector"):
        DashParams(selector="quest")
