"""Compacted head-major page tables (the FA3 stage-2 path) give DASH's stage 2 with
prior_weight 0: checked with the torch twin of the external kernel's contract."""
import pytest
import torch

import fa_tables as F
from vllm_dash.kernels import reference as R
from vllm_dash.kernels.params import DashParams


@pytest.mark.parametrize("Hq,Hk,B", [(4, 2, 16), (8, 1, 16), (4, 4, 32)])
def test_tables_reproduce_reference_stage2(Hq, Hk, B):
    gen = torch.Generator().manual_seed(Hq * 10 + Hk)
    S, D, num_blocks, M = 4, 32, 40, 8
    lens = torch.tensor([M * B, 3 * B, B - 5, 5 * B + 1], dtype=torch.int32)
    table = torch.randperm(num_blocks, generator=gen)[: S * M].view(S, M).to(torch.int32)
    kc = torch.randn(num_blocks, Hk, B, D, generator=gen)         # head-major cache
    vc = torch.randn(num_blocks, Hk, B, D, generator=gen)
    q = torch.randn(S, Hq, D, generator=gen)
    _, info = R.dash_attention_paged(q, kc.transpose(1, 2), vc.transpose(1, 2), table, lens,
                                     params=DashParams(score_scale=40.0, prior_weight=0.0))
    sel = info["selection"]
    assert (info["counts"] < info["num_blocks"][:, None]).any()    # really sparse
    ids = torch.zeros(S + 2, Hk, M, dtype=torch.int32)              # capacity > S
    cnt = torch.zeros(S + 2, Hk, dtype=torch.int32)
    ids[:S] = info["block_ids"].clamp_min(0).to(torch.int32)
    cnt[:S] = info["counts"].to(torch.int32)
    out_table = torch.full(((S + 2) * Hk, M), -7, dtype=torch.int32)
    out_used = torch.full(((S + 2) * Hk,), -7, dtype=torch.int32)
    F.compact_head_major_tables(block_ids=ids, counts=cnt, seq_lens=lens, block_size=B,
                                out_block_table=out_table, out_seqused_k=out_used)
    assert torch.all(out_table[: S * Hk] >= 0) and torch.all(out_table[S * Hk:] == -7)
    assert torch.equal(out_used[: S * Hk].view(S, Hk), sel.selected_tokens().to(torch.int32))
    o = F.head_major_decode_torch(F.queries_as_groups(q, Hk), F.head_major_page_view(kc),
                                  F.head_major_page_view(vc), out_table, out_used,
                                  scale=D ** -0.5)
    ref = R.sparse_attention(q, R.gather_paged(kc.transpose(1, 2), table, lens),
                             R.gather_paged(vc.transpose(1, 2), table, lens), sel,
                             params=DashParams(prior_weight=0.0))
    torch.testing.assert_close(F.groups_as_queries(o, S), ref, atol=1e-5, rtol=1e-5)
