"""kernels/decode.py (stage 2: split-KV sparse paged decode + reduce) against its twin
reference.sparse_decode and against reference.sparse_attention / select_blocks, on the CPU
under the Triton interpreter (small shapes) and on a GPU (the same small cases, plus real
shapes: D=128, 32/8 and 32/2 heads, 32K-128K contexts, and CUDA-graph capture and replay).

Unused cache slots (the current block's unwritten tail, unreferenced blocks) hold NaN, so any
read of them shows up in the output; the reference gets a NaN-free copy (it multiplies absent
slots by 0, which NaN would survive).
"""
import pytest
import torch

from dense_fill import fill_dense_selection
from kernel_helpers import (DEVICES, dense_reference, generator, on_devices,
                            poisoned_paged_cache, random_selection, sparse_reference,
                            to_compact)
from vllm_dash.kernels import decode as dec
from vllm_dash.kernels import reference as ref
from vllm_dash.kernels.decode import DecodeWorkspace, choose_num_splits, sparse_decode
from vllm_dash.kernels.params import DashParams

pytestmark = pytest.mark.filterwarnings(
    # Triton 3.6's interpreter converts 1-element arrays to int (numpy deprecation)
    "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")

TOL = {"cpu": {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2},
       "cuda": {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}}
K = 1024


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


