"""benchmarks/compare_kernels.py: rows matched by (heads, batch, context, method), ratios,
the per-family summary and the tolerance verdict, on two synthetic runs."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(path, scale, extra=()):
    rows = [dict(heads=h, batch=1, context=4096, method=m, status="ok",
                 latency_us=base * scale.get(m, 1.0))
            for h in ("32/8", "32/2")
            for m, base in (("dash@0.25", 10.0), ("select@0.25", 20.0), ("sdpa-cudnn", 30.0))]
    rows += list(extra)
    path.write_text(json.dumps(dict(meta=dict(gpu="test GPU"), rows=rows)))
    return str(path)


def _compare(tmp_path, before, after, *args):
    out = tmp_path / "cmp.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare_kernels.py"),
                        before, after, "--out", str(out), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text()), r.stdout


def test_within_and_outside_tolerance(tmp_path):
    before = _run(tmp_path / "b.json", {})
    fine = _run(tmp_path / "a.json", {"dash@0.25": 1.04, "sdpa-cudnn": 1.3},
                extra=[dict(heads="32/8", batch=8, context=4096, method="dash@0.5",
                            status="ok", latency_us=1.0)])
    res, text = _compare(tmp_path, before, fine, "--heads", "32/8")
    assert res["ours_within_tolerance"] is True       # the baseline's drift is not ours
    assert len(res["pairs"]) == 3 and all(p["heads"] == "32/8" for p in res["pairs"])
    assert abs(res["summary"]["dash"]["max_ratio"] - 1.04) < 1e-9
    assert res["only_after"] == [dict(heads="32/8", batch=8, context=4096, method="dash@0.5")]
    assert "test GPU" in text
    slow = _run(tmp_path / "s.json", {"select@0.25": 1.08})
    res, _ = _compare(tmp_path, before, slow)
    assert res["ours_within_tolerance"] is False and len(res["pairs"]) == 6
