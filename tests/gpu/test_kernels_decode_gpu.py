"""kernels/decode.py on the GPU at real shapes (D=128, 32/8 and 32/2 heads, 32K-128K
contexts) against its torch twin and the reference, plus CUDA-graph capture and replay with
changing contents. Skipped without CUDA (tests/gpu/conftest.py)."""

import pytest
import torch

from vllm_dash.kernels import reference as ref
from dense_fill import fill_dense_selection
from vllm_dash.kernels.decode import DecodeWorkspace, sparse_decode
from vllm_dash.kernels.params import DashParams

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make_case(lens, Hq, Hk, D, B, dtype, layout, density, max_blocks=None, seed=0,
              S_cap=None, kv=None):
    """Paged caches (shuffled physical blocks, NaN in unowned slots) and a random compacted
    selection (current block always last, random priors)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    S = len(lens)
    S_cap = S_cap or S
    n = [-(-L // B) for L in lens]
    max_blocks = max_blocks or max(n)
    if kv is None:
        nb = sum(n) + 1
        shape = (nb, B, Hk, D) if layout == "nhd" else (nb, Hk, B, D)
        kc = torch.randn(shape, device=DEV, generator=g).to(dtype)
        vc = torch.randn(shape, device=DEV, generator=g).to(dtype)
        if layout == "hnd":
            kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)
    else:
        kc, vc = kv
        nb = kc.shape[0]
    perm = torch.randperm(nb, device=DEV, generator=g).to(torch.int32)
    bt = torch.zeros(S, max_blocks, dtype=torch.int32, device=DEV)
    pos = 0
    for s in range(S):
        bt[s, :n[s]] = perm[pos:pos + n[s]]
        pos += n[s]
        fill = lens[s] - (n[s] - 1) * B
        if fill < B:                                   # unwritten tail of the current block
            kc[bt[s, n[s] - 1].long(), fill:] = float("nan")
            vc[bt[s, n[s] - 1].long(), fill:] = float("nan")
    ids = torch.zeros(S_cap, Hk, max_blocks, dtype=torch.int32, device=DEV)
    lp = torch.zeros(S_cap, Hk, max_blocks, dtype=torch.float32, device=DEV)
    counts = torch.zeros(S_cap, Hk, dtype=torch.int32, device=DEV)
    for s in range(S):
        r = torch.rand(Hk, n[s], device=DEV, generator=g)
        sel = r < density
        sel[:, -1] = True
        for h in range(Hk):
            logical = sel[h].nonzero().flatten()
            k = logical.numel()
            ids[s, h, :k] = bt[s, logical]
            lp[s, h, :k] = torch.rand(k, device=DEV, generator=g).clamp_min(0.01).log()
            counts[s, h] = k
    q = torch.randn(S, Hq, D, device=DEV, generator=g).to(dtype)
    lens_t = torch.zeros(S_cap, dtype=torch.int32, device=DEV)
    lens_t[:S] = torch.tensor(lens, dtype=torch.int32, device=DEV)
    return q, kc, vc, bt, ids, lp, counts, lens_t


def ragged(S, L, B, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(L // 2, L + 1, (S,), generator=g).tolist()
    lens[0] = L                      # the full context, a multiple of B
    if S > 1:
        lens[1] = L - B // 2 - 1     # a partial current block
    return lens


CONFIGS = [
    # S,  Hq, Hk,      L,  B, dtype,          layout, density, prior_weight, num_splits
    (1, 32, 8, 131072, 64, torch.bfloat16, "nhd", 0.25, 1.0, None),
    (1, 32, 2, 131072, 16, torch.float16, "hnd", 0.125, 0.5, None),
    (4, 32, 2, 32768, 64, torch.bfloat16, "hnd", 0.5, 0.0, 7),
    (8, 32, 8, 65536, 64, torch.float16, "nhd", 0.125, 1.0, None),
    (32, 32, 8, 32768, 16, torch.bfloat16, "nhd", 0.25, 1.0, None),
    (32, 32, 2, 32768, 64, torch.bfloat16, "hnd", 1.0, 0.0, 1),
    (2, 32, 8, 32768, 64, torch.float32, "nhd", 0.25, 1.0, None),
]


@pytest.mark.parametrize("S,Hq,Hk,L,B,dtype,layout,density,pw,ns", CONFIGS)
def test_real_shapes_vs_twin(S, Hq, Hk, L, B, dtype, layout, density, pw, ns):
    D = 128
    lens = ragged(S, L, B, seed=S + Hk)
    q, kc, vc, bt, ids, lp, counts, lens_t = make_case(lens, Hq, Hk, D, B, dtype, layout,
                                                       density, seed=L + S)
    ws = DecodeWorkspace(S, Hq, D, 64, device=DEV)
    out = torch.full_like(q, float("nan"))
    sparse_decode(q=q, key_cache=kc, value_cache=vc, block_ids=ids, log_prior=lp,
                  counts=counts, seq_lens=lens_t, out=out, block_size=B,
                  params=DashParams(prior_weight=pw), num_splits=ns, workspace=ws)
    twin = torch.empty_like(q)
    ref.sparse_decode(q=q, key_cache=kc, value_cache=vc, block_ids=ids, log_prior=lp,
                      counts=counts, seq_lens=lens_t, out=twin, block_size=B,
                      params=DashParams(prior_weight=pw))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), twin.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_vs_reference_sparse_attention():
    """One real-shape case against reference.sparse_attention (contiguous gather)."""
    S, Hq, Hk, D, B, L = 2, 32, 8, 128, 64, 32768
    lens = [L, L - 100]
    q, kc, vc, bt, ids, lp, counts, lens_t = make_case(lens, Hq, Hk, D, B, torch.bfloat16,
                                                       "nhd", 0.3, seed=3)
    n_max = bt.shape[1]
    selected = torch.zeros(S, Hk, n_max, dtype=torch.bool, device=DEV)
    prior = torch.zeros(S, Hk, n_max, device=DEV)
    inv = torch.full((kc.shape[0],), -1, dtype=torch.long, device=DEV)
    for s in range(S):
        n_s = -(-lens[s] // B)
        inv[bt[s, :n_s].long()] = torch.arange(n_s, device=DEV)
        for h in range(Hk):
            k = int(counts[s, h])
            logical = inv[ids[s, h, :k].long()]
            selected[s, h, logical] = True
            prior[s, h, logical] = lp[s, h, :k].exp()
    dummy = torch.zeros(S, Hk, n_max, device=DEV)
    lens_l = torch.tensor(lens, device=DEV)
    sel = ref.Selection(selected=selected, prior=prior, probs=dummy, mean_probs=dummy,
                        scores=dummy, num_blocks=(lens_l + B - 1) // B, seq_lens=lens_l,
                        dense=torch.zeros(S, dtype=torch.bool, device=DEV), block_size=B)
    kk = ref.gather_paged(torch.nan_to_num(kc, nan=0.0), bt, lens_l)
    vv = ref.gather_paged(torch.nan_to_num(vc, nan=0.0), bt, lens_l)
    want = ref.sparse_attention(q, kk, vv, sel, params=DashParams(prior_weight=1.0))
    out = torch.empty_like(q)
    sparse_decode(q=q, key_cache=kc, value_cache=vc, block_ids=ids, log_prior=lp,
                  counts=counts, seq_lens=lens_t, out=out, block_size=B,
                  params=DashParams(prior_weight=1.0))
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_dense_path_vs_sdpa():
    S, Hq, Hk, D, B = 3, 32, 8, 128, 64
    lens = [32768, 20000, 777]
    q, kc, vc, bt, ids, lp, counts, lens_t = make_case(lens, Hq, Hk, D, B, torch.bfloat16,
                                                       "nhd", 1.0, seed=9)
    fill_dense_selection(block_table=bt, seq_lens=lens_t, num_kv_heads=Hk, block_size=B,
                         out_block_ids=ids, out_log_prior=lp, out_counts=counts)
    out = torch.empty_like(q)
    sparse_decode(q=q, key_cache=kc, value_cache=vc, block_ids=ids, log_prior=lp,
                  counts=counts, seq_lens=lens_t, out=out, block_size=B,
                  params=DashParams(prior_weight=1.0))
    lens_l = torch.tensor(lens, device=DEV)
    k = ref.gather_paged(torch.nan_to_num(kc, nan=0.0), bt, lens_l).float()
    v = ref.gather_paged(torch.nan_to_num(vc, nan=0.0), bt, lens_l).float()
    mask = torch.arange(k.shape[2], device=DEV)[None, :] < lens_l[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], enable_gqa=True)
    torch.testing.assert_close(out.float(), want[:, :, 0].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dense", [False, True])
def test_cuda_graph_capture_and_replay(dense):
    """Capture sparse_decode (and fill_dense_selection for the dense path) once at fixed
    capacities; replay after copying different selections, counts, seq_lens and queries into
    the same buffers; every replay matches the twin on the new contents."""
    S_cap, Hq, Hk, D, B, dtype = 4, 32, 8, 128, 64, torch.bfloat16
    L_cap = 16384
    M = L_cap // B
    nb = S_cap * M + 1
    kc = torch.randn(nb, B, Hk, D, device=DEV).to(dtype)
    vc = torch.randn(nb, B, Hk, D, device=DEV).to(dtype)
    # static buffers (capacities)
    q_buf = torch.zeros(S_cap, Hq, D, device=DEV, dtype=dtype)
    bt_buf = torch.zeros(S_cap, M, dtype=torch.int32, device=DEV)
    ids_buf = torch.zeros(S_cap, Hk, M, dtype=torch.int32, device=DEV)
    lp_buf = torch.zeros(S_cap, Hk, M, device=DEV)
    cnt_buf = torch.zeros(S_cap, Hk, dtype=torch.int32, device=DEV)
    len_buf = torch.ones(S_cap, dtype=torch.int32, device=DEV)
    out_buf = torch.zeros(S_cap, Hq, D, device=DEV, dtype=dtype)
    ws = DecodeWorkspace(S_cap, Hq, D, 64, device=DEV)

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

    for rnd, (lens, density) in enumerate([([16384, 9000, 64, 1], 0.3),
                                           ([100, 16000, 5000, 12345], 0.8),
                                           ([65, 130, 16383, 16384], 0.1)]):
        q, _, _, bt, ids, lp, counts, lens_t = make_case(
            lens, Hq, Hk, D, B, dtype, "nhd", density, max_blocks=M, seed=rnd,
            kv=(kc, vc))
        q_buf.copy_(q)
        bt_buf.copy_(bt)
        ids_buf.copy_(ids)
        lp_buf.copy_(lp)
        cnt_buf.copy_(counts)
        len_buf.copy_(lens_t)
        out_buf.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = torch.empty_like(q)
        ref.sparse_decode(q=q_buf, key_cache=kc, value_cache=vc, block_ids=ids_buf,
                          log_prior=lp_buf, counts=cnt_buf, seq_lens=len_buf, out=want,
                          block_size=B, params=DashParams(prior_weight=0.7))
        torch.testing.assert_close(out_buf.float(), want.float(), atol=2e-2, rtol=2e-2)
        # NaN tails written by make_case would poison later rounds' full blocks: restore
        kc.nan_to_num_(nan=0.0)
        vc.nan_to_num_(nan=0.0)
