"""kernels/summaries.py and kernels/select.py on the GPU at real shapes (D=128, 32/8 and
32/2 heads, 32K-128K contexts, B=64 and 16, fp16/bf16), vs the torch twins / reference,
plus CUDA-graph capture and replay. Skipped without CUDA (tests/gpu/conftest.py).

Selection exactness: at thousands of blocks per sequence a block can sit within fp32
rounding of the entmax threshold (probability ~1e-9 in both implementations), so a few
boundary flips are allowed, each of which must have reference probability < 1e-5.
"""
import math

import pytest
import torch

from vllm_dash.kernels import reference as ref
from vllm_dash.kernels.params import DashParams
from vllm_dash.kernels.select import SelectWorkspace, select_blocks_paged
from vllm_dash.kernels.summaries import write_kv_and_summaries


def split_params(kw):
    """Test settings as one dict -> (DashParams of the knobs, the other keyword arguments)."""
    knobs = {k: v for k, v in kw.items() if k in DashParams.keys()}
    return DashParams(**knobs), {k: v for k, v in kw.items() if k not in knobs}


def select_blocks_paged_torch(**kw):
    """The twin (reference.select_blocks_paged) called with the knobs as keywords."""
    params, rest = split_params(kw)
    return ref.select_blocks_paged(params=params, **rest)

DEV = "cuda"
PROB_ATOL = 1e-5


