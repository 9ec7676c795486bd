"""benchmarks/bench_step.py on CPU (Triton interpreter, tiny shapes): the per-layer step
benchmark runs every DASH part, reports a density and writes its JSON. Run as the
benchmarks are run (benchmarks/common.py: `python benchmarks/<name>.py`, from any folder)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_step_smoke(tmp_path):
    out = tmp_path / "step.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_step.py"),
         "--contexts", "256", "--batches", "2", "--layers", "2", "--heads", "4/2",
         "--head-size", "32", "--block-size", "16", "--max-model-len", "1024",
         "--dense-below", "128", "--score-scale", "3", "--rep", "1", "--warmup", "1",
         "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dash-select" in r.stdout and "FA3 no GPU" in r.stdout
    data = json.loads(out.read_text())
    assert data["args"]["out"] == "step.json"
    methods = {row["method"] for row in data["rows"]}
    assert methods == {"dash", "dash-write", "dash-select", "dash-decode"}
    for row in data["rows"]:
        assert row["us_per_layer"] > 0 and 0 < row["density"] <= 1
    # 256 tokens >= dense_below 128 and score_scale 3: selection is sparse
    assert data["rows"][0]["density"] < 1
