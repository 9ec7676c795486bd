"""Attention recall of methods on held-out natural text (eval/recall.py), on the tiny model:
dense is 1, the oracle bounds every method at its budget, top-k recall and density rise
with k, and attn_pool with zero pooling vectors is mean pooling exactly."""
import json

import pytest
import torch

from vllm_dash.eval import recall as R


def _method(name, family, **dash):
    base = {"score_norm": "standardize", "prior_weight": 0.0, "sink_blocks": 1,
            "local_blocks": 1, "dense_below": 0}
    return {"name": name, "family": family, "dash": {**base, **dash}}


@pytest.fixture(scope="module")
def zero_pool(tmp_path_factory):
    from safetensors.torch import save_file

    path = str(tmp_path_factory.mktemp("pool") / "zero.safetensors")
    save_file({"pool": torch.zeros(2, 2, 32)}, path, metadata={"format": "vllm-dash-summaries/1"})
    return path


def test_recall_rows(tiny_llama_dir, zero_pool, tmp_path):
    methods = [{"name": "dense", "family": "dense", "dash": None}]
    methods += [_method(f"topk-k{k}", "topk", selector="topk", min_blocks=k, summary="mean")
                for k in (1, 2, 4, 8)]
    methods += [_method("dash", "dash", score_scale=2.0, min_blocks=2, summary="mean"),
                _method("minmax-topk-k2", "minmax-topk", selector="topk", min_blocks=2,
                        summary="minmax"),
                _method("minmax-dash", "minmax-dash", score_scale=2.0, summary="minmax"),
                _method("pool-topk-k2", "pool-topk", selector="topk", min_blocks=2,
                        summary="attn_pool"),
                _method("pool-dash", "pool-dash", score_scale=2.0, min_blocks=2,
                        summary="auto")]
    mfile = tmp_path / "methods.json"
    mfile.write_text(json.dumps(methods))
    out = tmp_path / "recall.json"
    rc = R.recall_main([str(tiny_llama_dir), "--out", str(out), "--methods", str(mfile),
                        "--summary-file", zero_pool, "--lengths", "640", "--windows", "1",
                        "--positions", "6", "--device", "cpu", "--quiet"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert "recall" in data["meta"]["data"]
    rows = {r["method"]: r for r in data["rows"]}
    assert [r["method"] for r in data["rows"]] == [m["name"] for m in methods]
    for r in rows.values():
        assert r["length"] == 640 and r["n_positions"] == 6
        assert len(r["recall_per_layer"]) == 2
        assert 0 < r["recall"] <= 1 + 1e-6 and 0 < r["density"] <= 1 + 1e-6
        assert r["oracle_recall"] >= r["recall"] - 1e-6, r
    assert rows["dense"]["recall"] == rows["dense"]["density"] == 1.0
    ks = [rows[f"topk-k{k}"] for k in (1, 2, 4, 8)]
    assert all(a["density"] < b["density"] for a, b in zip(ks, ks[1:]))
    assert all(a["recall"] < b["recall"] for a, b in zip(ks, ks[1:]))
    assert rows["pool-dash"]["summary"] == "attn_pool" and rows["dash"]["summary"] == "mean"
    assert rows["minmax-topk-k2"]["summary"] == "minmax"
    # zero pooling vectors = mean pooling: same selections
    for a, b in (("pool-topk-k2", "topk-k2"), ("pool-dash", "dash")):
        assert rows[a]["recall"] == pytest.approx(rows[b]["recall"], abs=1e-5)
        assert rows[a]["density"] == pytest.approx(rows[b]["density"], abs=1e-5)


def test_load_pool_checks_the_shape(zero_pool):
    assert R.load_pool(zero_pool, 2, 2, 32).shape == (2, 2, 32)
    with pytest.raises(ValueError,
                       match=r"pool. has shape \[2, 2, 32\] but the model needs \[3, 2, 32"):
        R.load_pool(zero_pool, 3, 2, 32)


def test_default_methods_are_valid():
    from vllm_dash.config import DashConfig

    ms = R.recall_methods("x.safetensors")
    assert ms[0]["dash"] is None
    assert {m["dash"]["summary"] for m in ms[1:]} == {"mean", "minmax", "attn_pool"}
    for m in ms[1:]:
        DashConfig.from_mapping(m["dash"])
    assert all(m["dash"]["summary"] != "attn_pool" for m in R.recall_methods(None)[1:])
