"""The summary kinds (kernels/reference_summaries.py): each kind against an independent
definition, Quest's bound, gradients of the pooling vectors, the argument errors, and the
select kernel (kernels/scores.py K1) vs its twin with minmax summaries, on the CPU under the
Triton interpreter (small shapes) and on a GPU (real shapes, marked gpu). The fused write of
every kind vs its twin (prefill, chunked prefill, prefix sharing, block reuse): test_summaries.py.

Independent oracles: mean and minmax by a per-block loop; attn_pool by
torch.nn.functional.scaled_dot_product_attention(query=pool[h], key=k, value=k) per block
(the definition DashAttention's checkpoints use for their indexer_q).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from kernel_helpers import (DEVICES, INTERPRETER_WARNINGS, check_selection, on_devices,
                            run_select, select_case, select_twin, to_paged)
from vllm_dash.kernels import reference as ref
from vllm_dash.kernels.params import SUMMARY_KINDS, DashParams, summary_dim
from vllm_dash.kernels.select import SelectWorkspace
from vllm_dash.kernels.summaries import write_kv_and_summaries

pytestmark = INTERPRETER_WARNINGS
KINDS = list(SUMMARY_KINDS)


def _loop_summary(keys, summary, pool):
    """One block's summary by its definition: keys [n, Hk, D] (n >= 1) -> [Hk, Ds]."""
    kf = keys.float()
    if summary == "mean":
        return kf.mean(0)
    if summary == "minmax":
        return torch.cat([kf.amin(0), kf.amax(0)], dim=-1)
    rows = []
    for h in range(kf.shape[1]):
        k = kf[:, h][None, None]                                        # [1, 1, n, D]
        rows.append(F.scaled_dot_product_attention(pool[h][None, None, None], k, k)[0, 0, 0])
    return torch.stack(rows)


def _inputs(seed, S=3, Hk=2, L=45, D=16):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(S, Hk, L, D, generator=g) * 2 + 0.5
    pool = torch.randn(Hk, D, generator=g) * 2
    lens = torch.tensor([L, 17, 8][:S])
    return k, pool, lens


