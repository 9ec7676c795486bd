"""The accuracy harness (vllm_dash.eval) without an engine: methods, calibration,
scoring, the CLI's errors, and the parent's handling of engine children that are cut short
or fail. The engine runs are in tests/e2e/test_eval_engine.py; the record run is on the GPU
(benchmarks/results)."""
import json
import sys
import time

import pytest

from vllm_dash.config import TRAINING_FREE_SUMMARY
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
        if spec["engine"] != "dense":
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
    assert "boom" in saved["engines"]["dash-mean"]["error"]
    assert [r["accuracy_mean"] for r in saved["rows"]] == [1.0]
    with pytest.raises(SystemExit, match="matches no method"):
        harness.run_eval(harness.eval_parser().parse_args(
            ["--model", str(tiny_llama_dir), "--only", "nothing"]))


# ----------------------------------------------------------------------- summary kinds
def _strip_engine_keys(dash):
    """DashConfig learns `summary`/`summary_file` with the adapter's summary kinds (H2);
    until then the other keys are validated alone."""
    from vllm_dash.config import DashConfig
    if "summary" in DashConfig.keys():
        return dash
    return {k: v for k, v in dash.items() if k not in M.ENGINE_KEYS}


def test_record_methods_cover_kinds_selectors_and_the_shipped_default():
    from vllm_dash.config import DashConfig
    from vllm_dash.kernels import params
    assert M.SUMMARY_KINDS == getattr(params, "SUMMARY_KINDS", M.SUMMARY_KINDS)
    ms = M.record_methods()
    names = [m["name"] for m in ms]
    assert len(names) == len(set(names)) and names[0] == "dense"
    assert len(ms) <= 30            # 60 x 2 tasks x 3 lengths each: ~6 min on an H200
    for m in ms[1:]:
        DashConfig.from_mapping(_strip_engine_keys(m["dash"]))
    default = next(m for m in ms if m["name"] == "dash-floor4-s2")
    assert default["dash"]["summary"] == "mean" and default["family"] == "dash-floor4"
    assert (default["dash"]["score_scale"], default["dash"]["min_blocks"]) == (2.0, 4)
    for kind in M.SUMMARY_KINDS:
        mine = [m for m in ms[1:] if m["dash"]["summary"] == kind]
        topk = [m for m in mine if m["dash"].get("selector") == "topk"]
        assert all(m["family"] == M.topk_family(kind) for m in topk) and len(topk) >= 4
        dash = [m for m in mine if m["dash"].get("selector") != "topk"]
        assert {m["dash"]["min_blocks"] > 0 for m in dash} == {True, False}
        assert len({m["dash"]["score_scale"] for m in dash if m["dash"]["min_blocks"]}) >= 2
        assert len({m["dash"]["score_scale"] for m in dash if not m["dash"]["min_blocks"]}) >= 2
    assert M.summary_kind(None) is None and M.summary_kind({}) == "mean"
    assert M.summary_kind({"summary": "auto"}) == TRAINING_FREE_SUMMARY
    assert M.summary_kind({"summary_file": "x"}) == "attn_pool"


def test_engine_groups_one_engine_per_summary_and_skip_without_file(tmp_path):
    ms = M.record_methods() + M.smoke_methods()[1:2]
    ms[-1] = {**ms[-1], "name": "plain-topk"}          # no summary key: mean (the convention)
    groups, notes, skipped = M.engine_groups(ms, None)
    assert [g["name"] for g in groups] == ["dash-mean", "dash-minmax"]
    assert groups[0]["methods"][-1]["name"] == "plain-topk"
    assert groups[0]["methods"][-1]["dash"]["summary"] == "mean"
    assert skipped == [m["name"] for m in ms if (m["dash"] or {}).get("summary") == "attn_pool"]
    assert len(notes) == 1 and "no --summary-file" in notes[0] and "distill" in notes[0]
    assert groups[0]["engine_dash"] == {**M.BASE, "summary": "mean"}
    for g in groups:
        for m in g["methods"]:      # every method carries its engine's keys
            assert all(m["dash"].get(k) == g["engine_dash"].get(k) for k in M.ENGINE_KEYS)
    # a file that does not exist: skipped, the note names it
    _, notes, skipped = M.engine_groups(ms, str(tmp_path / "nope.safetensors"))
    assert skipped and "does not exist" in notes[0]
    # with a file: attn_pool gets its engine, the file in its engine config and methods
    f = tmp_path / "pool.safetensors"
    f.write_bytes(b"x")
    groups, notes, skipped = M.engine_groups(ms, str(f))
    pool = next(g for g in groups if g["name"] == "dash-attn_pool")
    assert not notes and not skipped
    assert pool["engine_dash"] == {**M.BASE, "summary": "attn_pool", "summary_file": str(f)}
    assert all(m["dash"]["summary_file"] == str(f) for m in pool["methods"])
    assert [g["name"] for g in groups] == ["dash-mean", "dash-attn_pool", "dash-minmax"]


def test_engine_start_config_and_runtime_keys():
    from vllm_dash.eval import engine
    spec = {"model": "m", "max_model_len": 64, "device": "cpu",
            "engine_dash": {**M.BASE, "summary": "minmax"}}
    kw = engine.engine_kwargs(spec, dash_engine=True)
    assert kw["additional_config"]["dash"]["summary"] == "minmax"
    assert engine.engine_kwargs({**spec, "engine_dash": None}, True)[
        "additional_config"]["dash"] == M.BASE


