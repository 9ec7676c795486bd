"""benchmarks/bench_kernels.py on CPU (Triton interpreter, tiny shapes): every method family
that runs without a GPU (our decode over random and dense selections, the selection hook,
hook + decode) produces its row, and the unavailable FA3 baseline says why."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_kernels_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_kernels.py"), "--contexts",
         "100", "--batches", "2", "--heads", "4/2", "--head-size", "32", "--block-size", "16",
         "--densities", "0.5", "--select", "dash_select_hook:select", "--warmup", "1",
         "--rep", "1", "--out", str(out)],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=900,
        env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {row["method"]: row for row in data["rows"]}
    for method in ("dash@0.5", "dash-dense", "select@0.5", "dash+select@0.5"):
        assert rows[method]["status"] == "ok" and rows[method]["latency_us"] > 0, method
    assert rows["dash-dense"]["density"] == 1.0
    assert 0 < rows["dash+select@0.5"]["density"] <= 1.0
    assert rows["fa3-paged"]["status"].startswith("unavailable")
    assert data["meta"]["commit"] and data["meta"]["vllm_dash"]


def test_bench_kernels_write_smoke(tmp_path):
    """--write: one decode and one prefill row per summary kind, each with its ratio to
    mean (CPU interpreter, tiny shapes)."""
    out = tmp_path / "write.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_kernels.py"), "--write",
         "--contexts", "100", "--batches", "2", "--heads", "4/2", "--head-size", "32",
         "--block-size", "16", "--write-chunk", "24", "--warmup", "1", "--rep", "1",
         "--out", str(out)],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=900,
        env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    for kind in ("mean", "minmax", "attn_pool"):
        for phase, tokens in (("decode", 2), ("prefill", 24)):
            row = rows[f"write-{kind}-{phase}"]
            assert row["status"] == "ok" and row["latency_us"] > 0 and row["vs_mean"] > 0
            assert row["tokens"] == tokens
    assert rows["write-mean-decode"]["vs_mean"] == 1.0
    assert "vs mean" in r.stdout
