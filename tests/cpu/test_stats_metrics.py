"""Decode statistics (vllm_dash.stats) and their Prometheus collector (serving.metrics)."""
import json

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from vllm_dash.serving import metrics
from vllm_dash.stats import STATS_FILE_ENV, DashStats


def test_sample_pipeline_and_file(tmp_path, monkeypatch):
    path = tmp_path / "stats.json"
    monkeypatch.setenv(STATS_FILE_ENV, str(path))
    st = DashStats()
    st.allocate(num_layers=2, max_num_seqs=4, num_kv_heads=2, block_size=16, device="cpu")
    lens = torch.tensor([100, 20, 0], dtype=torch.int32)          # 7, 2 blocks; a padding row
    st.record(0, torch.tensor([[3, 7], [2, 2], [0, 0]], dtype=torch.int32), lens)
    st.record(1, torch.tensor([[7, 7], [1, 2], [0, 0]], dtype=torch.int32), lens)
    st.sample(3)
    assert not path.exists()           # the copy is started, read at the next sample
    st.sample(3)
    data = json.loads(path.read_text())
    # layer 0: (3*16-12) + (7*16-12) + (2*16-12) + (2*16-12) = 36+100+20+20 = 176 of 240
    # layer 1: 100+100+(16-12=4)+20 = 224 of 240
    assert data["density"] == pytest.approx([176 / 240, 224 / 240])
    assert data["selected_blocks_per_head"] == pytest.approx([14 / 4, 17 / 4])
    assert data["num_seqs"] == 2 and data["samples"] == 1
    snap = st.snapshot()
    assert snap[0]["density"] == pytest.approx(176 / 240)
    assert st.samples == 2             # snapshot finished the pending sample too


def test_counts_written_by_the_selection_kernel(tmp_path, monkeypatch):
    """The GPU path: select_blocks_paged writes the counts into counts_out(layer) itself
    (no copy launch), and only layer 0 copies the lengths; the sample is the same."""
    monkeypatch.setenv(STATS_FILE_ENV, str(tmp_path / "stats.json"))
    st = DashStats()
    assert st.counts_out(0) is None                     # before allocate
    st.allocate(num_layers=2, max_num_seqs=4, num_kv_heads=2, block_size=16, device="cpu")
    lens = torch.tensor([100, 20, 0], dtype=torch.int32)
    st.counts_out(0)[:3] = torch.tensor([[3, 7], [2, 2], [0, 0]], dtype=torch.int32)
    st.counts_out(1)[:3] = torch.tensor([[7, 7], [1, 2], [0, 0]], dtype=torch.int32)
    st.record_lens(0, lens)
    st.record_lens(1, torch.full((3,), 999, dtype=torch.int32))   # not layer 0: ignored
    assert st.lens[:3].tolist() == [100, 20, 0]
    st.sample(3)
    snap = st.snapshot()
    assert snap[0]["density"] == pytest.approx(176 / 240)        # as in the test above
    assert snap[1]["density"] == pytest.approx(224 / 240)


def test_collector_exposes_vllm_dash_metrics(tmp_path):
    path = tmp_path / "stats.json"
    reg = CollectorRegistry()
    reg.register(metrics.DashCollector(str(path)))
    assert b"vllm_dash_" not in generate_latest(reg)      # no sample yet: nothing exported
    path.write_text(json.dumps({
        "time": 0.0, "num_seqs": 2, "context_tokens_mean": 60.0, "density": [0.5, 0.25],
        "selected_blocks_per_head": [3.0, 2.0], "samples": 4, "selected_tokens_total": 10.0,
        "context_tokens_total": 40.0, "selected_blocks_total": 9.0}))
    text = generate_latest(reg).decode()
    assert 'vllm_dash_decode_density{layer="0"} 0.5' in text
    assert "vllm_dash_decode_density_mean 0.375" in text
    assert "vllm_dash_stats_samples_total 4.0" in text
    assert "vllm_dash_context_tokens_total 40.0" in text
    for name in metrics.METRIC_NAMES:
        assert name in text, name