def test_recall_child_emits_per_length(monkeypatch):
    """run_recall calls measure_recall once per length and sends its rows (fake recall)."""
    import types
    from vllm_dash.eval import engine
    calls, sent = [], []

    def fake_measure_recall(model, methods, lengths, *, windows, positions, seed, device,
                            summary_file=None, progress=True):
        calls.append((model, [m["name"] for m in methods], lengths, windows, positions, seed,
                      device, summary_file))
        return [{"method": m["name"], "length": lengths[0], "recall": 0.8, "density": 0.1,
                 "oracle_recall": 0.9, "recall_per_layer": [0.8], "n_positions": 4}
                for m in methods]
    monkeypatch.setitem(sys.modules, "vllm_dash.eval.recall",
                        types.SimpleNamespace(measure_recall=fake_measure_recall))
    monkeypatch.setattr(engine.child, "emit", sent.append)
    spec = {"engine": "recall", "model": "m", "methods": M.smoke_methods()[1:],
            "lengths": [100, 200], "windows": 2, "positions": 3, "seed": 7, "device": "cpu",
            "summary_file": None}
    engine.run_engine(spec)
    assert [c[2] for c in calls] == [[100], [200]]
    assert calls[0][3:7] == (2, 3, 7, "cpu")
    assert [r["recall"][0]["length"] for r in sent] == [100, 200]


def test_record_run_groups_engines_and_stores_recall(tmp_path, tiny_llama_dir, monkeypatch):
    """The harness with fake engine children: dense, recall, then one engine per summary
    kind; attn_pool without a file is skipped with a note; recall rows land in the report."""
    seen = []

    def fake_spawn(spec, timeout, log, cmd=None):
        seen.append((spec["engine"], [m["name"] for m in spec["methods"]], spec))
        if spec["engine"] == "recall":
            return {"init_s": None, "results": [], "calibration": {}, "recall": [
                {"method": m["name"], "length": L, "recall": 0.7, "density": 0.2,
                 "oracle_recall": 0.8, "recall_per_layer": [], "n_positions": 1}
                for m in spec["methods"] for L in spec["lengths"]]}
        names = ["dense"] if spec["engine"] == "dense" else [m["name"] for m in spec["methods"]]
        cell = [s for s in spec["samples"] if s["length"] == 512]
        return {"init_s": 1.0, "results": [
            {"method": n, "length": 512, "density": 1.0 if n == "dense" else 0.3,
             "texts": [s["answers"][0] for s in cell]} for n in names]}
    monkeypatch.setattr(harness, "spawn_engine", fake_spawn)
    only = "dense,dash-floor4-s2,topk-k4,minmax-topk-k4,pool-dash-std-s2"
    out = tmp_path / "acc.json"
    args = harness.eval_parser().parse_args(
        ["--model", str(tiny_llama_dir), "--methods", "record13", "--only", only, "--tasks",
         "passkey", "--lengths", "512", "--samples", "2", "--device", "cpu", "--recall",
         "--seed", str(M.RECORD13_SEED), "--out", str(out)])
    rep = harness.run_eval(args)
    assert [s[0] for s in seen] == ["dense", "recall", "dash-mean", "dash-minmax"]
    assert seen[1][1] == ["topk-k4", "dash-floor4-s2", "minmax-topk-k4"]
    assert seen[2][2]["engine_dash"]["summary"] == "mean"
    saved = json.loads(out.read_text())
    assert saved["seed"] == 1313 and saved["method_set"] == "record13"
    assert saved["not_run"] == rep["not_run"] == ["pool-dash-std-s2@512"]
    assert "attn_pool methods skipped" in saved["notes"][0]
    assert len(saved["recall"]) == 3 and saved["recall"][0]["oracle_recall"] == 0.8
    assert any("recall: method" in line for line in saved["table"])
    assert saved["engines"]["dash-minmax"]["engine_dash"]["summary"] == "minmax"
    with pytest.raises(SystemExit, match="--recall-windows"):
        harness.eval_main(["--model", str(tiny_llama_dir), "--recall-windows", "0"])


def test_recall_child_with_the_real_measure_recall(tiny_llama_dir, monkeypatch):
    """The harness's recall spec through the real measure_recall (tiny Llama, one window)."""
    from vllm_dash.eval import engine
    sent = []
    monkeypatch.setattr(engine.child, "emit", sent.append)
    args = harness.eval_parser().parse_args(
        ["--model", str(tiny_llama_dir), "--lengths", "256", "--recall", "--recall-windows",
         "1", "--recall-positions", "2", "--device", "cpu"])
    groups, _, _ = M.engine_groups([m for m in M.record_methods()
                                    if m["name"] in ("topk-k2", "minmax-dash-std-s2")], None)
    engine.run_engine(harness.recall_spec(args, groups, "cpu"))
    rows = {r["method"]: r for r in sent[0]["recall"]}
    assert set(rows) == {"topk-k2", "minmax-dash-std-s2"}
    for r in rows.values():
        assert r["length"] == 256 and 0 < r["density"] <= 1
        assert 0 <= r["recall"] <= r["oracle_recall"] + 1e-6


def test_engine_not_started_once_the_time_budget_is_spent(monkeypatch):
    monkeypatch.setattr(harness, "spawn_engine", lambda *a, **k: pytest.fail("spawned"))
    args = harness.eval_parser().parse_args(["--time-budget", "10"])
    info = {}
    assert harness._run_one(args, {"engine": "dash-minmax"}, time.time() - 20, info) is None
    assert "time budget" in info["dash-minmax"]["error"]
