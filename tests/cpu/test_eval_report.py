"""vllm_dash.eval.report: DASH vs top-k at equal density, the default rule, merging of
eval reports; and the committed accuracy record agrees with DashConfig's defaults."""
import gzip
import json
import os

import pytest

from vllm_dash.config import DashConfig
from vllm_dash.eval import report as er
from vllm_dash.serving import cli

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results")
RECORD = os.path.join(RESULTS, "accuracy-smollm2-135m-instruct.json")


def _row(method, family, length, density, acc, dash=None):
    return {"method": method, "family": family, "length": length, "density": density,
            "accuracy": acc, "accuracy_mean": sum(acc.values()) / len(acc), "dash": dash}


def _method(name, family, **dash):
    return {"name": name, "family": family, "dash": dash or None}


def _rows():
    rows = []
    for L in (100, 200):
        rows.append(_row("dense", "dense", L, 1.0, {"a": 1.0, "b": 0.1}))
        rows.append(_row("topk-k1", "topk", L, 0.2, {"a": 0.4, "b": 0.0}))
        rows.append(_row("topk-k2", "topk", L, 0.4, {"a": 0.8, "b": 0.1}))
    # good: 0.7 at density 0.3 (top-k there: 0.6) at both lengths
    rows += [_row("good", "dash-x", L, 0.3, {"a": 0.7, "b": 0.0}) for L in (100, 200)]
    # better at 100 (1.0 at 0.4 vs 0.8) but below top-k at 200 (0.5 at 0.3 vs 0.6)
    rows += [_row("mixed", "dash-x", 100, 0.4, {"a": 1.0, "b": 0.0}),
             _row("mixed", "dash-x", 200, 0.3, {"a": 0.5, "b": 0.0})]
    # as accurate as "good" but denser at one length (tie -> lower density wins)
    rows += [_row("good-denser", "dash-y", 100, 0.3, {"a": 0.7, "b": 0.0}),
             _row("good-denser", "dash-y", 200, 0.35, {"a": 0.7, "b": 0.0})]
    # sparser than every top-k run: no reference at 100
    rows += [_row("tiny", "dash-z", 100, 0.1, {"a": 0.3, "b": 0.0}),
             _row("tiny", "dash-z", 200, 0.3, {"a": 0.9, "b": 0.0})]
    # calibrated (per-model file): never a default, however good
    rows += [_row("calib", "dash-calib", L, 0.3, {"a": 1.0, "b": 0.0}) for L in (100, 200)]
    return rows


def _methods():
    return [_method("dense", "dense"), _method("topk-k1", "topk", selector="topk", min_blocks=1),
            _method("topk-k2", "topk", selector="topk", min_blocks=2),
            _method("good", "dash-x", score_scale=2.0), _method("mixed", "dash-x"),
            _method("good-denser", "dash-y", score_scale=3.0), _method("tiny", "dash-z"),
            {"name": "calib", "family": "dash-calib", "calibrate": 0.3, "dash": {}}]


def test_solved_tasks_and_margins():
    rows = _rows()
    assert er.solved_tasks(rows, 0.8) == {100: ["a"], 200: ["a"]}
    comp = {(c["method"], c["length"]): c for c in er.compare(rows, 0.8)}
    good = comp[("good", 100)]
    assert good["accuracy_solved"] == pytest.approx(0.7)
    assert good["topk_at_density"] == pytest.approx(0.6)        # halfway 0.4 .. 0.8
    assert good["margin"] == pytest.approx(0.1)
    assert comp[("mixed", 200)]["margin"] == pytest.approx(-0.1)
    assert comp[("tiny", 100)]["topk_at_density"] is None        # below the top-k range
    assert comp[("dense", 100)]["margin"] is None
    assert comp[("topk-k2", 100)]["margin"] == pytest.approx(0.0)
    # between the densest top-k run and dense itself: dense is the curve's last point
    assert er._interp([(0.4, 0.8), (1.0, 1.0)], 0.7) == pytest.approx(0.9)


