"""Pooling vectors for attn_pool (vllm_dash.summary_source): the summary file and the
checkpoint form (indexer_q), their shape checks, "auto" resolution, and the page layout per
summary kind (vllm_dash.layout). No vLLM here: the engine side is tests/e2e."""
import json

import pytest
import torch
from safetensors.torch import save_file

from vllm_dash import layout, summary_source
from vllm_dash.config import TRAINING_FREE_SUMMARY, DashConfig
from vllm_dash.summary_source import ModelShape, engine_summaries

SHAPE = ModelShape(num_layers=3, num_kv_heads=2, head_size=8)


def write_pool(path, pool, score_scale=None, fmt=summary_source.FORMAT):
    tensors = {"pool": pool}
    if score_scale is not None:
        tensors["score_scale"] = score_scale
    save_file(tensors, str(path), metadata={"format": fmt, "model": "test"})
    return str(path)


def write_checkpoint(folder, pools, *, index: bool, shape=None):
    """A model folder in the DashAttention layout: other weights plus one bf16
    model.layers.{i}.self_attn.indexer_q [Hk*D] per layer, over two shards."""
    folder.mkdir(exist_ok=True)
    shards = [{"model.embed_tokens.weight": torch.zeros(4, 4)}, {"lm_head.weight": torch.ones(2)}]
    for i, p in enumerate(pools):
        t = p.reshape(shape if shape else (-1,)).to(torch.bfloat16)
        shards[i % 2][f"model.layers.{i}.self_attn.indexer_q"] = t
        shards[i % 2][f"model.layers.{i}.self_attn.q_proj.weight"] = torch.zeros(2, 2)
    weight_map = {}
    for j, tensors in enumerate(shards):
        name = f"model-0000{j + 1}-of-00002.safetensors"
        save_file(tensors, str(folder / name))
        weight_map.update((k, name) for k in tensors)
    if index:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(folder)


@pytest.fixture(autouse=True)
def fresh_caches():
    summary_source.read_summary_file.cache_clear()
    engine_summaries.cache_clear()
    yield
    summary_source.read_summary_file.cache_clear()
    engine_summaries.cache_clear()


def test_summary_file_resolves_auto_and_is_read_once(tmp_path, monkeypatch):
    pool = torch.randn(3, 2, 8)
    path = write_pool(tmp_path / "s.safetensors", pool, torch.ones(3, 2))
    cfg = DashConfig.from_mapping({"summary_file": path})
    reads = []
    orig = summary_source.read_summary_file.__wrapped__
    wrapped = summary_source.functools.lru_cache(maxsize=4)(lambda p: reads.append(p) or orig(p))
    monkeypatch.setattr(summary_source, "read_summary_file", wrapped)
    got = engine_summaries(cfg, None, SHAPE)
    assert got.config.summary == "attn_pool" and got.source == path
    assert got.pool.dtype == torch.float32 and torch.equal(got.pool, pool)
    assert engine_summaries(cfg, None, SHAPE) is got
    engine_summaries.cache_clear()          # another engine in the same process
    assert torch.equal(engine_summaries(cfg, "/elsewhere", SHAPE).pool, pool)
    assert reads == [path]
    explicit = DashConfig.from_mapping({"summary": "attn_pool", "summary_file": path})
    assert engine_summaries(explicit, None, SHAPE).config is explicit


@pytest.mark.parametrize("tensors,name,got,want", [
    ({"pool": torch.zeros(3, 2, 16)}, "pool", [3, 2, 16], [3, 2, 8]),
    ({"pool": torch.zeros(2, 2, 8)}, "pool", [2, 2, 8], [3, 2, 8]),
    ({"pool": torch.zeros(3, 2, 8), "score_scale": torch.ones(3, 4)}, "score_scale", [3, 4],
     [3, 2]),
])
def test_shape_mismatch_is_one_line(tmp_path, tensors, name, got, want):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    cfg = DashConfig.from_mapping({"summary_file": str(path)})
    with pytest.raises(ValueError) as e:
        engine_summaries(cfg, None, SHAPE)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and repr(name) in msg
    assert f"shape {got}" in msg and f"needs {want}" in msg


