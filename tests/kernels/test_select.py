"""kernels/select.py (stage 1) vs its twin reference.select_blocks_paged (the reference's
Selection in the kernel's compacted format), on the CPU under the Triton interpreter (small
shapes) and on a GPU (the same small cases, plus real shapes: D=128, 32/8 and 32/2 heads,
32K-128K contexts, B=64 and 16, fp16/bf16 queries, CUDA-graph capture and replay).

Exactness policy. The kernel's block set must equal the reference's exactly. The only
legitimate source of a difference is a block at the entmax support boundary: its
probability is ~0 in both (|y - tau| within the fp32 error of the two thresholds, ~1e-7),
so `pbar > 0` can flip. The exact comparisons therefore check, on the reference's own
numbers, that every valid block is at least MARGIN away from the threshold in every head.
Ranking ties of the floor / cap are either exact by construction (identical summaries,
dyadic queries: both sides see the same tie) or, in random data, far apart (a near-tie
would show as a mismatch). Plain random data and the real shapes (thousands of blocks per
sequence, where a block can sit within fp32 rounding of the threshold) allow a small,
documented number of boundary flips, each of which must be a block whose reference
probability is below 1e-5. Probabilities (exp of the log-prior) must match to 1e-5.
"""
import pytest
import torch

from kernel_helpers import (DEVICES, INTERPRETER_WARNINGS, PROB_ATOL, check_selection,
                            compare_selection, logical_ids, on_devices, run_select,
                            select_case, select_twin, split_params)
from vllm_dash.kernels.params import DashParams
from vllm_dash.kernels.select import SelectWorkspace, select_blocks_paged

pytestmark = INTERPRETER_WARNINGS
K = 1024


# --------------------------------------------------------------------------------------
# kernel == twin over the settings, with the compacted list's structure
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


def _small(i, kw):
    Hq, Hk, D, B = SHAPES[i % len(SHAPES)]
    return dict(Hq=Hq, Hk=Hk, D=D, B=B, lens=_lens(B, i), seed=100 + i, kw=kw,
                q_dtype=torch.bfloat16 if i % 5 == 4 else torch.float32, max_flips=0,
                guard=True, extra_blocks=8)


def _real(i, S, Hq, Hk, B, lens, q_dtype, kw):
    return dict(Hq=Hq, Hk=Hk, D=128, B=B, lens=lens, seed=i, kw=kw, q_dtype=q_dtype,
                max_flips=2 * S, guard=False, extra_blocks=16)


REAL = [
    (1, 32, 8, 64, [128 * K], torch.float16, dict()),
    (4, 32, 2, 16, [64 * K, 32 * K + 5, 50_000, 33_333], torch.bfloat16,
     dict(score_norm="standardize", score_scale=3.0, min_blocks=8, sink_blocks=1,
          local_blocks=1, prior_norm="max")),
    (32, 32, 8, 64, [32 * K - 64 * i - 7 * (i % 3) for i in range(32)], torch.bfloat16,
     dict(alpha=1.25, min_blocks=8, max_blocks=64, sink_blocks=1, local_blocks=2)),
    (8, 32, 8, 64, [96 * K + 1000 * i for i in range(8)], torch.float16,
     dict(alpha=2.0, prior_norm="max", dense_below=96 * K + 2500)),
    (4, 32, 8, 64, [128 * K, 64 * K + 7, 32 * K, 4096], torch.bfloat16,
     dict(selector="topk", min_blocks=16, sink_blocks=1, local_blocks=2,
          score_norm="standardize")),
]


