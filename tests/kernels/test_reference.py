"""The DASH reference (kernels/reference.py): against an independent loop implementation
(naive_dash.py), paged == contiguous, dense equivalence, selection rules, summaries,
argument checks. The numeric equivalences run on the CPU and on a GPU (the reference is the
twin every GPU kernel test compares with); the rules on the CPU."""
import math

import pytest
import torch

from kernel_helpers import DEVICES, dash_inputs, to_paged
from naive_dash import naive_dash_decode
from vllm_dash.kernels import reference as R
from vllm_dash.kernels.params import DashParams as P


def selected_lists(info, num_blocks):
    ids, counts = info["block_ids"], info["counts"]
    return [[ids[s, h, : counts[s, h]].tolist() for h in range(ids.shape[1])]
            for s in range(ids.shape[0])]


CONFIGS = [
    # (Hq, Hk, D, B, L, kwargs)
    (4, 2, 32, 16, 100, dict()),
    (8, 1, 64, 16, 64, dict(alpha=1.25, score_scale=4.0)),
    (4, 4, 32, 8, 77, dict(alpha=2.0, score_scale=3.0)),
    (6, 2, 32, 16, 130, dict(alpha=1.75, score_scale=0.5)),
    (4, 2, 32, 16, 150, dict(score_norm="standardize", score_scale=1.5)),
    (4, 2, 32, 16, 150, dict(prior_norm="max", prior_weight=0.5)),
    (4, 2, 32, 16, 160, dict(sink_blocks=1, local_blocks=2, score_scale=4.0)),
    (8, 2, 32, 16, 200, dict(min_blocks=3, score_scale=6.0, score_norm="standardize")),
    (8, 2, 32, 16, 200, dict(max_blocks=4, score_scale=0.2)),
    (8, 2, 32, 16, 200, dict(max_blocks=5, min_blocks=2, sink_blocks=1, local_blocks=1,
                             score_scale=3.0, prior_norm="max")),
    (4, 2, 32, 16, 90, dict(dense_below=60, score_scale=5.0)),
    (4, 2, 32, 32, 20, dict()),                       # L < block size: one block
    (4, 2, 32, 16, 16, dict(score_scale=2.0)),        # exactly one full block
    (4, 2, 32, 64, 300, dict(prior_weight=0.0, score_scale=8.0)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_reference_matches_independent_implementation(device, cfg):
    Hq, Hk, D, B, L, kw = CONFIGS[cfg]
    q, k, v, lens = dash_inputs(cfg, 5, Hq, Hk, L, D, device=device)
    out, info = R.dash_attention(q, k, v, block_size=B, seq_lens=lens, params=P(**kw))
    ref_out, ref_sel = naive_dash_decode(q.cpu(), k.cpu(), v.cpu(), lens.cpu(), block_size=B,
                                         params=P(**kw))
    assert selected_lists(info, None) == ref_sel
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_paged_equals_contiguous(device, cfg):
    Hq, Hk, D, B, L, kw = CONFIGS[cfg]
    q, k, v, lens = dash_inputs(100 + cfg, 4, Hq, Hk, L, D, device=device)
    out_c, info_c = R.dash_attention(q, k, v, block_size=B, seq_lens=lens, params=P(**kw))
    kc, vc, table = to_paged(k, v, lens, B, seed=cfg)
    out_p, info_p = R.dash_attention_paged(q, kc, vc, table, lens, params=P(**kw))
    torch.testing.assert_close(out_p, out_c, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(info_p["density"], info_c["density"])
    torch.testing.assert_close(info_p["counts"], info_c["counts"])
    # physical ids in the paged info are the logical ids of the contiguous info, mapped
    for s in range(q.shape[0]):
        for h in range(Hk):
            n = int(info_c["counts"][s, h])
            logical = info_c["block_ids"][s, h, :n]
            assert info_p["block_ids"][s, h, :n].tolist() == table[s, logical.long()].tolist()
    # the same with maintained summaries passed in, and with a head-major cache view
    summ = R.block_summaries_paged(kc, table, lens)
    kh, vh = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
    out_h, _ = R.dash_attention_paged(q, kh.transpose(1, 2), vh.transpose(1, 2), table, lens,
                                      summaries=summ, params=P(**kw))
    torch.testing.assert_close(out_h, out_c, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hk", [(4, 2), (8, 1), (4, 4)])
def test_dense_equivalence_with_sdpa(device, dtype, Hq, Hk):
    """score_scale 0 -> entmax is uniform -> every block selected; prior_weight 0 -> flat:
    the output is dense attention (torch SDPA), also through dense_below."""
    D, B, L = 32, 16, 150
    q, k, v, lens = dash_inputs(7, 4, Hq, Hk, L, D, dtype=dtype, device=device)
    out, info = R.dash_attention(q, k, v, block_size=B, seq_lens=lens,
                                 params=P(score_scale=0.0, prior_weight=0.0))
    out2, info2 = R.dash_attention(q, k, v, block_size=B, seq_lens=lens,
                                   params=P(score_scale=5.0, dense_below=L + 1))
    assert torch.all(info["density"] == 1.0) and torch.all(info2["density"] == 1.0)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for s in range(q.shape[0]):
        n = int(lens[s])
        G = Hq // Hk
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[s].float()[:, None, :], k[s, :, :n].float().repeat_interleave(G, 0),
            v[s, :, :n].float().repeat_interleave(G, 0))[:, 0]
        torch.testing.assert_close(out[s].float(), ref, **tol)
        torch.testing.assert_close(out2[s].float(), ref, **tol)


def test_density_decreases_as_score_scale_grows():
    q, k, v, lens = dash_inputs(11, 6, 8, 2, 512, 32, lens=[512, 480, 400, 333, 256, 200])
    dens = []
    for s in [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0]:
        _, info = R.dash_attention(q, k, v, block_size=16, seq_lens=lens, params=P(score_scale=s))
        dens.append(info["density"])
    for a, b in zip(dens, dens[1:]):
        assert torch.all(b <= a + 1e-9)          # per (sequence, KV head), monotone
    assert dens[0].mean() == 1.0
    assert dens[-1].mean() < 0.35 * dens[0].mean()


def test_forced_blocks_always_selected():
    B = 16
    q, k, v, lens = dash_inputs(12, 5, 8, 2, 400, 32)
    for kw in [dict(score_scale=1e3), dict(score_scale=1e3, sink_blocks=2, local_blocks=3),
               dict(score_scale=1e3, sink_blocks=1, local_blocks=2, max_blocks=3)]:
        _, info = R.dash_attention(q, k, v, block_size=B, seq_lens=lens, params=P(**kw))
        sel = info["selection"]
        for s in range(q.shape[0]):
            n = int(sel.num_blocks[s])
            must = {n - 1} | set(range(min(kw.get("sink_blocks", 0), n))) | \
                set(range(max(0, n - kw.get("local_blocks", 0)), n))
            for h in range(2):
                got = set(torch.nonzero(sel.selected[s, h]).flatten().tolist())
                assert must <= got
                assert all(sel.prior[s, h, c] == 1.0 for c in must)
                if "max_blocks" in kw:
                    assert len(got) <= kw["max_blocks"]


def test_gqa_union_semantics():
    q, k, v, lens = dash_inputs(13, 4, 8, 2, 320, 32)
    _, info = R.dash_attention(q, k, v, block_size=16, seq_lens=lens, params=P(score_scale=3.0))
    sel = info["selection"]
    S, Hk, n_max = sel.selected.shape
    union = (sel.probs > 0).view(S, Hk, 4, n_max).any(2)
    current = torch.arange(n_max)[None, :] == (sel.num_blocks - 1)[:, None]
    assert torch.equal(sel.selected, union | current[:, None, :])
    # the support of a single head is strictly smaller than the union for some group
    per_head = (sel.probs > 0).sum(-1).view(S, Hk, 4)
    assert (per_head.max(-1).values < union.sum(-1)).any()
    # prior = GQA mean of the heads' probabilities (non-forced blocks)
    pbar = sel.probs.view(S, Hk, 4, n_max).mean(2)
    mask = sel.selected & ~current[:, None, :]
    torch.testing.assert_close(sel.prior[mask], pbar[mask])


def test_min_blocks_floor_and_max_blocks_cap():
    B = 16
    q, k, v, lens = dash_inputs(14, 4, 8, 2, 480, 32, lens=[480, 300, 47, 200])
    _, sparse = R.dash_attention(q, k, v, block_size=B, seq_lens=lens, params=P(score_scale=1e4))
    _, floored = R.dash_attention(q, k, v, block_size=B, seq_lens=lens,
                                  params=P(score_scale=1e4, min_blocks=4))
    n = sparse["num_blocks"]
    assert torch.all(floored["counts"] >= torch.minimum(n, torch.tensor(4))[:, None])
    assert torch.all(floored["counts"] >= sparse["counts"])
    # each head's 4 best blocks are in
    sel = floored["selection"]
    for s in range(4):
        for h in range(8):
            top = sel.scores[s, h, : int(n[s])].topk(min(4, int(n[s]))).indices
            assert sel.selected[s, h // 4, top].all()
    _, capped = R.dash_attention(q, k, v, block_size=B, seq_lens=lens,
                                 params=P(score_scale=0.0, max_blocks=3))
    assert torch.all(capped["counts"] == torch.minimum(n, torch.tensor(3))[:, None])


def test_prior_norm_max():
    q, k, v, lens = dash_inputs(15, 3, 8, 2, 320, 32)
    _, info = R.dash_attention(q, k, v, block_size=16, seq_lens=lens,
                               params=P(score_scale=2.0, prior_norm="max"))
    sel = info["selection"]
    assert float(sel.prior.max()) == 1.0
    top = sel.mean_probs.argmax(-1, keepdim=True)
    assert torch.all(sel.prior.gather(-1, top) == 1.0)
    assert torch.all((sel.prior > 0) == sel.selected)


def test_info_and_density_accounting():
    B = 16
    q, k, v, lens = dash_inputs(16, 3, 4, 2, 100, 32, lens=[100, 33, 5])
    _, info = R.dash_attention(q, k, v, block_size=B, seq_lens=lens, params=P(score_scale=1e4))
    assert info["num_blocks"].tolist() == [7, 3, 1]
    sel = info["selection"]
    for s, L in enumerate([100, 33, 5]):
        for h in range(2):
            ids = info["block_ids"][s, h]
            c = int(info["counts"][s, h])
            assert ids[:c].tolist() == sorted(ids[:c].tolist()) and torch.all(ids[c:] == -1)
            toks = sum(min(B, L - b * B) for b in ids[:c].tolist())
            assert int(info["selected_tokens"][s, h]) == toks
            assert math.isclose(float(info["density"][s, h]), toks / L, rel_tol=1e-6)
    assert info["density"][2].tolist() == [1.0, 1.0]      # one block: everything


def test_block_summaries():
    k = torch.arange(2 * 1 * 10 * 2, dtype=torch.float32).view(2, 1, 10, 2)
    s = R.block_summaries(k, 4, seq_lens=[10, 5])
    torch.testing.assert_close(s[0, 0, 0], k[0, 0, 0:4].mean(0))
    torch.testing.assert_close(s[0, 0, 2], k[0, 0, 8:10].mean(0))       # partial: 2 keys
    torch.testing.assert_close(s[1, 0, 1], k[1, 0, 4:5].mean(0))        # 1 present key
    assert torch.all(s[1, 0, 2] == 0)                                   # past the end
    q, kk, v, lens = dash_inputs(17, 3, 4, 2, 70, 32)
    kc, vc, table = to_paged(kk, v, lens, 16)
    sp = R.block_summaries_paged(kc, table, lens)
    sc = R.block_summaries(kk, 16, lens)
    for si in range(3):
        for c in range(-(-int(lens[si]) // 16)):
            torch.testing.assert_close(sp[table[si, c]], sc[si, :, c])


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_shared_blocks_in_paged_layout(device):
    """Two sequences sharing their first full blocks (prefix caching) read the same
    physical blocks and get the same result as unshared copies."""
    B, D = 16, 32
    q, k, v, _ = dash_inputs(18, 2, 4, 2, 80, D, lens=[80, 80], device=device)
    k[1, :, :48], v[1, :, :48] = k[0, :, :48], v[0, :, :48]
    lens = torch.tensor([80, 70], device=device)
    kc, vc, table = to_paged(k, v, lens, B)
    shared = table.clone()
    shared[1, :3] = table[0, :3]
    out_a, _ = R.dash_attention_paged(q, kc, vc, table, lens, params=P(score_scale=2.0))
    out_b, info = R.dash_attention_paged(q, kc, vc, shared, lens, params=P(score_scale=2.0))
    torch.testing.assert_close(out_a, out_b)


@pytest.mark.parametrize("kw,name", [
    (dict(alpha=1.0), "alpha"), (dict(alpha=2.5), "alpha"), (dict(alpha=0.5), "alpha"),
    (dict(alpha="x"), "alpha"),
    (dict(sink_blocks=-1), "sink_blocks"), (dict(local_blocks=-2), "local_blocks"),
    (dict(min_blocks=-1), "min_blocks"), (dict(dense_below=-5), "dense_below"),
    (dict(max_blocks=0), "max_blocks"), (dict(max_blocks=-3), "max_blocks"),
    (dict(max_blocks=2, sink_blocks=2), "max_blocks"),
    (dict(score_scale=-1.0), "score_scale"), (dict(score_scale=float("inf")), "score_scale"),
    (dict(prior_weight=1.5), "prior_weight"), (dict(prior_weight=-0.1), "prior_weight"),
    (dict(score_norm="zscore"), "score_norm"), (dict(prior_norm="sum"), "prior_norm"),
    (dict(selector="quest"), "selector"), (dict(selector="topk", min_blocks=0), "min_blocks"),
])
def test_invalid_params_name_the_key_and_allowed_values(kw, name):
    """The knobs are checked once, when a DashParams is built."""
    with pytest.raises(ValueError, match=name) as e:
        P(**kw)
    assert "must be" in str(e.value)
    with pytest.raises(ValueError, match=name):
        P().replace(**kw)


@pytest.mark.parametrize("kw,name", [
    (dict(block_size=12), "block_size"), (dict(block_size=0), "block_size"),
    (dict(block_size=-16), "block_size"), (dict(scale=0.0), "scale"),
])
def test_invalid_arguments_name_the_argument(kw, name):
    q, k, v, lens = dash_inputs(19, 2, 4, 2, 64, 32)
    args = dict(block_size=16)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        R.dash_attention(q, k, v, seq_lens=lens, params=P(), **args)
    if name != "block_size":
        kc, vc, table = to_paged(k, v, lens, 16)
        paged_args = {a: b for a, b in args.items() if a != "block_size"}
        with pytest.raises(ValueError, match=name):
            R.dash_attention_paged(q, kc, vc, table, lens, params=P(), **paged_args)
    with pytest.raises(TypeError, match="DashParams"):
        R.dash_attention(q, k, v, seq_lens=lens, params=dict(alpha=1.5), block_size=16)


def test_invalid_shapes_name_the_argument():
    q, k, v, lens = dash_inputs(20, 2, 6, 4, 64, 32)
    with pytest.raises(ValueError, match="query heads"):
        R.dash_attention(q, k, v, params=P(), block_size=16)
    q, k, v, lens = dash_inputs(20, 2, 4, 2, 64, 32)
    with pytest.raises(ValueError, match="seq_lens"):
        R.dash_attention(q, k, v, block_size=16, params=P(), seq_lens=[64, 65])
    with pytest.raises(ValueError, match="seq_lens"):
        R.dash_attention(q, k, v, block_size=16, params=P(), seq_lens=[0, 3])
    with pytest.raises(ValueError, match="block_size"):
        kc, vc, table = to_paged(k, v, lens, 16)
        R.dash_attention_paged(q, kc, vc, table, lens, params=P(), block_size=32)


@pytest.mark.parametrize("device", DEVICES)
def test_garbage_in_unwritten_slots_is_ignored(device):
    """Slots past a sequence's end (the tail of the current block, unused blocks) may hold
    anything, NaN included: nothing of it reaches the output or the summaries."""
    q, k, v, lens = dash_inputs(21, 3, 4, 2, 70, 32, lens=[70, 37, 5], device=device)
    kc, vc, table = to_paged(k, v, lens, 16)
    out, _ = R.dash_attention_paged(q, kc, vc, table, lens, params=P(score_scale=2.0))
    for s in range(3):
        n = -(-int(lens[s]) // 16)
        last = table[s, n - 1]
        fill = int(lens[s]) - (n - 1) * 16
        kc[last, fill:] = float("nan")
        vc[last, fill:] = float("nan")
    out_nan, info = R.dash_attention_paged(q, kc, vc, table, lens, params=P(score_scale=2.0))
    assert torch.isfinite(out_nan).all()
    torch.testing.assert_close(out_nan, out)
    kn, vn = k.clone(), v.clone()
    for s in range(3):
        kn[s, :, int(lens[s]):] = float("nan")
        vn[s, :, int(lens[s]):] = float("nan")
    out_c, _ = R.dash_attention(q, kn, vn, block_size=16, seq_lens=lens, params=P(score_scale=2.0))
    torch.testing.assert_close(out_c, out)