def ragged(S, L, B, seed):
    """S lengths in [L/2, L]: the first the full context (a multiple of B), the second with a
    partial current block."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(L // 2, L + 1, (S,), generator=g).tolist()
    lens[0] = L
    if S > 1:
        lens[1] = L - B // 2 - 1
    return lens


# --------------------------------------------------------------------------------------
# sparse path vs twin and reference
# --------------------------------------------------------------------------------------
def _small(Hq, Hk, D, B, layout, dtype, pw, ns, density):
    return dict(Hq=Hq, Hk=Hk, D=D, B=B, layout=layout, dtype=dtype, pw=pw, ns=ns,
                density=density, lens=lens_for(B), seed=Hq + D + B, sel_seed=D, q_seed=7,
                ws_splits=None)


def _real(S, Hq, Hk, L, B, dtype, layout, density, pw, ns, lens=None):
    return dict(Hq=Hq, Hk=Hk, D=128, B=B, layout=layout, dtype=dtype, pw=pw, ns=ns,
                density=density, lens=lens or ragged(S, L, B, seed=S + Hk), seed=L + S,
                sel_seed=S, q_seed=L, ws_splits=64)


SMALL = [_small(*c) for c in [
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
]]
REAL = [_real(*c) for c in [
    # S,  Hq, Hk,      L,  B, dtype,          layout, density, prior_weight, num_splits
    (1, 32, 8, 128 * K, 64, torch.bfloat16, "nhd", 0.25, 1.0, None),
    (1, 32, 2, 128 * K, 16, torch.float16, "hnd", 0.125, 0.5, None),
    (4, 32, 2, 32 * K, 64, torch.bfloat16, "hnd", 0.5, 0.0, 7),
    (8, 32, 8, 64 * K, 64, torch.float16, "nhd", 0.125, 1.0, None),
    (32, 32, 8, 32 * K, 16, torch.bfloat16, "nhd", 0.25, 1.0, None),
    (32, 32, 2, 32 * K, 64, torch.bfloat16, "hnd", 1.0, 0.0, 1),
    (2, 32, 8, 32 * K, 64, torch.float32, "nhd", 0.25, 1.0, None),
]] + [_real(2, 32, 8, 32 * K, 64, torch.bfloat16, "nhd", 0.3, 1.0, None,
            lens=[32 * K, 32 * K - 100])]


@pytest.mark.parametrize("device,case", on_devices(cpu=SMALL, cuda=REAL))
def test_sparse_decode_matches_twin_and_reference(device, case):
    Hq, Hk, D, B, dtype = case["Hq"], case["Hk"], case["D"], case["B"], case["dtype"]
    lens, pw = case["lens"], case["pw"]
    S = len(lens)
    kc, vc, bt, nan_block = poisoned_paged_cache(lens, Hk, D, B, dtype, case["layout"],
                                                 device=device, seed=case["seed"])
    q = torch.randn(S, Hq, D, generator=generator(device, case["q_seed"]),
                    device=device).to(dtype)
    sel = random_selection(lens, Hk, B, case["density"], device=device, seed=case["sel_seed"])
    ids, lp, counts = to_compact(sel, bt, S + 2, bt.shape[1] + 1, nan_block)
    lens_t = torch.tensor(lens + [0, 0], dtype=torch.int32, device=device)   # capacity rows
    ws = None
    if case["ws_splits"]:
        ws = DecodeWorkspace(S, Hq, D, case["ws_splits"], device=device)
    out, twin = run_both(q, kc, vc, ids, lp, counts, lens_t, B, prior_weight=pw,
                         num_splits=case["ns"], workspace=ws)
    want = sparse_reference(q, kc, vc, bt, lens_t[:S], sel, pw)
    tol = TOL[device][dtype]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(twin.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), twin.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_split_counts_agree_and_workspace_is_reused(device):
    """1, 2, 5, 12 and 16 splits (incl. splits > listed blocks) give the same output; a
    workspace is used as is (no allocation); with fewer sequences than its max_num_seqs it
    holds more than max_splits splits (rows = max_num_seqs * max_splits)."""
    B, Hk, Hq, D = 16, 2, 4, 32
    lens = [B * 5 + 2, 7, B * 3]
    kc, vc, bt, nan_block = poisoned_paged_cache(lens, Hk, D, B, torch.float32, device=device)
    q = torch.randn(len(lens), Hq, D, device=device)
    sel = random_selection(lens, Hk, B, 0.6, device=device, seed=3)
    ids, lp, counts = to_compact(sel, bt, 4, bt.shape[1], nan_block)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    ws = DecodeWorkspace(max_num_seqs=4, num_q_heads=Hq, head_size=D, max_splits=12,
                         device=device)
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


@pytest.mark.parametrize("device", DEVICES)
def test_zero_count_rows_give_zeros(device):
    """A (sequence, KV head) with no listed block (e.g. a padded CUDA-graph row) writes 0."""
    B, Hk, Hq, D = 16, 2, 4, 32
    lens = [B * 3, 5]
    kc, vc, bt, nan_block = poisoned_paged_cache(lens, Hk, D, B, torch.float32, device=device)
    q = torch.randn(2, Hq, D, device=device)
    sel = random_selection(lens, Hk, B, 0.5, device=device, seed=5)
    ids, lp, counts = to_compact(sel, bt, 2, bt.shape[1], nan_block)
    counts[1] = 0
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    for ns in (1, 3):
        out, twin = run_both(q, kc, vc, ids, lp, counts, lens_t, B, num_splits=ns)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out, twin, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------
# with the reference's own stage 1
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,pw,prior_norm", [("nhd", 1.0, "none"), ("hnd", 0.5, "max")])
def test_with_reference_select_blocks(device, layout, pw, prior_norm):
    """reference.dash_attention_paged (summaries + entmax selection + stage 2) equals our
    stage 2 fed with its selection converted to the compacted format."""
    B, Hk, Hq, D = 16, 2, 8, 32
    lens = [B * 12 + 3, B * 9, 11]
    kc, vc, bt, nan_block = poisoned_paged_cache(lens, Hk, D, B, torch.float32, layout,
                                                 device=device, seed=11)
    q = torch.randn(len(lens), Hq, D, generator=generator(device, 2), device=device) * 3
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
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    out, twin = run_both(q, kc, vc, ids, lp, counts, lens_t, B, prior_weight=pw, num_splits=2)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(twin, want, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------
# dense path (every block listed: benchmarks/dense_fill.py)
# --------------------------------------------------------------------------------------
DENSE_SMALL = [dict(Hq=Hq, Hk=Hk, D=D, B=B, layout=lay, dtype=dt, ns=ns, lens=lens_for(B),
                    scale=0.3, tol=TOL["cpu"][dt])
               for Hq, Hk, D, B, lay, dt, ns in [(4, 2, 64, 16, "nhd", torch.float32, 3),
                                                  (8, 1, 32, 64, "hnd", torch.float32, 1),
                                                  (4, 2, 32, 64, "hnd", torch.bfloat16, 2)]]
DENSE_REAL = [dict(Hq=32, Hk=8, D=128, B=64, layout="nhd", dtype=torch.bfloat16, ns=None,
                   lens=[32 * K, 20000, 777], scale=None, tol=2e-2)]


@pytest.mark.parametrize("device,case", on_devices(cpu=DENSE_SMALL, cuda=DENSE_REAL))
def test_dense_path_equals_sdpa(device, case):
    Hq, Hk, D, B, lens = case["Hq"], case["Hk"], case["D"], case["B"], case["lens"]
    dtype = case["dtype"]
    S = len(lens)
    kc, vc, bt, _ = poisoned_paged_cache(lens, Hk, D, B, dtype, case["layout"], device=device,
                                         seed=5)
    q = torch.randn(S, Hq, D, device=device).to(dtype)
    S_cap, M = S + 1, bt.shape[1] + 3
    ids = torch.full((S_cap, Hk, M), -7, dtype=torch.int32, device=device)
    lp = torch.full((S_cap, Hk, M), float("nan"), device=device)
    counts = torch.full((S_cap, Hk), -7, dtype=torch.int32, device=device)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
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
    sparse_decode(q=q, key_cache=kc, value_cache=vc, block_ids=ids, log_prior=lp,
                  counts=counts, seq_lens=lens_t, out=out, block_size=B, scale=case["scale"],
                  params=DashParams(), num_splits=case["ns"])
    want = dense_reference(q, kc, vc, bt, lens, scale=case["scale"])
    torch.testing.assert_close(out.float(), want.float(), atol=case["tol"], rtol=case["tol"])


# --------------------------------------------------------------------------------------
# CUDA graphs (GPU only)
# --------------------------------------------------------------------------------------
def _graph_round(kc, vc, lens, Hq, B, M, density, seed):
    """New contents for the captured buffers: a shuffled block table over the fixed caches,
    NaN in the current blocks' unwritten tails, a random compacted selection."""
    dev, Hk, D, dtype = kc.device, kc.shape[2], kc.shape[3], kc.dtype
    g = generator(dev, seed)
    perm = torch.randperm(kc.shape[0], generator=g, device=dev).to(torch.int32)
    bt = perm[: len(lens) * M].view(len(lens), M).contiguous()
    for s, L in enumerate(lens):
        n = -(-L // B)
        fill = L - (n - 1) * B
        kc[bt[s, n - 1].long(), fill:] = float("nan")
        vc[bt[s, n - 1].long(), fill:] = float("nan")
    sel = random_selection(lens, Hk, B, density, device=dev, seed=seed)
    ids, lp, counts = to_compact(sel, bt, len(lens), M, 0)
    q = torch.randn(len(lens), Hq, D, generator=g, device=dev).to(dtype)
    return q, bt, ids, lp, counts, torch.tensor(lens, dtype=torch.int32, device=dev)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dense", [False, True])
def test_cuda_graph_capture_and_replay(device, dense):
    """Capture sparse_decode (and fill_dense_selection for the dense path) once at fixed
    capacities; replay after copying different selections, counts, seq_lens and queries into
    the same buffers; every replay matches the twin on the new contents."""
    S_cap, Hq, Hk, D, B, dtype = 4, 32, 8, 128, 64, torch.bfloat16
    L_cap = 16 * K
    M = L_cap // B
    nb = S_cap * M + 1
    kc = torch.randn(nb, B, Hk, D, device=device).to(dtype)
    vc = torch.randn(nb, B, Hk, D, device=device).to(dtype)
    # static buffers (capacities)
    q_buf = torch.zeros(S_cap, Hq, D, device=device, dtype=dtype)
    bt_buf = torch.zeros(S_cap, M, dtype=torch.int32, device=device)
    ids_buf = torch.zeros(S_cap, Hk, M, dtype=torch.int32, device=device)
    lp_buf = torch.zeros(S_cap, Hk, M, device=device)
    cnt_buf = torch.zeros(S_cap, Hk, dtype=torch.int32, device=device)
    len_buf = torch.ones(S_cap, dtype=torch.int32, device=device)
    out_buf = torch.zeros(S_cap, Hq, D, device=device, dtype=dtype)
    ws = DecodeWorkspace(S_cap, Hq, D, 64, device=device)

    def step():
        if dense:
            fill_dense_selection(block_table=bt_buf, seq_lens=len_buf, num_kv_heads=Hk,
                                 block_size=B, out_block_ids=ids_buf, out_log_prior=lp_buf,
                                 out_counts=cnt_buf)
        sparse_decode(q=q_buf, key_cache=kc, value_cache=vc, block_ids=ids_buf,
                      log_prior=lp_buf, counts=cnt_buf, seq_lens=len_buf, out=out_buf,
                      block_size=B, params=DashParams(prior_weight=0.7), workspace=ws)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()                                    # compile + warm up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for rnd, (lens, density) in enumerate([([16 * K, 9000, 64, 1], 0.3),
                                           ([100, 16000, 5000, 12345], 0.8),
                                           ([65, 130, 16 * K - 1, 16 * K], 0.1)]):
        q, bt, ids, lp, counts, lens_t = _graph_round(kc, vc, lens, Hq, B, M, density, rnd)
        for buf, new in ((q_buf, q), (bt_buf, bt), (ids_buf, ids), (lp_buf, lp),
                         (cnt_buf, counts), (len_buf, lens_t)):
            buf.copy_(new)
        out_buf.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = torch.empty_like(q)
        ref.sparse_decode(q=q_buf, key_cache=kc, value_cache=vc, block_ids=ids_buf,
                          log_prior=lp_buf, counts=cnt_buf, seq_lens=len_buf, out=want,
                          block_size=B, params=DashParams(prior_weight=0.7))
        torch.testing.assert_close(out_buf.float(), want.float(), atol=2e-2, rtol=2e-2)
        # the NaN tails written for this round would poison later rounds' full blocks
        kc.nan_to_num_(nan=0.0)
        vc.nan_to_num_(nan=0.0)


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