def test_choose_default_applies_the_rule():
    choice = er.choose_default(er.compare(_rows(), 0.8), _methods())
    assert choice["chosen"]["method"] == "good"         # "good-denser" ties, denser
    assert choice["qualified"] == ["good", "good-denser"]
    names = {c["method"] for c in choice["candidates"]}
    assert "calib" not in names and "topk-k1" not in names and "tiny" not in names
    assert choice["chosen"]["dash"] == {"score_scale": 2.0}
    # nothing qualifies: no choice
    rows = [r for r in _rows() if r["method"] not in ("good", "good-denser")]
    assert er.choose_default(er.compare(rows, 0.8), _methods())["chosen"] is None


def test_merge_reports_later_rows_win():
    a = {"model": "m", "seed": 0, "samples_per_cell": 3, "max_model_len": 64,
         "rows": _rows(), "methods": _methods()[:3], "not_run": ["good@100", "x@200"]}
    newer = _row("good", "dash-x", 100, 0.3, {"a": 0.0, "b": 0.0})
    b = dict(a, rows=[newer], methods=_methods()[3:4], not_run=[])
    m = er.merge_reports([a, b])
    got = [r for r in m["rows"] if (r["method"], r["length"]) == ("good", 100)]
    assert got == [newer] and len(m["rows"]) == len(a["rows"])
    assert m["not_run"] == ["x@200"]                 # good@100 ran in the second report
    assert [x["name"] for x in m["methods"]] == ["dense", "topk-k1", "topk-k2", "good"]
    with pytest.raises(ValueError, match="seed"):
        er.merge_reports([a, dict(b, seed=1)])
    with pytest.raises(ValueError, match="no reports"):
        er.merge_reports([])


def test_paired_counts():
    s = [{"method": m, "length": 100, "task": "a", "index": i, "score": sc}
         for m, scores in (("x", [1, 0, 1, 1]), ("y", [0, 0, 1, 0])) for i, sc in
         enumerate(scores)]
    s.append({"method": "x", "length": 100, "task": "b", "index": 0, "score": 0})
    p = er.paired(s, "x", "y", 100, ["a"])
    assert (p["n"], p["a_better"], p["b_better"], p["same"]) == (4, 2, 0, 2)


