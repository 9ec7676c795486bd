"""The accuracy harness (vllm_dash.eval) without an engine: methods, calibration,
scoring, the CLI's errors, and the parent's handling of engine children that are cut short
or fail. The engine runs are in tests/e2e/test_eval_engine.py; the record run is on the GPU
(benchmarks/results)."""
import json
import sys
import time

import pytest

from vllm_dash.eval import harness
from vllm_dash.eval import methods as M
from vllm_dash.serving import child


def test_calibrate_scales_interpolates_per_layer():
    grid = {0.5: [0.8, 0.5], 1.0: [0.6, 0.3], 2.0: [0.4, 0.1], 4.0: [0.2, 0.05]}
    s = M.calibrate_scales(grid, 0.3)
    # layer 0: 0.3 lies halfway between 2.0 (0.4) and 4.0 (0.2): halfway in log(scale)
    assert s[0] == pytest.approx(2.0 * 2 ** 0.5, rel=1e-3)
    assert s[1] == pytest.approx(1.0, rel=1e-3)
    # out of the grid: clamped to its ends
    assert M.calibrate_scales(grid, 0.9) == [0.5, 0.5]
    assert M.calibrate_scales(grid, 0.01) == [4.0, 4.0]


def test_methods_are_valid_dash_configs():
    from vllm_dash.config import DashConfig
    names = set()
    for m in M.default_methods() + M.smoke_methods():
        if m["dash"] is not None:
            DashConfig.from_mapping(m["dash"])
        assert m["name"] not in names or m in M.smoke_methods()
        names.add(m["name"])
    fams = {m["family"] for m in M.default_methods()}
    assert {"dense", "topk", "dash-raw", "dash-std", "dash-floor2", "dash-calib"} <= fams


def test_summarize_and_table():
    samples = [{"length": 100, "task": "passkey", "index": i, "depth": 0.0, "n_tokens": 90,
                "answers": [str(10000 + i)]} for i in range(4)]
    runs = [{"method": "dense", "length": 100, "texts": [" 10000.", "10001", "x", "no"],
             "density": 1.0, "family": "dense"}]
    out = harness.summarize(samples, runs)
    assert out["rows"][0]["accuracy"] == {"passkey": 0.5}
    assert len(out["samples"]) == 4 and out["samples"][0]["score"] == 1.0
    text = harness.table(out["rows"], ["passkey"])
    assert "dense" in text and "50.0" in text


def test_cli_errors():
    from vllm_dash.serving.cli import main
    with pytest.raises(SystemExit):
        main(["calibrate", "--target-density", "1.5", "--out", "x.json"])
    with pytest.raises(SystemExit):
        main(["eval", "--samples", "0"])


def test_engine_cut_short_keeps_finished_runs(tmp_path):
    """A child that is stopped by the timeout: its finished (method, length) runs are kept."""
    script = tmp_path / "child.py"
    script.write_text(
        "import json, sys, time\n"
        f"P = {child.ROW_PREFIX!r}\n"
        "print(P + json.dumps({'calibration': {'1.0': [0.5]}}), flush=True)\n"
        "for L in (100, 200):\n"
        "    print(P + json.dumps({'method': 'm', 'length': L, 'texts': ['x'],"
        " 'density': 0.5}), flush=True)\n"
        "time.sleep(120)\n")
    spec = {"engine": "dash", "methods": [{}], "samples": []}
    t = time.monotonic()
    res = harness.spawn_engine(spec, 3.0, log=lambda m: None, cmd=[sys.executable, str(script)])
    assert time.monotonic() - t < 60
    assert [r["length"] for r in res["results"]] == [100, 200]
    assert res["error"].startswith("timeout") and res["calibration"] == {"1.0": [0.5]}
    # a child that fails before finishing anything: a clear error
    script.write_text("import sys; sys.exit('boom')\n")
    with pytest.raises(RuntimeError, match="boom"):
        harness.spawn_engine(spec, 30.0, log=lambda m: None, cmd=[sys.executable, str(script)])


def test_failed_engine_keeps_the_other_and_lists_what_did_not_run(tmp_path, tiny_llama_dir,
                                                                   monkeypatch):
    def fake_spawn(spec, timeout, log, cmd=None):
        if spec["engine"] == "dash":
            raise RuntimeError("vllm-dash eval: the dash engine failed (exit 1): boom")
        cell = [s for s in spec["samples"] if s["length"] == 512]
        return {"init_s": 1.0, "results": [{"method": "dense", "length": 512, "density": 1.0,
                                            "texts": [s["answers"][0] for s in cell]}]}
    monkeypatch.setattr(harness, "spawn_engine", fake_spawn)
    out = tmp_path / "acc.json"
    args = harness.eval_parser().parse_args(
        ["--model", str(tiny_llama_dir), "--methods", "smoke", "--tasks", "passkey",
         "--lengths", "512", "--samples", "2", "--device", "cpu", "--out", str(out)])
    rep = harness.run_eval(args)
    saved = json.loads(out.read_text())
    assert saved["not_run"] == rep["not_run"] == ["topk-k2@512", "dash-floor2-s3@512"]
    assert "boom" in saved["engines"]["dash"]["error"]
    assert [r["accuracy_mean"] for r in saved["rows"]] == [1.0]
    with pytest.raises(SystemExit, match="matches no method"):
        harness.run_eval(harness.eval_parser().parse_args(
            ["--model", str(tiny_llama_dir), "--only", "nothing"]))
