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