@pytest.mark.parametrize("content,match", [
    ({"weights": torch.zeros(3, 2, 8)}, "has no tensor 'pool'"),
    ({"pool": torch.full((3, 2, 8), float("nan"))}, "non-finite"),
    (b"not a safetensors file", "cannot be read as safetensors"),
    ("format", "has format 'other/1'"),
])
def test_bad_summary_files(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "format":
        write_pool(path, torch.zeros(3, 2, 8), fmt="other/1")
    else:
        save_file(content, str(path))
    with pytest.raises(ValueError, match=match) as e:
        engine_summaries(DashConfig.from_mapping({"summary_file": str(path)}), None, SHAPE)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("index", [True, False])
def test_checkpoint_pool(tmp_path, index):
    """indexer_q [Hk*D] bf16 per layer, over two shards, with or without the index file."""
    pools = [torch.randn(2, 8) for _ in range(3)]
    folder = write_checkpoint(tmp_path / "model", pools, index=index)
    assert sorted(summary_source.checkpoint_pool_names(folder)) == [0, 1, 2]
    got = engine_summaries(DashConfig.from_mapping(None), folder, SHAPE)
    assert got.config.summary == "attn_pool" and "indexer_q" in got.source
    want = torch.stack([p.to(torch.bfloat16).float() for p in pools])
    assert got.pool.dtype == torch.float32 and torch.equal(got.pool, want)
    # an explicit training-free kind reads nothing; a summary file wins over the checkpoint
    for kind in ("mean", "minmax"):
        res = engine_summaries(DashConfig.from_mapping({"summary": kind}), folder, SHAPE)
        assert res.config.summary == kind and res.pool is None
    path = write_pool(tmp_path / "s.safetensors", torch.ones(3, 2, 8))
    res = engine_summaries(DashConfig.from_mapping({"summary_file": path}), folder, SHAPE)
    assert res.source == path and torch.equal(res.pool, torch.ones(3, 2, 8))


def test_checkpoint_mismatch_and_absence(tmp_path):
    folder = write_checkpoint(tmp_path / "model", [torch.randn(2, 16)] * 3, index=True)
    with pytest.raises(ValueError) as e:
        engine_summaries(DashConfig.from_mapping(None), folder, SHAPE)
    msg = str(e.value)
    assert "model.layers.0.self_attn.indexer_q" in msg and "shape [32] " in msg
    assert "needs [16]" in msg and "model-00001-of-00002.safetensors" in msg and "\n" not in msg
    partial = write_checkpoint(tmp_path / "partial", [torch.randn(2, 8)] * 2, index=False)
    with pytest.raises(ValueError, match=r"indexer_q for layers \[0, 1\] but the model has "
                                         r"layers 0..2"):
        engine_summaries(DashConfig.from_mapping({"summary": "attn_pool"}), partial, SHAPE)
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2)},
              str(plain / "model.safetensors"))
    assert engine_summaries(DashConfig.from_mapping(None), str(plain), SHAPE).pool is None
    assert engine_summaries(DashConfig.from_mapping(None), str(plain), SHAPE).config.summary \
        == TRAINING_FREE_SUMMARY
    assert engine_summaries(DashConfig.from_mapping(None), None, None).config.summary \
        == TRAINING_FREE_SUMMARY
    with pytest.raises(ValueError, match="needs pooling vectors"):
        engine_summaries(DashConfig.from_mapping({"summary": "attn_pool"}), str(plain), SHAPE)


def test_checkpoint_pool_names_filter():
    """The names compat's weight filter drops from vLLM's weights stream."""
    yes = ["model.layers.0.self_attn.indexer_q", "model.layers.31.self_attn.indexer_q",
           "model.language_model.layers.2.self_attn.indexer_q"]
    no = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.indexer_q.x",
          "model.layers.0.mlp.indexer_q", "indexer_q"]
    assert all(summary_source.is_checkpoint_pool_name(n) for n in yes)
    assert not any(summary_source.is_checkpoint_pool_name(n) for n in no)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("summary,ds", [("mean", 8), ("attn_pool", 8), ("minmax", 16)])
def test_layout_per_summary_kind(dtype, summary, ds):
    """Page padding and the summaries view: Hk * Ds fp32 per page (minmax: twice)."""
    nb, hk, B, D = 5, 2, 4, 8
    pad = layout.summary_page_bytes(hk, D, summary)
    assert pad == hk * ds * 4 and layout.summary_page_bytes(hk, D) == hk * D * 4
    esize = torch.empty(0, dtype=dtype).element_size()
    kv_elems = 2 * hk * B * D
    page = kv_elems + pad // esize
    raw = torch.zeros(nb * page, dtype=dtype)
    kv = torch.as_strided(raw, (nb, 2, hk, B, D), (page, hk * B * D, B * D, D, 1))
    kv.fill_(1)                                     # K and V only: the padding stays 0
    s = layout.summary_view(kv, hk, D, summary)
    assert s.shape == (nb, hk, ds) and s.dtype == torch.float32 and not s.any()
    s[2, 1] = torch.arange(ds, dtype=torch.float32)
    assert torch.equal(layout.summary_view(kv, hk, D, summary)[2, 1], torch.arange(ds).float())
    assert (kv == 1).all()                          # the summaries do not overlap K/V
    if summary != "minmax":                         # a mean-sized page has no room for minmax
        with pytest.raises(RuntimeError, match="no room"):
            layout.summary_view(kv, hk, D, "minmax")
    with pytest.raises(ValueError, match="summary="):
        layout.summary_page_bytes(hk, D, "quest")


def test_layer_pool_rows_copied_once(tmp_path):
    """Each layer's (rank's) rows of the vectors, fp32 on the device, copied once: the
    builder asks first, every later call returns the same tensor."""
    pool = torch.randn(3, 2, 8)
    path = write_pool(tmp_path / "s.safetensors", pool)
    got = engine_summaries(DashConfig.from_mapping({"summary_file": path}), None, SHAPE)
    a = got.layer_pool(2, 1, 1, "cpu")
    assert a.shape == (1, 8) and torch.equal(a, pool[2, 1:2])
    assert got.layer_pool(2, 1, 1, torch.device("cpu")) is a
    assert torch.equal(got.layer_pool(0, 0, 2, "cpu"), pool[0])
    none = engine_summaries(DashConfig.from_mapping(None), None, SHAPE)
    assert none.pool is None and none.layer_pool(0, 0, 2, "cpu") is None
