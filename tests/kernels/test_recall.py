"""Attention recall (kernels/recall.py): the block mass against a per-token loop, recall and
oracle against their definitions, the oracle as the ceiling of any selection with the same
budget, and the edge cases (every block selected, dense attention through the reference)."""
import math

import pytest
import torch

from kernel_helpers import dash_inputs
from vllm_dash.kernels import recall as RC
from vllm_dash.kernels import reference as R
from vllm_dash.kernels.params import DashParams as P


def test_block_mass_matches_a_loop():
    B, D = 16, 32
    q, k, _, lens = dash_inputs(3, 3, 8, 2, 100, D, lens=[100, 37, 5])
    k[1, :, 37:] = float("nan")                       # past the end: must not matter
    mass = RC.block_mass(q, k, lens, block_size=B)
    assert mass.shape == (3, 8, 7)
    for s, L in enumerate([100, 37, 5]):
        for h in range(8):
            a = torch.softmax(k[s, h // 4, :L].double() @ q[s, h].double() / math.sqrt(D), 0)
            want = [float(a[c * B:(c + 1) * B].sum()) for c in range(-(-L // B))]
            got = mass[s, h, :len(want)].double()
            torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64),
                                       atol=1e-6, rtol=1e-5)
            assert torch.all(mass[s, h, len(want):] == 0)
    torch.testing.assert_close(mass.sum(-1), torch.ones(3, 8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(score_scale=3.0), dict(score_scale=1e4, min_blocks=2),
                                dict(selector="topk", min_blocks=3, sink_blocks=1)])
def test_recall_and_oracle(kw):
    B, D, Hq, Hk = 16, 32, 8, 2
    q, k, v, lens = dash_inputs(5, 4, Hq, Hk, 240, D, lens=[240, 200, 130, 40])
    _, info = R.dash_attention(q, k, v, params=P(**kw), block_size=B, seq_lens=lens)
    sel = info["selection"]
    mass = RC.block_mass(q, k, lens, block_size=B)
    res = RC.attention_recall(mass, sel)
    G = Hq // Hk
    for s in range(4):
        for h in range(Hq):
            chosen = sel.selected[s, h // G]
            assert math.isclose(float(res["recall"][s, h]), float(mass[s, h][chosen].sum()),
                                rel_tol=1e-6, abs_tol=1e-7)
        for kv in range(Hk):
            n = int(sel.num_blocks[s])
            m = int(sel.selected[s, kv].sum())
            assert int(res["blocks"][s, kv]) == m
            group = mass[s, kv * G:(kv + 1) * G, :n]
            best = sorted(range(n), key=lambda c: (-float(group[:, c].mean()), c))[:m]
            for g in range(G):
                want = float(group[g, best].sum())
                assert math.isclose(float(res["oracle"][s, kv * G + g]), want, rel_tol=1e-6,
                                    abs_tol=1e-7)
    # the oracle is the ceiling of the group-mean recall at the same budget
    mean_r = res["recall"].view(4, Hk, G).mean(-1)
    mean_o = res["oracle"].view(4, Hk, G).mean(-1)
    assert torch.all(mean_o >= mean_r - 1e-6)
    assert torch.all(res["recall"] <= 1 + 1e-5) and torch.all(res["recall"] > 0)


def test_every_block_selected_recalls_everything():
    q, k, v, lens = dash_inputs(7, 3, 4, 2, 90, 32)
    _, info = R.dash_attention(q, k, v, params=P(score_scale=0.0), block_size=16,
                               seq_lens=lens)
    res = RC.attention_recall(RC.block_mass(q, k, lens, block_size=16), info["selection"])
    torch.testing.assert_close(res["recall"], torch.ones(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(res["oracle"], torch.ones(3, 4), atol=1e-5, rtol=0)


def test_shape_mismatch_is_an_error():
    q, k, v, lens = dash_inputs(8, 2, 4, 2, 64, 32)
    _, info = R.dash_attention(q, k, v, params=P(), block_size=16, seq_lens=lens)
    mass = RC.block_mass(q, k, lens, block_size=32)
    with pytest.raises(ValueError, match="does not match"):
        RC.attention_recall(mass, info["selection"])
