"""kernels/decode.py (stage 2: split-KV sparse paged decode + reduce) under the Triton
interpreter, against its torch twin and against reference.sparse_attention / select_blocks.

Unused cache slots (the current block's unwritten tail, unreferenced blocks) hold NaN, so any
read of them shows up in the output; the reference gets a NaN-free copy (it multiplies absent
slots by 0, which NaN would survive).
"""

import pytest
import torch

from vllm_dash.kernels import reference as ref
from vllm_dash.kernels import decode as dec
from dense_fill import fill_dense_selection
from vllm_dash.kernels.decode import DecodeWorkspace, choose_num_splits, sparse_decode
from vllm_dash.kernels.params import DashParams

pytestmark = pytest.mark.filterwarnings(
    # Triton 3.6's interpreter converts 1-element arrays to int (numpy deprecation)
    "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def make_paged(lens, Hk, D, B, dtype, layout="nhd", extra_blocks=3, seed=0):
    """Paged K/V caches with NaN in every slot no sequence owns, a shuffled block table and
    the index of one all-NaN block (used to poison unused list entries)."""
    g = torch.Generator().manual_seed(seed)
    S = len(lens)
    n = [-(-L // B) for L in lens]
    nb = sum(n) + extra_blocks
    shape = (nb, B, Hk, D) if layout == "nhd" else (nb, Hk, B, D)
    kc = torch.full(shape, float("nan"), dtype=dtype)
    vc = torch.full(shape, float("nan"), dtype=dtype)
    k_view = kc if layout == "nhd" else kc.transpose(1, 2)       # [nb, B, Hk, D] view
    v_view = vc if layout == "nhd" else vc.transpose(1, 2)
    perm = torch.randperm(nb, generator=g)
    max_blocks = max(n) + 2
    bt = torch.full((S, max_blocks), int(perm[-1]), dtype=torch.int32)   # stale tail entries
    pos = 0
    for s, L in enumerate(lens):
        ids = perm[pos:pos + n[s]]
        pos += n[s]
        bt[s, :n[s]] = ids.to(torch.int32)
        for c, b in enumerate(ids.tolist()):
            fill = min(B, L - c * B)
            k_view[b, :fill] = torch.randn(fill, Hk, D, generator=g).to(dtype)
            v_view[b, :fill] = torch.randn(fill, Hk, D, generator=g).to(dtype)
    nan_block = int(perm[-1])
    return k_view, v_view, bt, nan_block


def random_selection(lens, Hk, B, density, seed=0):
    """A reference Selection: each block kept with probability `density`, the current block
    always (forced, prior 1), random priors in (0.05, 1] for the others."""
    g = torch.Generator().manual_seed(seed + 1)
    S = len(lens)
    lens_t = torch.tensor(lens, dtype=torch.long)
    n = (lens_t + B - 1) // B
    n_max = int(n.max())
    c = torch.arange(n_max)
    valid = c[None, :] < n[:, None]
    selected = (torch.rand(S, Hk, n_max, generator=g) < density) & valid[:, None, :]
    current = (c[None, :] == (n - 1)[:, None])[:, None, :].expand(S, Hk, n_max)
    selected |= current
    prior = 0.05 + 0.95 * torch.rand(S, Hk, n_max, generator=g)
    prior = torch.where(current, torch.ones_like(prior), prior)
    prior = torch.where(selected, prior, torch.zeros_like(prior))
    dummy = torch.zeros(S, Hk, n_max)
    return ref.Selection(selected=selected, prior=prior, probs=dummy, mean_probs=dummy,
                         scores=dummy, num_blocks=n, seq_lens=lens_t,
                         dense=torch.zeros(S, dtype=torch.bool), block_size=B)


def to_compact(sel, block_table, S_cap, max_blocks, poison_block):
    """Reference Selection -> (block_ids int32, log_prior fp32, counts int32), the stage-1
    output format: physical ids in ascending logical order, current block last. Entries past
    counts point at an all-NaN block (log prior NaN); rows past S are garbage."""
    S, Hk, n_max = sel.selected.shape
    ids = torch.full((S_cap, Hk, max_blocks), poison_block, dtype=torch.int32)
    lp = torch.full((S_cap, Hk, max_blocks), float("nan"), dtype=torch.float32)
    counts = torch.full((S_cap, Hk), 10**6, dtype=torch.int32)
    tiny = torch.finfo(torch.float32).tiny
    for s in range(S):
        for h in range(Hk):
            logical = sel.selected[s, h].nonzero().flatten()
            k = logical.numel()
            ids[s, h, :k] = block_table[s, logical].to(torch.int32)
            lp[s, h, :k] = sel.prior[s, h, logical].clamp_min(tiny).log()
            counts[s, h] = k
    return ids, lp, counts


def reference_out(q, kc, vc, bt, lens, sel, prior_weight, scale=None):
    k = ref.gather_paged(torch.nan_to_num(kc, nan=0.0), bt, lens)
    v = ref.gather_paged(torch.nan_to_num(vc, nan=0.0), bt, lens)
    return ref.sparse_attention(q, k, v, sel, params=DashParams(prior_weight=prior_weight),
                                scale=scale)


def run_both(q, kc, vc, ids, lp, counts, lens_t, B, prior_weight=1.0, **kw):
    """The kernel and its twin (reference.sparse_decode) on the same compacted selection."""
    params = DashParams(prior_weight=prior_weight)
    out = torch.full_like(q, float("nan"))
    sparse_decode(q=q, key_cache=kc, value_cache=vc, block_ids=ids, log_prior=lp, counts=counts,
                  seq_lens=lens_t, out=out, params=params, block_size=B, **kw)
    twin = torch.full_like(q, float("nan"))
    ref.sparse_decode(q=q, key_cache=kc, value_cache=vc, block_ids=ids, log_prior=lp,
                      counts=counts, seq_lens=lens_t, out=twin, params=params, block_size=B,
                      **kw)
    return out, twin


def lens_for(B):
    # L < B, ragged partial block, a multiple of B, a single full block, a longer one
    return [3, 2 * B + 5, 4 * B, B, 6 * B + 1]


# --------------------------------------------------------------------------------------
# sparse path vs twin and reference
# --------------------------------------------------------------------------------------
CASES = [
    # Hq, Hk, D,  B, layout, dtype, prior_weight, num_splits, density
    (4, 2, 32, 16, "nhd", torch.float32, 1.0, 1, 0.5),
    (4, 2, 64, 64, "hnd", torch.float32, 0.5, 3, 0.3),
    (8, 1, 32, 64, "nhd", torch.float32, 0.0, 2, 0.7),
    (8, 1, 64, 16, "hnd", torch.float32, 1.0, 4, 0.2),
    (4, 2, 64, 16, "nhd", torch.bfloat16, 0.5, 2, 0.5),
    (8, 1, 32, 64, "hnd", torch.bfloat16, 1.0, 1, 1.0),
    (4, 2, 32, 64, "nhd", torch.float16, 1.0, 2, 0.4),
    (8, 1, 64, 16, "nhd", torch.float32, 0.5, 16, 0.1),   # more splits than listed blocks
    (6, 2, 40, 16, "hnd", torch.float32, 0.5, 2, 0.5),    # head size and G not powers of 2
]


@pytest.mark.parametrize("Hq,Hk,D,B,layout,dtype,pw,ns,density", CASES)
def test_sparse_decode_matches_twin_and_reference(Hq, Hk, D, B, layout, dtype, pw, ns, density):
    lens = lens_for(B)
    S = len(lens)
    kc, vc, bt, nan_block = make_paged(lens, Hk, D, B, dtype, layout, seed=Hq + D + B)
    q = torch.randn(S, Hq, D, generator=torch.Generator().manual_seed(7)).to(dtype)
    sel = random_selection(lens, Hk, B, density, seed=D)
    ids, lp, counts = to_compact(sel, bt, S + 2, bt.shape[1] + 1, nan_block)
    lens_t = torch.tensor(lens + [0, 0], dtype=torch.int32)     # capacity rows past S
    out, twin = run_both(q, kc, vc, ids, lp, counts, lens_t, B, prior_weight=pw, num_splits=ns)
    want = reference_out(q, kc, vc, bt, lens, sel, pw)
    tol = TOL[dtype]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(twin.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), twin.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)


def test_split_counts_agree_and_workspace_is_reused():
    """1, 2, 5, 12 and 16 splits (incl. splits > listed blocks) give the same output; a
    workspace is used as is (no allocation); with fewer sequences than its max_num_seqs it
    holds more than max_splits splits (rows = max_num_seqs * max_splits)."""
    B, Hk, Hq, D = 16, 2, 4, 32
    lens = [B * 5 + 2, 7, B * 3]
    kc, vc, bt, nan_block = make_paged(lens, Hk, D, B, torch.float32)
    q = torch.randn(len(lens), Hq, D)
    sel = random_selection(lens, Hk, B, 0.6, seed=3)
    ids, lp, counts = to_compact(sel, bt, 4, bt.shape[1], nan_block)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    ws = DecodeWorkspace(max_num_seqs=4, num_q_heads=Hq, head_size=D, max_splits=12)
    po_ptr = ws.partial_out.data_ptr()
    outs = []
    for ns in (1, 2, 5, 12, 16, None):
        out, twin = run_both(q, kc, vc, ids, lp, counts, lens_t, B, num_splits=ns,
                             workspace=ws)
        outs.append(out)
    assert ws.partial_out.data_ptr() == po_ptr
    # no workspace (allocated per call); 20 splits: the reduce walks them in chunks of 16
    outs.append(run_both(q, kc, vc, ids, lp, counts, lens_t, B, num_splits=20)[0])
    for out in outs:
        torch.testing.assert_close(out, twin, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="workspace"):
        run_both(q, kc, vc, ids, lp, counts, lens_t, B, num_splits=17, workspace=ws)


def test_zero_count_rows_give_zeros():
    """A (sequence, KV head) with no listed block (e.g. a padded CUDA-graph row) writes 0."""
    B, Hk, Hq, D = 16, 2, 4, 32
    lens = [B * 3, 5]
    kc, vc, bt, nan_block = make_paged(lens, Hk, D, B, torch.float32)
    q = torch.randn(2, Hq, D)
    sel = random_selection(lens, Hk, B, 0.5, seed=5)
    ids, lp, counts = to_compact(sel, bt, 2, bt.shape[1], nan_block)
    counts[1] = 0
    lens_t = torch.tensor(lens, dtype=torch.int32)
    for ns in (1, 3):
        out, twin = run_both(q, kc, vc, ids, lp, counts, lens_t, B, num_splits=ns)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out, twin, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------
# with the reference's own stage 1
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,pw,prior_norm", [("nhd", 1.0, "none"), ("hnd", 0.5, "max")])
def test_with_reference_select_blocks(layout, pw, prior_norm):
    """reference.dash_attention_paged (summaries + entmax selection + stage 2) equals our
    stage 2 fed with its selection converted to the compacted format."""
    B, Hk, Hq, D = 16, 2, 8, 32
    lens = [B * 12 + 3, B * 9, 11]
    kc, vc, bt, nan_block = make_paged(lens, Hk, D, B, torch.float32, layout, seed=11)
    q = torch.randn(len(lens), Hq, D, generator=torch.Generator().manual_seed(2)) * 3
    want, info = ref.dash_attention_paged(
        q, torch.nan_to_num(kc, nan=0.0), torch.nan_to_num(vc, nan=0.0), bt, lens,
        params=DashParams(score_scale=4.0, prior_weight=pw, sink_blocks=1,
                          prior_norm=prior_norm))
    sel = info["selection"]
    assert (sel.counts < sel.num_blocks[:, None]).any(), "selection should be sparse"
    ids, lp, counts = to_compact(sel, bt, len(lens), bt.shape[1], nan_block)
    # the converter agrees with the reference's own compacted view
    ref_ids = info["block_ids"]
    for s in range(len(lens)):
        for h in range(Hk):
            k = int(counts[s, h])
            assert k == int(info["counts"][s, h])
            assert ids[s, h, :k].long().tolist() == ref_ids[s, h, :k].tolist()
    out, twin = run_both(q, kc, vc, ids, lp, counts, torch.tensor(lens, dtype=torch.int32), B,
                         prior_weight=pw, num_splits=2)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(twin, want, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------
# dense path
# --------------------------------------------------------------------------------------
def sdpa_dense(q, kc, vc, bt, lens, scale=None):
    S, Hq, D = q.shape
    Hk = kc.shape[2]
    k = ref.gather_paged(torch.nan_to_num(kc, nan=0.0), bt, lens).float()
    v = ref.gather_paged(torch.nan_to_num(vc, nan=0.0), bt, lens).float()
    k = k.repeat_interleave(Hq // Hk, dim=1)
    v = v.repeat_interleave(Hq // Hk, dim=1)
    mask = torch.arange(k.shape[2])[None, :] < torch.tensor(lens)[:, None]     # [S, L]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return o[:, :, 0, :].to(q.dtype)


@pytest.mark.parametrize("Hq,Hk,D,B,layout,dtype,ns", [
    (4, 2, 64, 16, "nhd", torch.float32, 3),
    (8, 1, 32, 64, "hnd", torch.float32, 1),
    (4, 2, 32, 64, "hnd", torch.bfloat16, 2),
])
def test_dense_path_equals_sdpa(Hq, Hk, D, B, layout, dtype, ns):
    lens = lens_for(B)
    S = len(lens)
    kc, vc, bt, _ = make_paged(lens, Hk, D, B, dtype, layout, seed=5)
    q = torch.randn(S, Hq, D).to(dtype)
    S_cap, M = S + 1, bt.shape[1] + 3
    ids = torch.full((S_cap, Hk, M), -7, dtype=torch.int32)
    lp = torch.full((S_cap, Hk, M), float("nan"))
    counts = torch.full((S_cap, Hk), -7, dtype=torch.int32)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    fill_dense_selection(block_table=bt, seq_lens=lens_t, num_kv_heads=Hk, block_size=B,
                         out_block_ids=ids, out_log_prior=lp, out_counts=counts)
    n = (lens_t.long() + B - 1) // B
    assert torch.equal(counts[:S], n[:, None].expand(S, Hk).int())
    assert (counts[S:] == -7).all() and (ids[S:] == -7).all()
    ncol = bt.shape[1]
    for s in range(S):
        for h in range(Hk):
            assert torch.equal(ids[s, h, :n[s]], bt[s, :n[s]])
            assert (ids[s, h, n[s]:ncol] == 0).all() and (ids[s, h, ncol:] == -7).all()
            assert (lp[s, h, :ncol] == 0).all()
    out = torch.full_like(q, float("nan"))
    scale = 0.3
    sparse_decode(q=q, key_cache=kc, value_cache=vc, block_ids=ids, log_prior=lp,
                  counts=counts, seq_lens=lens_t, out=out, block_size=B, scale=scale,
                  params=DashParams(), num_splits=ns)
    want = sdpa_dense(q, kc, vc, bt, lens, scale=scale)
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


# --------------------------------------------------------------------------------------
# host-side pieces
# --------------------------------------------------------------------------------------
def test_choose_num_splits(monkeypatch):
    # CPU / interpreter: small
    assert choose_num_splits(num_seqs=1, num_kv_heads=1, max_blocks_per_seq=1000,
                             block_size=16) == 2
    assert choose_num_splits(num_seqs=8, num_kv_heads=8, max_blocks_per_seq=1000,
                             block_size=16) == 1
    # a 132-SM GPU (no GPU needed: the SM count is patched)
    monkeypatch.setattr(dec, "_sm_count", lambda idx: 132)
    cuda0 = torch.device("cuda", 0)
    kw = dict(device=cuda0, block_size=64)
    # few (seq, KV head) pairs: one wave of ~2 programs per SM
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_blocks_per_seq=2048, **kw) == 33
    assert choose_num_splits(num_seqs=1, num_kv_heads=2, max_blocks_per_seq=2048, **kw) == 128
    assert choose_num_splits(num_seqs=8, num_kv_heads=2, max_blocks_per_seq=2048, **kw) == 16
    # many: ~8 programs per SM
    assert choose_num_splits(num_seqs=8, num_kv_heads=8, max_blocks_per_seq=2048, **kw) == 16
    assert choose_num_splits(num_seqs=32, num_kv_heads=8, max_blocks_per_seq=2048, **kw) == 4
    assert choose_num_splits(num_seqs=256, num_kv_heads=8, max_blocks_per_seq=2048, **kw) == 1
    assert choose_num_splits(num_seqs=1, num_kv_heads=2, max_blocks_per_seq=2048,
                             max_splits=16, **kw) == 16
    # short capacity: at least MIN_TOKENS_PER_SPLIT tokens per split
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_blocks_per_seq=16, **kw) == 4


def test_argument_errors():
    B, Hk, Hq, D = 16, 2, 4, 32
    lens = [20]
    kc, vc, bt, nan_block = make_paged(lens, Hk, D, B, torch.float32)
    q = torch.randn(1, Hq, D)
    sel = random_selection(lens, Hk, B, 1.0)
    ids, lp, counts = to_compact(sel, bt, 1, bt.shape[1], nan_block)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    base = dict(q=q, key_cache=kc, value_cache=vc, block_ids=ids, log_prior=lp, counts=counts,
                seq_lens=lens_t, out=torch.empty_like(q), block_size=B, params=DashParams())
    with pytest.raises(ValueError, match="block_size"):
        sparse_decode(**{**base, "block_size": 32})
    with pytest.raises(ValueError, match="multiple"):
        sparse_decode(**{**base, "q": torch.randn(1, 3, D), "out": torch.empty(1, 3, D)})
    with pytest.raises(ValueError, match="block_ids"):
        sparse_decode(**{**base, "block_ids": ids[:, :1]})
    with pytest.raises(ValueError, match="out shape"):
        sparse_decode(**{**base, "out": torch.empty(1, Hq, D + 1)})
    with pytest.raises(ValueError, match="workspace"):
        sparse_decode(**base, num_splits=2,
                      workspace=DecodeWorkspace(1, Hq * 2, D, 4))