@pytest.mark.parametrize("summary", KINDS)
def test_block_summaries_vs_per_block_definition(summary):
    """Contiguous and paged summaries equal the per-block definition (SDPA for attn_pool);
    blocks past a sequence's end are zero; the paged one ignores garbage slots."""
    B = 8
    k, pool, lens = _inputs(1)
    pool = pool if summary == "attn_pool" else None
    got = ref.block_summaries(k, B, lens, summary=summary, pool=pool)
    S, Hk, L, D = k.shape
    assert got.shape == (S, Hk, -(-L // B), summary_dim(summary, D))
    for s in range(S):
        for c in range(got.shape[2]):
            n = min(B, int(lens[s]) - c * B)
            if n <= 0:
                assert (got[s, :, c] == 0).all()
                continue
            want = _loop_summary(k[s, :, c * B:c * B + n].transpose(0, 1), summary, pool)
            torch.testing.assert_close(got[s, :, c], want, rtol=1e-5, atol=1e-5)
    kc, _, bt = to_paged(k, k, lens, B, seed=2)
    paged = ref.block_summaries_paged(kc, bt, lens, summary=summary, pool=pool)
    for s in range(S):
        for c in range(-(-int(lens[s]) // B)):
            torch.testing.assert_close(paged[bt[s, c].long()], got[s, :, c], rtol=1e-6,
                                       atol=1e-6)


def test_attn_pool_gradients_flow_to_pool():
    """block_summaries with a pool that requires grad: finite gradients (empty blocks and
    absent slots included) equal to the gradients through the SDPA definition."""
    B = 8
    k, pool, lens = _inputs(3)
    k[1, :, 30:] = float("nan")                      # absent slots may hold anything
    p1 = pool.clone().requires_grad_(True)
    w = torch.randn(3, 2, 6, 16, generator=torch.Generator().manual_seed(4))
    (ref.block_summaries(k, B, lens, summary="attn_pool", pool=p1) * w).sum().backward()
    p2 = pool.clone().requires_grad_(True)
    total = 0.0
    for s in range(k.shape[0]):
        for c in range(-(-int(lens[s]) // B)):
            n = min(B, int(lens[s]) - c * B)
            blk = k[s, :, c * B:c * B + n].transpose(0, 1)
            total = total + (_loop_summary(blk, "attn_pool", p2) * w[s, :, c]).sum()
    total.backward()
    assert torch.isfinite(p1.grad).all() and p1.grad.abs().sum() > 0
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_minmax_score_bounds_every_key(seed):
    """Quest's bound: the minmax score of a block is >= the largest logit of its keys
    (equal for a block of one key), for every query head (GQA)."""
    B, S, Hq, Hk, L, D = 8, 2, 4, 2, 37, 16
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(S, Hk, L, D, generator=g)
    q = torch.randn(S, Hq, D, generator=g) * 3
    lens = torch.tensor([L, 33])                      # last block of sequence 1: one key
    summ = ref.block_summaries(k, B, lens, summary="minmax")
    scale = 1 / math.sqrt(D)
    u = ref.summary_scores(q, summ, "minmax", scale)                   # [S, Hq, n]
    logits = scale * torch.einsum("shd,shld->shl", q, k.repeat_interleave(Hq // Hk, dim=1))
    for s in range(S):
        for c in range(-(-int(lens[s]) // B)):
            best = logits[s, :, c * B:min((c + 1) * B, int(lens[s]))].amax(-1)
            assert (u[s, :, c] >= best - 1e-5).all()
    torch.testing.assert_close(u[1, :, 4], logits[1, :, 32], rtol=1e-5, atol=1e-5)


def test_dash_attention_paged_with_kinds_matches_contiguous():
    """dash_attention and dash_attention_paged agree for every kind (pool passed through)."""
    B = 8
    k, pool, lens = _inputs(5)
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(6))
    kc, vc, bt = to_paged(k, k.flip(-1), lens, B, seed=1)
    for summary in KINDS:
        params = DashParams(summary=summary, min_blocks=1)
        pl = pool if summary == "attn_pool" else None
        out, info = ref.dash_attention(q, k, k.flip(-1), params=params, block_size=B,
                                       seq_lens=lens, pool=pl)
        out_p, info_p = ref.dash_attention_paged(q, kc, vc, bt, lens, params=params, pool=pl)
        torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-5)
        assert torch.equal(info_p["counts"], info["counts"])


@pytest.mark.parametrize("device", DEVICES)
def test_argument_errors(device):
    """Bad kind, a missing / unexpected / misshapen pool and summaries of the wrong width
    are ValueErrors naming the option (reference, write kernel and its twin, selection)."""
    Hk, D, B = 2, 16, 8
    k = torch.zeros(1, Hk, 16, D, device=device)
    pool = torch.zeros(Hk, D, device=device)
    with pytest.raises(ValueError, match=r"summary='max' is invalid: must be one of"):
        DashParams(summary="max")
    with pytest.raises(ValueError, match="summary"):
        summary_dim("mean_pool", D)
    with pytest.raises(ValueError, match="needs pool"):
        ref.block_summaries(k, B, summary="attn_pool")
    with pytest.raises(ValueError, match="only used with summary='attn_pool'"):
        ref.block_summaries(k, B, summary="minmax", pool=pool)
    with pytest.raises(ValueError, match=r"pool must be fp32 \[Hk=2, D=16\]"):
        ref.block_summaries(k, B, summary="attn_pool", pool=pool[:1])
    with pytest.raises(ValueError, match="pool must be fp32"):
        ref.block_summaries(k, B, summary="attn_pool", pool=pool.half())
    kc = torch.zeros(4, B, Hk, D, device=device)
    key = torch.zeros(2, Hk, D, device=device)
    sm = torch.zeros(2, dtype=torch.long, device=device)
    for write in (write_kv_and_summaries, ref.write_kv_and_summaries):
        with pytest.raises(ValueError, match=r"summaries must be fp32 \[num_blocks>=4, 2, 32\]"):
            write(key=key, value=key, key_cache=kc, value_cache=kc,
                  summaries=torch.zeros(4, Hk, D, device=device), slot_mapping=sm,
                  summary="minmax")
        with pytest.raises(ValueError, match="needs pool"):
            write(key=key, value=key, key_cache=kc, value_cache=kc,
                  summaries=torch.zeros(4, Hk, D, device=device), slot_mapping=sm,
                  summary="attn_pool")
        with pytest.raises(ValueError, match="summary='avg' is invalid"):
            write(key=key, value=key, key_cache=kc, value_cache=kc,
                  summaries=torch.zeros(4, Hk, D, device=device), slot_mapping=sm,
                  summary="avg")
    q, summ, bt, lt = select_case(1, 4, Hk, D, B, [20], seed=0, device=device)
    with pytest.raises(ValueError, match=r"summaries must be fp32 \[num_blocks, Hk, 32\]"):
        run_select(q, summ, bt, lt, block_size=B, summary="minmax")
    with pytest.raises(ValueError, match=r"summaries must be fp32 \[num_blocks, Hk, 16\]"):
        select_twin(q=q, summaries=torch.cat([summ, summ], -1), block_table=bt, seq_lens=lt,
                    block_size=B)


# --------------------------------------------------------------------------------------
# stage 1 on minmax summaries: K1's two-dot bound vs the twin
# --------------------------------------------------------------------------------------
def _minmax_case(S, Hq, Hk, D, B, lens, *, seed, device, q_dtype=torch.float32):
    """select_case with minmax summaries: a random centre +- a random non-negative radius
    (min <= max per channel, as a real block's), and the keys of block 0 of sequence 0
    whose summary it is (for the bound check)."""
    q, centre, bt, lt = select_case(S, Hq, Hk, D, B, lens, seed=seed, device=device,
                                    q_dtype=q_dtype)
    g = torch.Generator(device=device).manual_seed(seed + 100)
    radius = torch.rand(centre.shape, generator=g, device=device) * 1.5
    return q, torch.cat([centre - radius, centre + radius], -1), bt, lt


MINMAX_SMALL = [dict(Hq=4, Hk=2, D=32, B=16, lens=[16 * 20 + 3, 40, 16 * 9], settings={}),
                dict(Hq=8, Hk=1, D=16, B=16, lens=[16 * 30, 90],
                     settings=dict(score_norm="standardize", score_scale=2.0, min_blocks=2,
                                   sink_blocks=1, local_blocks=1))]
MINMAX_REAL = [dict(Hq=32, Hk=8, D=D, B=64, lens=[128 * 1024, 40000, 70000, 300],
                    settings=dict(score_norm="standardize", score_scale=2.0, min_blocks=4,
                                  sink_blocks=1, local_blocks=1), q_dtype=torch.bfloat16)
               for D in (64, 128)]


@pytest.mark.parametrize("device,case", on_devices(cpu=MINMAX_SMALL, cuda=MINMAX_REAL))
def test_select_minmax_kernel_vs_twin(device, case):
    """select_blocks_paged with summary="minmax" equals its twin (boundary flips allowed
    only on the real shapes); K1's scores (z in the workspace with score_norm none and
    score_scale 1) bound every key's logit of the keys inside the block's box."""
    Hq, Hk, D, B, lens = case["Hq"], case["Hk"], case["D"], case["B"], case["lens"]
    q, summ, bt, lt = _minmax_case(len(lens), Hq, Hk, D, B, lens, seed=D + B, device=device,
                                   q_dtype=case.get("q_dtype", torch.float32))
    real = device == "cuda"
    check_selection(q, summ, bt, lt, block_size=B, summary="minmax", max_flips=4 if real else 0,
                    check_margin=not real, **case["settings"])
    # the scores themselves: kernel u vs the twin's, and the bound on random box members
    ws = SelectWorkspace(len(lens) + 2, Hq, Hk, bt.shape[1], device=device)
    run_select(q, summ, bt, lt, block_size=B, summary="minmax", workspace=ws)
    twin = select_twin(q=q, summaries=summ, block_table=bt, seq_lens=lt, block_size=B,
                       summary="minmax")[3]
    n0 = int(twin.num_blocks[0])
    u = ws.scores[0, :, :n0]
    torch.testing.assert_close(u, twin.scores[0, :, :n0], rtol=1e-5,
                               atol=1e-5 * float(twin.scores[0, :, :n0].abs().max()))
    ids = bt[0, :n0].long()
    lo, hi = summ[ids, :, :D], summ[ids, :, D:]                          # [n0, Hk, D]
    g = torch.Generator(device=device).manual_seed(7)
    G = Hq // Hk
    for _ in range(3):
        key = lo + (hi - lo) * torch.rand(lo.shape, generator=g, device=device)
        logit = torch.einsum("hd,chd->hc", q[0].float(),
                             key.repeat_interleave(G, dim=1)) / math.sqrt(D)
        assert (u >= logit - 1e-4 * (1 + logit.abs())).all()


@pytest.mark.parametrize("device", DEVICES)
def test_write_ignores_nan_in_unwritten_slots(device):
    """A cache full of NaN (stale memory): a partial prefill and a decode token give finite
    summaries of every kind, equal to the twin's (slots >= fill are never read)."""
    B, Hk, D = 16, 2, 32
    g = torch.Generator(device=device).manual_seed(9)
    pool = torch.randn(Hk, D, generator=g, device=device)
    key = torch.randn(6, Hk, D, generator=g, device=device)
    for summary in KINDS:
        kind = dict(summary=summary, pool=pool if summary == "attn_pool" else None)
        kc = torch.full((3, B, Hk, D), float("nan"), device=device)
        kc_t = kc.clone()
        summ = torch.full((3, Hk, summary_dim(summary, D)), float("nan"), device=device)
        summ_t = summ.clone()
        for slots in ([B + 0, B + 1, B + 2, B + 3, B + 4], [B + 5]):       # block 1
            sm = torch.tensor(slots, device=device)
            k = key[:len(slots)]
            write_kv_and_summaries(key=k, value=k, key_cache=kc, value_cache=kc,
                                   summaries=summ, slot_mapping=sm, **kind)
            ref.write_kv_and_summaries(key=k, value=k, key_cache=kc_t, value_cache=kc_t,
                                       summaries=summ_t, slot_mapping=sm, **kind)
            assert torch.isfinite(summ[1]).all(), summary
            torch.testing.assert_close(summ[1], summ_t[1], rtol=1e-5, atol=1e-5)
