"""eval/capture.py (post-RoPE q/k through transformers' AttentionInterface) and eval/text.py
(the stdlib-docstring text and its disjoint distill / recall slices), on the tiny model."""
import pytest
import torch

from vllm_dash.eval import capture as C
from vllm_dash.eval import text as T


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return C.load_model(str(tiny_llama_dir), "cpu")


def test_capture_shapes_and_unchanged_forward(tiny, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    lm, _ = tiny
    ids = torch.randint(3, 900, (200,), generator=torch.Generator().manual_seed(0))
    cap = C.capture(lm, ids, [150, 7, 199])
    cfg = lm.config
    assert cap.num_layers == cfg.num_hidden_layers
    assert cap.positions.tolist() == [7, 150, 199]
    assert cap.keys[0].shape == (cfg.num_key_value_heads, 200, cfg.head_dim)
    assert cap.queries[0].shape == (cfg.num_attention_heads, 3, cfg.head_dim)
    assert cap.scales[0] == pytest.approx(cfg.head_dim ** -0.5)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32,
                                               attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids[None]).logits,
                                   ref(input_ids=ids[None]).logits, atol=1e-5, rtol=1e-5)


def test_captured_q_k_give_the_models_attention(tiny, tiny_llama_dir):
    """Row p of the eager model's attention weights = softmax(scale q_p . k_t), t <= p:
    the captured queries and keys are the post-RoPE ones the model attends with."""
    from transformers import AutoModelForCausalLM

    lm, _ = tiny
    ids = torch.randint(3, 900, (130,), generator=torch.Generator().manual_seed(1))
    pos = [5, 64, 129]
    cap = C.capture(lm, ids, pos)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32,
                                               attn_implementation="eager").eval()
    with torch.no_grad():
        att = ref(input_ids=ids[None], output_attentions=True).attentions
    for layer in range(cap.num_layers):
        q, k = cap.queries[layer], cap.keys[layer]
        G = q.shape[0] // k.shape[0]
        kr = k.repeat_interleave(G, dim=0)                                   # [Hq, T, D]
        for j, p in enumerate(pos):
            a = torch.softmax(cap.scales[layer] * kr[:, :p + 1] @ q[:, j, :, None], dim=1)
            torch.testing.assert_close(a[..., 0], att[layer][0, :, p, :p + 1],
                                       atol=1e-5, rtol=1e-4)


def test_capture_and_load_errors(tiny, tmp_path):
    lm, _ = tiny
    with pytest.raises(ValueError, match="positions"):
        C.capture(lm, torch.arange(10), [10])
    with pytest.raises(ValueError, match="device='tpu'"):
        C.load_model(str(tmp_path), "tpu")
    with pytest.raises(ValueError, match="model="):
        C.resolve_model(str(tmp_path / "missing"))


def test_sample_positions():
    g = torch.Generator().manual_seed(0)
    p = C.sample_positions(1000, 20, g, low=500)
    assert p.tolist() == sorted(set(p.tolist())) and len(p) == 20
    assert 500 <= int(p.min()) and int(p.max()) <= 999
    assert C.sample_positions(10, 50, g, low=4).tolist() == list(range(4, 10))


def test_text_slices_are_disjoint_and_windows_deterministic(tiny):
    _, tok = tiny
    d, r = set(T.slice_modules("distill")), set(T.slice_modules("recall"))
    assert d and r and not d & r and d | r == set(T.STDLIB_MODULES)
    w1 = T.token_windows(tok, "recall", 300, 3, seed=5)
    assert w1 == T.token_windows(tok, "recall", 300, 3, seed=5)
    assert [len(w) for w in w1] == [300] * 3
    assert all(w[0] == tok.bos_token_id for w in w1)
    assert w1[0] != w1[1]
    assert T.token_windows(tok, "recall", 300, 1, seed=6)[0] != w1[0]
    a, b = T.cut_windows(tok, "distill", [50, 80], seed=2)     # consecutive, no overlap
    (big,) = T.cut_windows(tok, "distill", [129], seed=2)
    assert big[1:] == a[1:] + b[1:] and len(a) == 50 and len(b) == 80
    assert "recall" in T.describe("recall", 5) and "seed 5" in T.describe("recall", 5)
    with pytest.raises(ValueError, match="part='test'"):
        T.slice_modules("test")
    with pytest.raises(ValueError, match="length"):
        T.token_windows(tok, "distill", 1, 1, 0)