def _check_structure(ids, lp, cnt, bt, lens, B, kw):
    """The current block is listed last, the list is in ascending logical order, and
    sequences below dense_below list every block with log prior 0."""
    ids, lp, cnt, bt = ids.cpu(), lp.cpu(), cnt.cpu(), bt.cpu()
    for s, L in enumerate(lens):
        n = -(-L // B)
        where = logical_ids(bt, s, n)
        for h in range(cnt.shape[1]):
            k = int(cnt[s, h])
            row = ids[s, h, :k].tolist()
            assert row[-1] == int(bt[s, n - 1]), "current block must be last"
            logical = [where[p] for p in row]
            assert logical == sorted(logical)
            if L < kw.get("dense_below", 0):
                assert k == n and (lp[s, h, :k] == 0).all()


def _check_features_act(q, summ, bt, lt, lens, B, kw, cnt, sel):
    """The setting's features really act on this data: entmax drops blocks, the floor
    adds some, the cap binds, dense_below lifts a sparse sequence to dense."""
    twin = dict(q=q, summaries=summ, block_table=bt, seq_lens=lt, block_size=B)
    base = {k: v for k, v in kw.items() if k not in ("max_blocks", "min_blocks", "dense_below")}
    cnt_base = select_twin(**twin, **base)[2]
    assert (cnt_base < sel.num_blocks[:, None]).any(), "entmax must drop blocks somewhere"
    if "min_blocks" in kw:
        nocap = {k: v for k, v in kw.items() if k != "max_blocks"}
        cnt_nocap = select_twin(**twin, **nocap)[2]
        assert (cnt_nocap > cnt_base).any(), "the floor must add blocks somewhere"
    else:
        cnt_nocap = cnt_base
    if "max_blocks" in kw:
        assert (cnt_nocap > kw["max_blocks"]).any(), "the cap must bind somewhere"
        assert (cnt <= kw["max_blocks"]).all()
    if kw.get("dense_below", 0) > 1:
        dense = [s for s, L in enumerate(lens) if L < kw["dense_below"]]
        assert any((cnt_base[s] < sel.num_blocks[s]).any() for s in dense)


@pytest.mark.parametrize("device,case", on_devices(
    cpu=[_small(i, kw) for i, kw in enumerate(SETTINGS)],
    cuda=[_real(i, *c) for i, c in enumerate(REAL)]))
def test_matches_twin(device, case):
    kw, B, lens = case["kw"], case["B"], case["lens"]
    q, summ, bt, lt = select_case(len(lens), case["Hq"], case["Hk"], case["D"], B, lens,
                                  seed=case["seed"], device=device, q_dtype=case["q_dtype"],
                                  extra_blocks=case["extra_blocks"])
    (ids, lp, cnt), twin, flips = check_selection(q, summ, bt, lt, block_size=B,
                                                  max_flips=case["max_flips"], **kw)
    sel = twin[3]
    _check_structure(ids, lp, cnt, bt, lens, B, kw)
    if case["guard"]:
        _check_features_act(q, summ, bt, lt, lens, B, kw, cnt, sel)
    density = (cnt.float().mean(1) / sel.num_blocks.float()).mean().item()
    print(f"\n{device} S={len(lens)} {case['Hq']}/{case['Hk']} B={B} n_max={bt.shape[1]} "
          f"{kw}: mean density {density:.3f}, boundary flips {flips}")


# --------------------------------------------------------------------------------------
# small cases (both devices)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_sparse_enough_to_matter(device):
    """Guard for the data above: the settings must really drop blocks somewhere."""
    Hq, Hk, D, B = SHAPES[0]
    lens = [40 * B + 3]
    q, summ, bt, lt = select_case(1, Hq, Hk, D, B, lens, seed=7, q_scale=4.0, device=device)
    (ids, lp, cnt), twin, _ = check_selection(q, summ, bt, lt, block_size=B)
    n = 41
    assert int(cnt.max()) < n // 2
    # the kernel's probabilities (prior_norm none: exp(log prior) = pbar) vs the reference
    sel = twin[3]
    where = logical_ids(bt.cpu(), 0, n)
    for h in range(Hk):
        k = int(cnt[0, h])
        logical = [where[p] for p in ids[0, h, :k].tolist()]
        pbar = sel.mean_probs[0, h, logical].cpu()
        nonforced = torch.tensor([c != n - 1 for c in logical])
        torch.testing.assert_close(lp[0, h, :k].exp().cpu()[nonforced], pbar[nonforced],
                                   rtol=0, atol=PROB_ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25, 1.1, 1.75])
