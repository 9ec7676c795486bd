"""`vllm-dash distill` (eval/distill.py): the batched pooling against the reference, the
dense block mass against kernels/recall.block_mass, and a CPU smoke run on a tiny model
whose attention has structure to learn (a held-out check that a broken fit fails)."""
import json
import os

import pytest
import torch

from vllm_dash.eval import capture as C
from vllm_dash.eval import distill as Dm
from vllm_dash.kernels import reference
from vllm_dash.kernels.recall import block_mass


def test_pool_summaries_match_the_reference():
    g = torch.Generator().manual_seed(0)
    L, Hk, nb, B, D = 2, 3, 4, 16, 8
    keys = torch.randn(L, Hk, nb, B, D, generator=g) * 3
    pool = torch.randn(L, Hk, D, generator=g)
    got = Dm.pool_summaries(keys, pool)
    for layer in range(L):
        k = keys[layer].reshape(1, Hk, nb * B, D)
        want = reference.block_summaries(k, B, summary="attn_pool", pool=pool[layer])[0]
        torch.testing.assert_close(got[layer], want, atol=1e-5, rtol=1e-5)
        mean = reference.block_summaries(k, B, summary="mean")[0]
        torch.testing.assert_close(Dm.pool_summaries(keys, torch.zeros_like(pool))[layer],
                                   mean, atol=1e-5, rtol=1e-5)


def test_dense_block_mass_is_recall_block_mass():
    g = torch.Generator().manual_seed(1)
    Hq, Hk, T, D, B = 6, 2, 100, 8, 16
    q = torch.randn(Hq, 5, D, generator=g)
    k = torch.randn(Hk, T, D, generator=g) * 2
    pos = torch.tensor([0, 15, 16, 63, 99])
    got = C.dense_block_mass(q, k, pos, block_size=B, scale=0.3)
    want = block_mass(q.transpose(0, 1), k[None].expand(5, Hk, T, D), pos + 1,
                      block_size=B, scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_candidates_are_complete_blocks_past_the_sinks():
    cand = Dm.candidates(torch.tensor([63, 64, 200]), 4, 64, 1)
    assert cand.tolist() == [[False] * 4, [False] * 4, [False, True, True, False]]


def _peaked_llama(src, out):
    """The tiny Llama with every head attending to the tokens where v . x is large: keys
    carry c * (v . x) on the slowest RoPE pair (almost unrotated over 1K tokens) and all
    queries a positive bias there; the rest is the random model scaled by 0.1. A block's
    mass is then ruled by its largest few keys, which mean pooling dilutes and a pooling
    vector along that channel finds."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(src)
    cfg.attention_bias = True
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    m = AutoModelForCausalLM.from_config(cfg).float()
    m.load_state_dict(base.state_dict(), strict=False)
    g = torch.Generator().manual_seed(0)
    D, hid = cfg.head_dim, cfg.hidden_size
    Hq, Hk = cfg.num_attention_heads, cfg.num_key_value_heads
    lo = D // 2 - 1
    with torch.no_grad():
        for layer in m.model.layers:
            a = layer.self_attn
            v = torch.randn(hid, generator=g)
            kw = a.k_proj.weight.view(Hk, D, hid)
            kw.mul_(0.1)
            kw[:, lo, :] = 4.0 * v / v.norm()
            a.q_proj.weight.mul_(0.1)
            for proj in (a.q_proj, a.k_proj, a.v_proj):
                proj.bias.zero_()
            a.q_proj.bias.view(Hq, D)[:, lo] = 4.0
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def peaked_dir(tiny_llama_dir, tmp_path_factory):
    return _peaked_llama(str(tiny_llama_dir), str(tmp_path_factory.mktemp("peaked")))


def test_distill_cli_smoke(peaked_dir, tmp_path, monkeypatch):
    from safetensors import safe_open

    from vllm_dash.serving.cli import main

    monkeypatch.setenv("VLLM_DASH_COMMIT", "abc123")
    out = tmp_path / "pool.safetensors"
    rc = main(["distill", peaked_dir, "--out", str(out), "--lengths", "512", "--windows", "4",
               "--positions", "32", "--steps", "60", "--device", "cpu", "--quiet"])
    assert rc == 0
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == {"pool"}
        pool = f.get_tensor("pool")
        meta = f.metadata()
    assert pool.dtype == torch.float32 and tuple(pool.shape) == (2, 2, 32)
    assert meta["format"] == "vllm-dash-summaries/1"
    assert meta["model"] == os.path.basename(peaked_dir)
    assert meta["commit"] == "abc123" and meta["vllm_dash"] and meta["created"]
    assert json.loads(meta["lengths"]) == [512] and meta["windows"] == "4"
    assert "distill" in meta["data"] and "stdlib" in meta["data"]
    curve = json.loads(meta["loss_curve"])
    assert curve[0][0] == "mean" and curve[-1][0] == "attn_pool"
    held = json.loads(meta["held_out"])
    assert held["on"] == "held-out"
    # the fitted pooling must beat mean pooling (at its own fitted temperature) on the
    # held-out window by a wide margin on this model (measured: 0.158 -> 0.002)
    assert held["attn_pool"] < 0.5 * held["mean"], held


def test_distill_errors(tiny_llama_dir, tmp_path, capsys):
    from vllm_dash.serving.cli import main

    out = str(tmp_path / "x.safetensors")
    assert main(["distill", str(tiny_llama_dir), "--out", out, "--lengths", "100"]) == 2
    assert "lengths=[100] is invalid" in capsys.readouterr().err
    assert main(["distill", str(tmp_path / "nope"), "--out", out]) == 2
    assert "model=" in capsys.readouterr().err
    with pytest.raises(ValueError, match="block_size=48"):
        Dm.distill(str(tiny_llama_dir), block_size=48)