def _case(S, Hq, Hk, D, B, lens, *, seed, q_dtype, q_scale=2.0, extra_blocks=16):
    g = torch.Generator(device=DEV).manual_seed(seed)
    n = [-(-L // B) for L in lens]
    nmax = max(n)
    num_blocks = S * nmax + extra_blocks
    summ = torch.randn(num_blocks, Hk, D, generator=g, device=DEV)
    q = (torch.randn(S, Hq, D, generator=g, device=DEV) * q_scale).to(q_dtype)
    perm = torch.randperm(num_blocks, generator=g, device=DEV)
    bt = perm[: S * nmax].view(S, nmax).to(torch.int32).contiguous()
    return q, summ, bt, torch.tensor(lens, dtype=torch.int32, device=DEV)


def _compare(out, twin, bt, *, max_flips):
    ids, lp, cnt = (t.cpu() for t in out)
    rids, rlp, rcnt, sel = twin
    rids, rlp, rcnt = rids.cpu(), rlp.cpu(), rcnt.cpu()
    pbar = sel.mean_probs.cpu()
    bt = bt.cpu()
    S, Hk = rcnt.shape
    flips = 0
    for s in range(S):
        n = int(sel.num_blocks[s])
        where = {p: c for c, p in enumerate(bt[s, :n].tolist())}
        for h in range(Hk):
            k, rk = int(cnt[s, h]), int(rcnt[s, h])
            got, want = ids[s, h, :k].tolist(), rids[s, h, :rk].tolist()
            if got != want:
                for p in set(got) ^ set(want):
                    assert float(pbar[s, h, where[p]]) < 1e-5, (s, h, p)
                    flips += 1
                continue
            torch.testing.assert_close(lp[s, h, :k].exp(), rlp[s, h, :k].exp(), rtol=0,
                                       atol=PROB_ATOL)
    assert flips <= max_flips, flips
    return flips


def _run(q, summ, bt, lens, ws=None, **kw):
    S, Hq, _ = q.shape
    Hk = summ.shape[1]
    nmax = bt.shape[1]
    ids = torch.full((S, Hk, nmax), -1, dtype=torch.int32, device=DEV)
    lp = torch.zeros(S, Hk, nmax, device=DEV)
    cnt = torch.zeros(S, Hk, dtype=torch.int32, device=DEV)
    ws = ws or SelectWorkspace(S, Hq, Hk, nmax, device=DEV)
    params, rest = split_params(kw)
    select_blocks_paged(q=q, summaries=summ, block_table=bt, seq_lens=lens, out_block_ids=ids,
                        out_log_prior=lp, out_counts=cnt, workspace=ws, params=params,
                        **rest)
    return ids, lp, cnt, ws


SELECT_CASES = [
    # S, Hq, Hk, B, lens, q dtype, settings
    (1, 32, 8, 64, [128 * 1024], torch.float16, dict()),
    (4, 32, 2, 16, [64 * 1024, 32 * 1024 + 5, 50_000, 33_333], torch.bfloat16,
     dict(score_norm="standardize", score_scale=3.0, min_blocks=8, sink_blocks=1,
          local_blocks=1, prior_norm="max")),
    (32, 32, 8, 64, [32 * 1024 - 64 * i - 7 * (i % 3) for i in range(32)], torch.bfloat16,
     dict(alpha=1.25, min_blocks=8, max_blocks=64, sink_blocks=1, local_blocks=2)),
    (8, 32, 8, 64, [96 * 1024 + 1000 * i for i in range(8)], torch.float16,
     dict(alpha=2.0, prior_norm="max", dense_below=96 * 1024 + 2500)),
    (4, 32, 8, 64, [128 * 1024, 64 * 1024 + 7, 32 * 1024, 4096], torch.bfloat16,
     dict(selector="topk", min_blocks=16, sink_blocks=1, local_blocks=2,
          score_norm="standardize")),
]


@pytest.mark.parametrize("case", range(len(SELECT_CASES)))
def test_select_real_shapes(case):
    S, Hq, Hk, B, lens, qdt, kw = SELECT_CASES[case]
    q, summ, bt, lt = _case(S, Hq, Hk, 128, B, lens, seed=case, q_dtype=qdt)
    ids, lp, cnt, ws = _run(q, summ, bt, lt, block_size=B, **kw)
    twin = select_blocks_paged_torch(q=q, summaries=summ, block_table=bt, seq_lens=lt,
                                     block_size=B, **kw)
    flips = _compare((ids, lp, cnt), twin, bt, max_flips=2 * S)
    n = twin[3].num_blocks.float()
    density = (cnt.float().mean(1).cpu() / n.cpu()).mean().item()
    print(f"\nselect case {case}: S={S} {Hq}/{Hk} B={B} n_max={bt.shape[1]} {kw}: "
          f"mean density {density:.3f}, boundary flips {flips}")


@pytest.mark.parametrize("B,dtype,head_major", [(64, torch.float16, False),
                                                (16, torch.bfloat16, True)])
def test_summaries_real_shapes(B, dtype, head_major):
    Hk, D = 8, 128
    lens = [32 * 1024 + 17, 5000, 64 * 100]
    n = [-(-L // B) for L in lens]
    nmax = max(n) + 4
    num_blocks = sum(nmax for _ in lens) + 8
    g = torch.Generator(device=DEV).manual_seed(B)
    shape = (num_blocks, Hk, B, D) if head_major else (num_blocks, B, Hk, D)
    kc = torch.randn(shape, generator=g, device=DEV).to(dtype)
    vc = torch.randn(shape, generator=g, device=DEV).to(dtype)
    if head_major:
        kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)
    kc_t, vc_t = kc.clone(), vc.clone()
    summ = torch.randn(num_blocks, Hk, D, device=DEV)
    summ_t = summ.clone()
    perm = torch.randperm(num_blocks, generator=g, device=DEV)[: len(lens) * nmax]
    bt = perm.view(len(lens), nmax).to(torch.int32)

    def slots_for(s, a, b):
        pos = torch.arange(a, b, device=DEV)
        return bt[s, pos // B].long() * B + pos % B

    def step(slot_list):
        sm = torch.cat(slot_list)
        T = sm.numel()
        key = torch.randn(T, Hk, D, generator=g, device=DEV).to(dtype)
        val = torch.randn(T, Hk, D, generator=g, device=DEV).to(dtype)
        write_kv_and_summaries(key=key, value=val, key_cache=kc, value_cache=vc,
                               summaries=summ, slot_mapping=sm)
        ref.write_kv_and_summaries(key=key, value=val, key_cache=kc_t, value_cache=vc_t,
                                   summaries=summ_t, slot_mapping=sm)
        assert torch.equal(kc, kc_t) and torch.equal(vc, vc_t)
        torch.testing.assert_close(summ, summ_t, rtol=1e-5, atol=1e-5)

    pad = torch.full((7,), -1, dtype=torch.long, device=DEV)
    # chunked prefill: two chunks per sequence, the second starting mid-block
    step([slots_for(s, 0, L // 2) for s, L in enumerate(lens)] + [pad])
    step([slots_for(s, L // 2, L) for s, L in enumerate(lens)])
    cur = list(lens)
    for _ in range(3):                                  # decode steps
        step([slots_for(s, L, L + 1) for s, L in enumerate(cur)] + [pad[:1]])
        cur = [L + 1 for L in cur]
    expect = ref.block_summaries_paged(kc, bt, torch.tensor(cur, device=DEV))
    used = torch.cat([bt[s, : -(-L // B)] for s, L in enumerate(cur)]).long()
    torch.testing.assert_close(summ[used], expect[used], rtol=1e-5, atol=1e-5)


def test_select_cuda_graph_capture_and_replay():
    """Capture one select call with static buffers; replay after changing q and seq_lens
    in place; each replay must equal the reference on the new contents."""
    S_cap, Hq, Hk, D, B = 8, 32, 8, 128, 64
    nmax = 512                                       # 32K tokens
    kw = dict(block_size=B, min_blocks=4, sink_blocks=1, local_blocks=1,
              score_norm="standardize", score_scale=2.0)
    q, summ, bt, lt = _case(S_cap, Hq, Hk, D, B, [nmax * B] * S_cap, seed=7,
                            q_dtype=torch.bfloat16)
    ids = torch.full((S_cap, Hk, nmax), -1, dtype=torch.int32, device=DEV)
    lp = torch.zeros(S_cap, Hk, nmax, device=DEV)
    cnt = torch.zeros(S_cap, Hk, dtype=torch.int32, device=DEV)
    ws = SelectWorkspace(S_cap, Hq, Hk, nmax, device=DEV)
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
    g = torch.Generator(device=DEV).manual_seed(123)
    for it in range(3):
        q.copy_((torch.randn(q.shape, generator=g, device=DEV) * (1.5 + it)).to(q.dtype))
        new_lens = torch.randint(1, nmax * B + 1, (S_cap,), generator=g, device=DEV)
        lt.copy_(new_lens.to(torch.int32))
        cnt.fill_(-5)
        graph.replay()
        torch.cuda.synchronize()
        twin = select_blocks_paged_torch(q=q, summaries=summ, block_table=bt, seq_lens=lt,
                                         **kw)
        _compare((ids, lp, cnt), twin, bt, max_flips=S_cap)


def test_summaries_cuda_graph_capture_and_replay():
    Hk, D, B, nb = 8, 128, 64, 64
    kc = torch.randn(nb, B, Hk, D, device=DEV).half()
    vc = torch.randn(nb, B, Hk, D, device=DEV).half()
    summ = torch.zeros(nb, Hk, D, device=DEV)
    T = 16
    key = torch.zeros(T, Hk, D, device=DEV).half()
    val = torch.zeros_like(key)
    sm = torch.full((T,), -1, dtype=torch.long, device=DEV)

    def call():
        write_kv_and_summaries(key=key, value=val, key_cache=kc, value_cache=vc,
                               summaries=summ, slot_mapping=sm)

    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    kc_t, vc_t, summ_t = kc.clone(), vc.clone(), summ.clone()
    for step in range(3):
        key.copy_(torch.randn_like(key))
        val.copy_(torch.randn_like(val))
        slots = torch.arange(T, device=DEV) * B + step       # decode: one token per block
        slots[-3:] = -1
        sm.copy_(slots)
        graph.replay()
        ref.write_kv_and_summaries(key=key, value=val, key_cache=kc_t, value_cache=vc_t,
                                   summaries=summ_t, slot_mapping=sm)
        torch.cuda.synchronize()
        assert torch.equal(kc, kc_t)
        torch.testing.assert_close(summ, summ_t, rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(summ.abs().sum()))


@pytest.mark.parametrize("path", ["tile64", "fallback"])
def test_select_tiled_paths_gpu(path, monkeypatch):
    """The tiled K2 / K3b loops (forced by ``tile``, or by lowering the register-resident
    limit) on the GPU at a real shape, vs the reference, plus their timing."""
    import vllm_dash.kernels.select as sel_mod
    S, Hq, Hk, B = 2, 32, 8, 64
    lens = [64 * 1024, 40_000]
    kw = dict(alpha=1.25, min_blocks=8, max_blocks=64, sink_blocks=1, local_blocks=2,
              score_norm="standardize", score_scale=2.0)
    tile = 64 if path == "tile64" else None
    if path == "fallback":
        monkeypatch.setattr(sel_mod, "_RESIDENT_MAX", 256)
        monkeypatch.setattr(sel_mod, "_FALLBACK_TILE", 256)
    q, summ, bt, lt = _case(S, Hq, Hk, 128, B, lens, seed=11, q_dtype=torch.bfloat16)
    ids, lp, cnt, ws = _run(q, summ, bt, lt, block_size=B, tile=tile, **kw)
    twin = select_blocks_paged_torch(q=q, summaries=summ, block_table=bt, seq_lens=lt,
                                     block_size=B, **kw)
    _compare((ids, lp, cnt), twin, bt, max_flips=2 * S)


def test_select_exact_ties_large_rows_gpu():
    """Exactly tied scores over a 2048-block row (register path, radix select on the GPU):
    the floor and the cap keep the lowest logical blocks, as the reference."""
    Hq, Hk, D, B = 32, 8, 128, 64
    n = 2048
    q, summ, bt, lt = _case(1, Hq, Hk, D, B, [n * B], seed=5, q_dtype=torch.float16)
    G = Hq // Hk
    phys = bt[0].long()
    qdir = q[0].float().view(Hk, G, D).sum(1)
    qdir = qdir / qdir.norm(dim=-1, keepdim=True)
    summ[phys] = -2.0 * qdir
    summ[phys[900:903]] = 4.0 * qdir
    summ[phys[100:2000:7]] = 1.0 * qdir
    kw = dict(block_size=B, score_scale=3.0, min_blocks=20, max_blocks=10, sink_blocks=1)
    ids, lp, cnt, _ = _run(q, summ, bt, lt, **kw)
    twin = select_blocks_paged_torch(q=q, summaries=summ, block_table=bt, seq_lens=lt, **kw)
    _compare((ids, lp, cnt), twin, bt, max_flips=0)
    middle = list(range(100, 2000, 7))
    want = sorted([0, 900, 901, 902] + middle[:5] + [n - 1])
    where = {p: c for c, p in enumerate(phys.tolist())}
    for h in range(Hk):
        got = [where[p] for p in ids[0, h, :int(cnt[0, h])].tolist()]
        assert got == want, (h, got)