def test_cli_writes_report(tmp_path, capsys):
    rep = {"model": "m", "seed": 0, "samples_per_cell": 1, "max_model_len": 64,
           "gpu": None, "device": "cpu", "rows": _rows(), "methods": _methods()}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rep))
    samples = [{"method": m, "length": 100, "task": "a", "index": 0, "score": 1.0}
               for m in ("good", "topk-k2")]
    with gzip.open(tmp_path / "s.json.gz", "wt") as f:
        json.dump(samples, f)
    out = tmp_path / "out.json"
    assert cli.main(["eval-report", str(path), "--samples", str(tmp_path / "s.json.gz"),
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "chosen: good" in text and "paired @100: good better on 0" in text
    got = json.loads(out.read_text())
    assert got["default_choice"]["chosen"]["method"] == "good"
    assert len(got["comparison"]) == len(_rows())
    with pytest.raises(SystemExit, match="--solved"):
        er.main([str(path), "--solved", "1.5"])


def test_record_choice_is_the_shipped_default():
    """The committed record (GPU run) chose a setting; DashConfig's defaults are that setting."""
    with open(RECORD) as f:
        record = json.load(f)
    chosen = record["default_choice"]["chosen"]
    assert chosen is not None and chosen["min_margin"] >= 0
    # recomputing the choice from the record's rows gives the same method
    again = er.choose_default(er.compare(record["rows"], record["solved_threshold"]),
                              record["methods"])
    assert again["chosen"]["method"] == chosen["method"]
    defaults = DashConfig()
    for key, value in chosen["dash"].items():
        if key in ("dense_below", "stats_interval"):   # eval-only: every step, no dense cut
            continue
        assert getattr(defaults, key) == value, key
    lengths = sorted(int(L) for L in chosen["per_length"])
    assert lengths == [2048, 4096, 8192]


# ----------------------------------------------------------------------- summary kinds
def _kind_rows():
    """Two lengths; top-k curves per summary kind; DASH on each kind."""
    def dash(kind, **kw):
        return {"summary": kind, **kw}
    rows = []
    for L in (100, 200):
        rows.append(_row("dense", "dense", L, 1.0, {"a": 1.0}))
        for k, d, acc in ((1, 0.1, 0.3), (2, 0.2, 0.5), (4, 0.4, 0.8)):
            rows.append(_row(f"topk-k{k}", "topk", L, d, {"a": acc},
                             dash("mean", selector="topk", min_blocks=k)))
            rows.append(_row(f"pool-topk-k{k}", "topk-attn_pool", L, d, {"a": acc + 0.1},
                             dash("attn_pool", selector="topk", min_blocks=k)))
            rows.append(_row(f"minmax-topk-k{k}", "topk-minmax", L, d, {"a": acc + 0.05},
                             dash("minmax", selector="topk", min_blocks=k)))
        rows.append(_row("dash-floor4-s2", "dash-floor4", L, 0.2, {"a": 0.5},
                         dash("mean", min_blocks=4, score_scale=2.0)))
        rows.append(_row("dash-std-s1", "dash-std", L, 0.3, {"a": 0.7}, dash("mean")))
        # +0.1 over its own top-k at 100, +0.2 at 200 (density 0.1: 90% sparse)
        rows.append(_row("pool-dash-std-s2", "dash-std-attn_pool", L, 0.1,
                         {"a": 0.5 if L == 100 else 0.6}, dash("attn_pool")))
        # above MEAN top-k at 0.2 (0.5) but below its own (minmax) top-k (0.55): not qualified
        rows.append(_row("minmax-dash-std-s2", "dash-std-minmax", L, 0.2, {"a": 0.52},
                         dash("minmax")))
    return rows


def _kind_methods():
    seen = {}
    for r in _kind_rows():
        seen.setdefault(r["method"], {"name": r["method"], "family": r["family"],
                                      "dash": r["dash"]})
    return list(seen.values())


def _recall_rows():
    return [{"method": "dash-std-s1", "length": 200, "recall": 0.85, "density": 0.1,
             "oracle_recall": 0.86, "recall_per_layer": [], "n_positions": 8},
            {"method": "topk-k4", "length": 200, "recall": 0.80, "density": 0.12,
             "oracle_recall": 0.88, "recall_per_layer": [], "n_positions": 8}]


def test_margins_are_against_topk_on_the_same_summaries():
    comp = {(c["method"], c["length"]): c
            for c in er.compare(_kind_rows(), 0.8, recall=_recall_rows())}
    pool = comp[("pool-dash-std-s2", 100)]
    assert (pool["summary"], pool["selector"]) == ("attn_pool", "nofloor")
    assert pool["topk_at_density"] == pytest.approx(0.4)         # pool top-k k1, not mean's
    assert pool["margin"] == pytest.approx(0.1)
    assert comp[("minmax-dash-std-s2", 100)]["margin"] == pytest.approx(-0.03)
    assert comp[("dash-floor4-s2", 100)]["selector"] == "floor"
    assert comp[("dense", 100)]["summary"] is None
    r = comp[("dash-std-s1", 200)]
    assert (r["recall"], r["recall_density"], r["oracle_recall"]) == (0.85, 0.1, 0.86)
    assert comp[("dash-std-s1", 100)]["recall"] is None
    text = er.format_comparison(list(comp.values()))
    assert "oracle" in text.splitlines()[0] and "85.0" in text
    assert "gap" in er.format_recall(_recall_rows())


def test_default_rule_keeps_learned_summaries_apart():
    choice = er.choose_default(er.compare(_kind_rows(), 0.8), _kind_methods())
    assert choice["chosen"]["method"] == "dash-std-s1"       # mean, +0.05, most accurate
    assert choice["qualified"] == ["dash-std-s1", "dash-floor4-s2"]
    assert "minmax-dash-std-s2" not in choice["qualified"]     # below Quest
    assert "same summaries" in choice["rule"]
    assert {c["method"] for c in choice["candidates"]} == {
        "dash-std-s1", "dash-floor4-s2", "minmax-dash-std-s2"}
    learned = choice["learned"]
    assert learned["chosen"]["method"] == "pool-dash-std-s2"
    assert learned["chosen"]["summary"] == "attn_pool" and "per-model" in learned["rule"]


def test_targets_pass_and_fail_with_numbers():
    comp = er.compare(_kind_rows(), 0.8, recall=_recall_rows())
    choice = er.choose_default(comp, _kind_methods())
    t = {x["id"]: x for x in er.check_targets(comp, _kind_methods(), choice)}
    assert t["attn_pool_dash_vs_topk"]["pass"]
    assert t["attn_pool_dash_vs_topk"]["numbers"]["margins"][200] == pytest.approx(0.2)
    assert t["attn_pool_sparse"]["pass"]
    best = t["best_kind_vs_default_8k"]
    assert best["pass"] and best["numbers"]["length"] == 200
    assert best["numbers"]["best_per_kind"]["attn_pool"]["gain"] == pytest.approx(0.1)
    near = t["near_dense_8k"]          # nothing within 2 points of dense: fails
    assert not near["pass"] and near["numbers"]["topk_mean_density"] == pytest.approx(0.94)
    assert not t["minmax_dash_vs_quest"]["pass"]
    rec = t["default_recall_8k"]
    assert rec["pass"] and rec["numbers"]["method"] == "dash-std-s1"
    assert rec["numbers"]["gap"] == pytest.approx(0.01)
    # a worse recall fails; no recall data fails with "no data"
    bad = [dict(r, recall=0.80) for r in _recall_rows()]
    comp2 = er.compare(_kind_rows(), 0.8, recall=bad)
    assert not {x["id"]: x for x in er.check_targets(comp2, [], choice)}[
        "default_recall_8k"]["pass"]
    dense_rec = [dict(r, density=0.5) for r in _recall_rows()]     # a small gap, too dense
    rec2 = {x["id"]: x for x in er.check_targets(
        er.compare(_kind_rows(), 0.8, recall=dense_rec), [], choice)}["default_recall_8k"]
    assert not rec2["pass"] and "above" in rec2["note"]
    none = {x["id"]: x for x in er.check_targets(er.compare(_kind_rows(), 0.8), [], choice)}
    assert not none["default_recall_8k"]["pass"] and "no data" in none["default_recall_8k"]["note"]
    assert "FAIL near_dense_8k" in er.format_targets(list(t.values()))


def test_merge_keeps_recall_and_cli_reports_targets(tmp_path, capsys):
    rep = {"model": "m", "seed": 1313, "samples_per_cell": 1, "max_model_len": 64,
           "gpu": None, "device": "cpu", "rows": _kind_rows(), "methods": _kind_methods(),
           "recall": _recall_rows()[:1]}
    newer = dict(rep, rows=[], methods=[], recall=[dict(_recall_rows()[0], recall=0.5)]
                 + _recall_rows()[1:])
    merged = er.merge_reports([rep, newer])
    assert sorted((x["method"], x["recall"]) for x in merged["recall"]) == [
        ("dash-std-s1", 0.5), ("topk-k4", 0.8)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rep))
    out = tmp_path / "out.json"
    assert er.main([str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "chosen: dash-std-s1" in text and "best learned: pool-dash-std-s2" in text
    assert "PASS attn_pool_dash_vs_topk" in text and "FAIL minmax_dash_vs_quest" in text
    got = json.loads(out.read_text())
    assert [x["id"] for x in got["targets"]][0] == "attn_pool_dash_vs_topk"
    assert got["default_choice"]["learned"]["chosen"]["method"] == "pool-dash-std-s2"
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "out.png").exists()
    except ImportError:
        assert "not written" in text


# ----------------------------------------------------------------------- summary-kind step
LEARNED = os.path.join(RESULTS, "accuracy-smollm2-135m-instruct-learned.json")
CONFIRM = os.path.join(RESULTS, "accuracy-smollm2-135m-instruct-learned-confirm.json")


def _twin_rows(pool_acc, pool_dens):
    rows = []
    for i, L in enumerate((100, 200)):
        rows.append(_row("dense", "dense", L, 1.0, {"a": 1.0}))
        rows.append(_row("topk-k1", "topk", L, 0.2, {"a": 0.2}))
        rows.append(_row("topk-k4", "topk", L, 0.6, {"a": 0.9}))
        rows.append(_row("good", "dash-floor4", L, 0.4, {"a": 0.8}))
        rows.append(_row("minmax-good", "dash-floor4-minmax", L, pool_dens[i],
                         {"a": pool_acc[i]}))
    return rows


def _twin_methods():
    return [_method("dense", "dense"), _method("topk-k1", "topk", selector="topk", min_blocks=1),
            _method("topk-k4", "topk", selector="topk", min_blocks=4),
            _method("good", "dash-floor4", min_blocks=4, summary="mean"),
            _method("minmax-good", "dash-floor4-minmax", min_blocks=4, summary="minmax")]


@pytest.mark.parametrize("acc, dens, kind", [
    ((0.9, 0.85), (0.3, 0.4), "minmax"),       # more accurate, no denser at both: replaces
    ((0.9, 0.79), (0.3, 0.3), "mean"),         # less accurate at one length: stays
    ((0.9, 0.90), (0.3, 0.41), "mean"),        # denser at one length: stays
])
def test_summary_step_needs_pareto_dominance_at_every_length(acc, dens, kind):
    comp = er.compare(_twin_rows(acc, dens), 0.8)
    good = next(c for c in er.choose_default(comp, _twin_methods())["candidates"]
                if c["method"] == "good")
    sc = er.choose_summary(comp, _twin_methods(), good)
    assert sc["kind"] == kind and [a["method"] for a in sc["alternatives"]] == ["minmax-good"]
    assert sc["method"] == ("minmax-good" if kind == "minmax" else "good")


def test_learned_record_chooses_the_shipped_defaults():
    """The issue-13 record (GPU, seed 1313): the selector rule keeps dash-floor4-s2, the
    summary-kind step moves it to minmax; DashConfig's defaults are that setting and "auto"
    without pooling vectors is that kind. The confirmation run (seed 2718) agrees."""
    from vllm_dash.config import TRAINING_FREE_SUMMARY
    with open(LEARNED) as f:
        record = json.load(f)
    again = er.choose_default(er.compare(record["rows"], record["solved_threshold"],
                                         recall=record.get("recall")), record["methods"])
    assert again["chosen"]["method"] == record["default_choice"]["chosen"]["method"]
    sc = again["summary_choice"]
    assert sc["kind"] == TRAINING_FREE_SUMMARY == "minmax"
    defaults = DashConfig()
    for key, value in sc["dash"].items():
        if key in ("dense_below", "stats_interval", "summary"):
            continue
        assert getattr(defaults, key) == value, key
    assert defaults.summary == "auto"
    with open(CONFIRM) as f:
        confirm = json.load(f)
    rows = {(r["method"], r["length"]): r for r in
            er.compare(confirm["rows"], confirm["solved_threshold"])}
    for L in (2048, 4096, 8192):
        new, old = rows[(sc["method"], L)], rows[(again["chosen"]["method"], L)]
        assert new["accuracy_solved"] >= old["accuracy_solved"] and new["density"] <= old["density"]