@pytest.mark.parametrize("device", DEVICES)
def test_argument_errors(device):
    B, Hk, Hq, D = 16, 2, 4, 32
    lens = [20]
    kc, vc, bt, nan_block = poisoned_paged_cache(lens, Hk, D, B, torch.float32, device=device)
    q = torch.randn(1, Hq, D, device=device)
    sel = random_selection(lens, Hk, B, 1.0, device=device)
    ids, lp, counts = to_compact(sel, bt, 1, bt.shape[1], nan_block)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    base = dict(q=q, key_cache=kc, value_cache=vc, block_ids=ids, log_prior=lp, counts=counts,
                seq_lens=lens_t, out=torch.empty_like(q), block_size=B, params=DashParams())
    with pytest.raises(ValueError, match="block_size"):
        sparse_decode(**{**base, "block_size": 32})
    with pytest.raises(ValueError, match="multiple"):
        sparse_decode(**{**base, "q": torch.randn(1, 3, D, device=device),
                         "out": torch.empty(1, 3, D, device=device)})
    with pytest.raises(ValueError, match="block_ids"):
        sparse_decode(**{**base, "block_ids": ids[:, :1]})
    with pytest.raises(ValueError, match="out shape"):
        sparse_decode(**{**base, "out": torch.empty(1, Hq, D + 1, device=device)})
    with pytest.raises(ValueError, match="workspace"):
        sparse_decode(**base, num_splits=2,
                      workspace=DecodeWorkspace(1, Hq * 2, D, 4, device=device))