def test_entmax_probabilities_vs_entmax_package(device, alpha):
    """G = 1 (Hq = Hk), no forced block but the current one: exp(log prior) of every listed
    non-current block is the head's entmax probability, checked against the independent
    `entmax` package (entmax15 / sparsemax / entmax_bisect) to 1e-5."""
    entmax_pkg = pytest.importorskip("entmax")
    Hq = Hk = 2
    D, B = 32, 16
    lens = [50 * B, 37 * B + 2]
    q, summ, bt, lt = select_case(2, Hq, Hk, D, B, lens, seed=int(alpha * 100), q_scale=3.0,
                                  device=device)
    (ids, lp, cnt), twin, _ = check_selection(q, summ, bt, lt, block_size=B, alpha=alpha)
    z = twin[3].scores.double().cpu()
    if alpha == 1.5:
        p_ref = entmax_pkg.entmax15(z, dim=-1)
    elif alpha == 2.0:
        p_ref = entmax_pkg.sparsemax(z, dim=-1)
    else:
        p_ref = entmax_pkg.entmax_bisect(z, alpha=alpha, dim=-1, n_iter=100)
    ids, lp, cnt, bt = ids.cpu(), lp.cpu(), cnt.cpu(), bt.cpu()
    for s, L in enumerate(lens):
        n = -(-L // B)
        where = logical_ids(bt, s, n)
        for h in range(Hk):
            k = int(cnt[s, h])
            logical = [where[p] for p in ids[s, h, :k].tolist()]
            got = lp[s, h, :k - 1].exp().double()
            torch.testing.assert_close(got, p_ref[s, h, logical[:-1]], rtol=0,
                                       atol=PROB_ATOL)
            # and every block the kernel did not list has probability 0 in the package
            rest = torch.ones(n, dtype=torch.bool)
            rest[logical] = False
            if rest.any():
                assert float(p_ref[s, h, :n][rest].max()) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_multi_tile_carries(device):
    """Small tiles: several tiles per pass, so the running counts (compaction position,
    floor ties, cap ties) carry across tiles."""
    Hq, Hk, D, B = 4, 2, 32, 16
    lens = [40 * B + 7, 21 * B]
    q, summ, bt, lt = select_case(2, Hq, Hk, D, B, lens, seed=21, q_scale=3.0, device=device)
    for kw in (dict(alpha=1.25, min_blocks=5, max_blocks=9, sink_blocks=1, local_blocks=2),
               dict(alpha=2.0, score_norm="standardize", min_blocks=3, prior_norm="max")):
        check_selection(q, summ, bt, lt, block_size=B, tile=16, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_head_dim_not_power_of_two(device):
    Hq, Hk, D, B = 4, 2, 80, 16
    lens = [30 * B + 3, 7]
    q, summ, bt, lt = select_case(2, Hq, Hk, D, B, lens, seed=13, q_scale=3.0, device=device)
    check_selection(q, summ, bt, lt, block_size=B, min_blocks=2)


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_shared_blocks(device):
    """Sequences sharing their first physical blocks (prefix caching) select independently,
    each in its own logical order."""
    Hq, Hk, D, B = 8, 1, 32, 16
    lens = [12 * B + 3, 9 * B, 12 * B + 3]
    q, summ, bt, lt = select_case(3, Hq, Hk, D, B, lens, seed=5, shared_prefix=6,
                                  device=device)
    q[2] = q[0]                              # same query, same prefix, different suffix
    (ids, lp, cnt), _, _ = check_selection(q, summ, bt, lt, block_size=B, min_blocks=2,
                                           sink_blocks=1)
    shared = set(bt[0, :6].tolist())
    a = [p for p in ids[0, 0, :int(cnt[0, 0])].tolist() if p in shared]
    assert a, "the shared prefix must be read by the first sequence"


def _dyadic_directions(q, Hk):
    """Dyadic q and +-1 directions (per KV head): every product and partial sum is exact in
    fp32, so tied blocks score bitwise equal whatever order a matmul sums in (the
    interpreter's numpy matmul rounds identical columns differently on some CPUs)."""
    q = torch.round(q * 8) / 8
    G = q.shape[1] // Hk
    return q, torch.sign(q[0].float().view(Hk, G, -1).sum(1))        # [Hk, D]


def _expect_kept(q, summ, bt, lt, B, n, cases):
    """For each (settings, want) of a one-sequence batch: kernel == twin exactly (no margin
    check: the data tie on purpose) and every KV head keeps the logical blocks ``want``."""
    where = logical_ids(bt.cpu(), 0, n)
    for kw, want in cases:
        (ids, lp, cnt), _, _ = check_selection(q, summ, bt, lt, block_size=B,
                                               check_margin=False, **kw)
        for h in range(cnt.shape[1]):
            got = [where[p] for p in ids[0, h, :int(cnt[0, h])].tolist()]
            assert got == want, (kw, h, got)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_ties_break_to_lower_block_id(device):
    """Identical summaries give exactly tied scores in both implementations: the floor and
    the cap must then keep the lowest logical blocks, as the reference's stable sorts.
    Blocks 2..5 are strong (entmax keeps them), 6..13 a tied middle level (entmax drops
    them; the floor takes the lowest), the rest weak."""
    Hq, Hk, D, B = 4, 2, 32, 16
    lens = [20 * B]
    q, summ, bt, lt = select_case(1, Hq, Hk, D, B, lens, seed=3, device=device)
    phys = bt[0, :20].long()
    q, qdir = _dyadic_directions(q, Hk)
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
    _expect_kept(q, summ, bt, lt, B, 20, cases)


@pytest.mark.parametrize("device", DEVICES)
def test_all_equal_scores_uniform(device):
    """score_scale 0 (or equal summaries under standardize) -> uniform entmax: everything
    selected with pbar = 1/n; the cap keeps the lowest ids after the forced ones."""
    Hq, Hk, D, B = 4, 2, 32, 16
    lens = [10 * B, 3 * B + 1]
    q, summ, bt, lt = select_case(2, Hq, Hk, D, B, lens, seed=8, device=device)
    for kw in (dict(score_scale=0.0), dict(score_scale=0.0, alpha=2.0, max_blocks=3,
                                           local_blocks=2, prior_norm="max")):
        check_selection(q, summ, bt, lt, block_size=B, check_margin=False, **kw)
    summ_eq = summ.clone()
    summ_eq[:] = summ[0]
    (ids, lp, cnt), _, _ = check_selection(q, summ_eq, bt, lt, block_size=B,
                                           check_margin=False, score_norm="standardize",
                                           alpha=1.25)
    assert cnt[0].tolist() == [10, 10]
    torch.testing.assert_close(lp[0, :, :9].exp().cpu(), torch.full((Hk, 9), 0.1), rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_random_data_boundary_flips_are_rare(device):
    """Plain random data (no margin check). Allowed: at most 2 flipped blocks, each at the
    entmax support boundary (reference probability < 1e-5)."""
    Hq, Hk, D, B = 8, 2, 64, 16
    lens = [60 * B + 3, 47 * B, 31 * B + 9, 64 * B]
    q, summ, bt, lt = select_case(4, Hq, Hk, D, B, lens, seed=99, q_scale=3.0, device=device)
    check_selection(q, summ, bt, lt, block_size=B, alpha=1.5, min_blocks=2, max_flips=2)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_rows_and_dense(device):
    """seq_len 0 rows (a padded CUDA-graph batch) give count 0; dense_below lists every
    block with log prior 0."""
    Hq, Hk, D, B = 4, 2, 32, 16
    q, summ, bt, _ = select_case(3, Hq, Hk, D, B, [5 * B + 1, 16, 2 * B], seed=2,
                                 device=device)
    lt = torch.tensor([5 * B + 1, 0, 2 * B], dtype=torch.int32, device=device)
    ids, lp, cnt = run_select(q, summ, bt, lt, block_size=B, dense_below=2 * B + 1)
    assert cnt[1].tolist() == [0, 0]
    assert cnt[2].tolist() == [2, 2]
    assert ids[2, :, :2].tolist() == [bt[2, :2].tolist()] * 2
    assert (lp[2, :, :2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_workspace_reuse_and_capacity(device):
    Hq, Hk, D, B = 4, 2, 32, 16
    ws = SelectWorkspace(6, Hq, Hk, 16, device=device)
    for seed, lens in ((1, [7 * B, 3]), (2, [16 * B, 9 * B + 2, 40])):
        q, summ, bt, lt = select_case(len(lens), Hq, Hk, D, B, lens, seed=seed, nmax=16,
                                      device=device)
        out = run_select(q, summ, bt, lt, block_size=B, workspace=ws, cap_extra=1,
                         min_blocks=2)
        twin = select_twin(q=q, summaries=summ, block_table=bt, seq_lens=lt, block_size=B,
                           min_blocks=2)
        compare_selection(out, twin, bt, alpha=1.5)
    with pytest.raises(ValueError, match="workspace"):
        q, summ, bt, lt = select_case(2, Hq, Hk, D, B, [B, B], seed=1, nmax=17, device=device)
        run_select(q, summ, bt, lt, block_size=B, workspace=ws)


@pytest.mark.parametrize("device", DEVICES)
def test_argument_errors(device):
    Hq, Hk, D, B = 4, 2, 32, 16
    q, summ, bt, lt = select_case(2, Hq, Hk, D, B, [B, B], seed=1, device=device)
    with pytest.raises(ValueError, match="alpha"):
        run_select(q, summ, bt, lt, block_size=B, alpha=1.0)
    with pytest.raises(ValueError, match="max_blocks"):
        run_select(q, summ, bt, lt, block_size=B, max_blocks=1, sink_blocks=1)
    with pytest.raises(ValueError, match="summaries"):
        run_select(q, summ.half(), bt, lt, block_size=B)
    with pytest.raises(ValueError, match="query heads"):
        run_select(q[:, :3], summ, bt, lt, block_size=B)
    ids = torch.zeros(2, Hk, bt.shape[1], dtype=torch.int32, device=device)
    lp = torch.zeros(2, Hk, bt.shape[1], device=device)
    base = dict(q=q, summaries=summ, block_table=bt, seq_lens=lt, out_block_ids=ids,
                out_log_prior=lp, params=DashParams(), block_size=B)
    with pytest.raises(ValueError, match="out_counts"):
        select_blocks_paged(**base, out_counts=torch.zeros(2, Hk, device=device))
    with pytest.raises(ValueError, match="out_counts_copy"):
        select_blocks_paged(**base, out_counts=torch.zeros(2, Hk, dtype=torch.int32,
                                                           device=device),
                            out_counts_copy=torch.zeros(2, Hk + 1, dtype=torch.int32,
                                                        device=device))


# --------------------------------------------------------------------------------------
# the register-resident rows vs the tiled loops
# --------------------------------------------------------------------------------------
PATH_SETTINGS = [
    dict(alpha=1.25, min_blocks=5, max_blocks=9, sink_blocks=1, local_blocks=2),
    dict(alpha=2.0, score_norm="standardize", min_blocks=3, prior_norm="max"),
    dict(score_scale=1.5, max_blocks=6, min_blocks=30, dense_below=10 * 16),
]
# small rows: (path, tile, resident limit, settings); the last sequence is a padding row.
# (tile=16 with the first two settings is test_multi_tile_carries.)
SMALL_PATHS = [dict(path=p, tile=t, limit=m, settings=st, Hq=8, Hk=2, D=32, B=16,
                    lens=[50 * 16 + 5, 23 * 16, 3 * 16 + 1, 0], seed=31, q_scale=3.0,
                    q_dtype=torch.float32, extra_blocks=8, max_flips=0)
               for p, t, m, st in (("resident", None, None, PATH_SETTINGS),
                                   ("tile16", 16, None, PATH_SETTINGS[2:]),
                                   ("fallback", None, 32, PATH_SETTINGS))]
REAL_PATHS = [dict(path=p, tile=t, limit=m, Hq=32, Hk=8, D=128, B=64,
                   lens=[64 * K, 40_000], seed=11, q_scale=2.0, q_dtype=torch.bfloat16,
                   extra_blocks=16, max_flips=4,
                   settings=[dict(alpha=1.25, min_blocks=8, max_blocks=64, sink_blocks=1,
                                  local_blocks=2, score_norm="standardize",
                                  score_scale=2.0)])
              for p, t, m in (("tile64", 64, None), ("fallback", None, 256))]


@pytest.mark.parametrize("device,case", on_devices(cpu=SMALL_PATHS, cuda=REAL_PATHS))
def test_resident_and_tiled_paths(device, case, monkeypatch):
    """The same data through the code paths of K2 / K3b: rows in registers (the default at
    these sizes), tiles forced by ``tile``, and the automatic fallback for rows longer than
    _RESIDENT_MAX (lowered here, with several fallback tiles per row)."""
    import vllm_dash.kernels.select as sel_mod
    if case["limit"]:
        monkeypatch.setattr(sel_mod, "_RESIDENT_MAX", case["limit"])
        monkeypatch.setattr(sel_mod, "_FALLBACK_TILE", case["limit"])
    lens, B, tile = case["lens"], case["B"], case["tile"]
    q, summ, bt, _ = select_case(len(lens), case["Hq"], case["Hk"], case["D"], B,
                                 [max(L, 1) for L in lens], seed=case["seed"], device=device,
                                 q_scale=case["q_scale"], q_dtype=case["q_dtype"],
                                 extra_blocks=case["extra_blocks"])
    lt = torch.tensor(lens, dtype=torch.int32, device=device)
    active = sum(L > 0 for L in lens)                     # padding rows last
    for kw in case["settings"]:
        check_selection(q[:active], summ, bt[:active], lt[:active], block_size=B, tile=tile,
                        max_flips=case["max_flips"], **kw)
    if active < len(lens):
        ids, lp, cnt = run_select(q, summ, bt, lt, block_size=B, tile=tile,
                                  **case["settings"][0])
        assert (cnt[active:] == 0).all()


SMALL_ROW = dict(Hq=4, Hk=1, D=32, B=16, n=1500, tail=3, seed=77, q_scale=3.0,
                 q_dtype=torch.float32, extra_blocks=8, dyadic=True, strong=(700, 703),
                 middle=list(range(100, 1400, 13)),
                 random=dict(min_blocks=9, max_blocks=40, sink_blocks=2, local_blocks=3,
                             alpha=1.25),
                 ties=[(dict(score_scale=3.0, min_blocks=7), 4, False),
                       (dict(score_scale=3.0, min_blocks=20, max_blocks=8, sink_blocks=1),
                        3, True)])
REAL_ROW = dict(Hq=32, Hk=8, D=128, B=64, n=2048, tail=0, seed=5, q_scale=2.0,
                q_dtype=torch.float16, extra_blocks=16, dyadic=False, strong=(900, 903),
                middle=list(range(100, 2000, 7)), random=None,
                ties=[(dict(score_scale=3.0, min_blocks=20, max_blocks=10, sink_blocks=1),
                       5, True)])


@pytest.mark.parametrize("device,case", on_devices(cpu=[SMALL_ROW], cuda=[REAL_ROW]))
def test_large_row_register_path(device, case):
    """A row of 1500-2048 blocks in registers (radix select): random data with a floor and
    a cap, then floor ties and a binding cap over exactly tied scores at that size; the
    floor and the cap keep the lowest logical blocks, as the reference. ``ties`` rows:
    (settings, middle-level blocks kept, sink block kept)."""
    Hq, Hk, D, B, n = case["Hq"], case["Hk"], case["D"], case["B"], case["n"]
    q, summ, bt, lt = select_case(1, Hq, Hk, D, B, [n * B - case["tail"]], seed=case["seed"],
                                  q_scale=case["q_scale"], q_dtype=case["q_dtype"],
                                  extra_blocks=case["extra_blocks"], device=device)
    if case["random"]:
        check_selection(q, summ, bt, lt, block_size=B, max_flips=2, check_margin=False,
                        **case["random"])
    phys = bt[0, :n].long()
    if case["dyadic"]:
        q, qdir = _dyadic_directions(q, Hk)
    else:
        qdir = q[0].float().view(Hk, Hq // Hk, D).sum(1)
        qdir = qdir / qdir.norm(dim=-1, keepdim=True)
    lo, hi = case["strong"]
    summ[phys] = -2.0 * qdir                          # weak
    summ[phys[lo:hi]] = 4.0 * qdir                    # strong, tied
    summ[phys[case["middle"]]] = 1.0 * qdir           # middle level, tied
    _expect_kept(q, summ, bt, lt, B, n, [
        (kw, sorted(([0] if sink else []) + list(range(lo, hi)) + case["middle"][:n_middle]
                    + [n - 1]))
        for kw, n_middle, sink in case["ties"]])


# --------------------------------------------------------------------------------------
# selector "topk": the baseline (forced blocks + each head's min_blocks best, prior 1)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [None, 16])
def test_topk_selector(device, tile):
    Hq, Hk, D, B = 8, 2, 32, 16
    lens = [50 * B + 5, 23 * B, 3 * B + 1]
    q, summ, bt, lt = select_case(3, Hq, Hk, D, B, lens, seed=41, q_scale=3.0, device=device)
    G = Hq // Hk
    for kw in (dict(min_blocks=4, sink_blocks=1, local_blocks=1),
               dict(min_blocks=6, score_norm="standardize", score_scale=2.0, sink_blocks=1,
                    local_blocks=2, max_blocks=9)):
        (ids, lp, cnt), twin, _ = check_selection(q, summ, bt, lt, block_size=B, tile=tile,
                                                  selector="topk", check_margin=False, **kw)
        z_all = twin[3].scores.cpu()
        for s, L in enumerate(lens):
            n = -(-L // B)
            where = logical_ids(bt.cpu(), s, n)
            for h in range(Hk):
                k = int(cnt[s, h])
                assert (lp[s, h, :k] == 0).all(), "top-k: flat prior"
                got = sorted(where[p] for p in ids[s, h, :k].tolist())
                # expected: forced blocks + union over the group of each head's top-k
                want = {n - 1} | set(range(min(kw["sink_blocks"], n))) | \
                    set(range(max(n - kw["local_blocks"], 0), n))
                z = z_all[s, h * G:(h + 1) * G, :n]
                kk = min(kw["min_blocks"], n)
                for g in range(G):
                    want |= set(torch.sort(z[g], descending=True, stable=True)
                                .indices[:kk].tolist())
                if "max_blocks" in kw and len(want) > kw["max_blocks"]:
                    assert k == kw["max_blocks"] and set(got) <= want
                else:
                    assert got == sorted(want), (s, h)
        # entmax would select a different set: the selector really changes something
        ent = run_select(q, summ, bt, lt, block_size=B, **kw)
        assert not torch.equal(ent[2], cnt) or not torch.equal(ent[0], ids)


def test_topk_needs_min_blocks():
    with pytest.raises(ValueError, match="min_blocks"):
        DashParams(selector="topk", min_blocks=0)
    with pytest.raises(ValueError, match="selector"):
        DashParams(selector="quest")


# --------------------------------------------------------------------------------------
# CUDA graphs (GPU only)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cuda_graph_capture_and_replay(device):
    """Capture one select call with static buffers; replay after changing q and seq_lens
    in place; each replay must equal the reference on the new contents."""
    S_cap, Hq, Hk, D, B = 8, 32, 8, 128, 64
    nmax = 512                                       # 32K tokens
    kw = dict(block_size=B, min_blocks=4, sink_blocks=1, local_blocks=1,
              score_norm="standardize", score_scale=2.0)
    q, summ, bt, lt = select_case(S_cap, Hq, Hk, D, B, [nmax * B] * S_cap, seed=7,
                                  q_dtype=torch.bfloat16, extra_blocks=16, device=device)
    ids = torch.full((S_cap, Hk, nmax), -1, dtype=torch.int32, device=device)
    lp = torch.zeros(S_cap, Hk, nmax, device=device)
    cnt = torch.zeros(S_cap, Hk, dtype=torch.int32, device=device)
    ws = SelectWorkspace(S_cap, Hq, Hk, nmax, device=device)
    params, rest = split_params(kw)

    def call():
        select_blocks_paged(q=q, summaries=summ, block_table=bt, seq_lens=lt,
                            out_block_ids=ids, out_log_prior=lp, out_counts=cnt,
                            workspace=ws, params=params, **rest)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()                                        # compile + warm up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    g = torch.Generator(device=device).manual_seed(123)
    for it in range(3):
        q.copy_((torch.randn(q.shape, generator=g, device=device) * (1.5 + it)).to(q.dtype))
        new_lens = torch.randint(1, nmax * B + 1, (S_cap,), generator=g, device=device)
        lt.copy_(new_lens.to(torch.int32))
        cnt.fill_(-5)
        graph.replay()
        torch.cuda.synchronize()
        twin = select_twin(q=q, summaries=summ, block_table=bt, seq_lens=lt, **kw)
        compare_selection((ids, lp, cnt), twin, bt, alpha=1.5, max_flips=S_cap)
