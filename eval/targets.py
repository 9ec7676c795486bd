"""The default rule and the issue-13 target checks, from a comparison of
:func:`vllm_dash.eval.report.compare` (one row per method and length: summary kind, selector
class, density, accuracy over the tasks dense solves, margin over the top-k curve of the
same summary kind, recall and the oracle's recall).

Default rule (``choose_default``): among the DASH methods (selector entmax, no calibration)
that match or beat top-k ON THE SAME SUMMARIES at their measured density at every length
(margin >= 0), the highest mean accuracy over lengths; ties to the lower mean density.
Training-free methods (mean, minmax) compete for the shipped default, which must work on any
model; methods that need a per-model file (attn_pool: a summary file from `vllm-dash
distill`) are ranked by the same rule but reported apart ("learned").

Summary-kind step (``choose_summary``, after the rule): the chosen method's settings on each
other training-free summary kind (same knobs, another ``summary``) replace it when they
Pareto-dominate it: accuracy >= and measured density <= at every length. The selector rule
alone cannot compare kinds (it measures each method against top-k on its own summaries), and
a kind that is at least as accurate at no more density everywhere is better for any user.

Target checks (``check_targets``): the issue's targets as pass/fail with their numbers;
a target without the data it needs fails ("no data"). Pure Python.
"""
from __future__ import annotations

from typing import Optional, Sequence

from vllm_dash.eval import methods as M

__all__ = ["choose_default", "choose_summary", "check_targets", "format_targets", "TODAY_DEFAULT"]

#: the shipped default before issue 13 (mean summaries), the reference of the 8K target
TODAY_DEFAULT = "dash-floor4-s2"
DASH_CLASSES = ("floor", "nofloor")
SPARSE_DENSITY = 0.10           # ">= 90% sparsity"


# --------------------------------------------------------------------------------------
# default rule
# --------------------------------------------------------------------------------------
def _entmax(method: dict) -> bool:
    """A DASH method: entmax selector, no calibration (per-layer scales are per model)."""
    dash = method.get("dash") or {}
    return (method.get("family") not in (None, "dense") and not method.get("calibrate")
            and dash.get("selector", "entmax") == "entmax" and "score_scale_file" not in dash
            and not isinstance(dash.get("score_scale"), (list, tuple)))


def _needs_file(method: dict) -> bool:
    dash = method.get("dash") or {}
    return M.summary_kind(dash) == "attn_pool" or bool(dash.get("summary_file"))


def _candidates(comparison: Sequence[dict], methods: Sequence[dict], learned: bool) -> list:
    lengths = sorted({c["length"] for c in comparison})
    out = []
    for m in methods:
        if not _entmax(m) or _needs_file(m) != learned:
            continue
        cs = [c for c in comparison if c["method"] == m["name"]]
        if sorted(c["length"] for c in cs) != lengths or any(c["margin"] is None for c in cs):
            continue
        out.append({"method": m["name"], "dash": m["dash"],
                    "summary": M.summary_kind(m["dash"] or {}),
                    "min_margin": min(c["margin"] for c in cs),
                    "mean_accuracy": sum(c["accuracy_solved"] for c in cs) / len(cs),
                    "mean_density": sum(c["density"] for c in cs) / len(cs),
                    "per_length": {c["length"]: {"density": c["density"],
                                                 "accuracy": c["accuracy_solved"],
                                                 "margin": c["margin"]} for c in cs}})
    return out


def _pick(cands: list) -> dict:
    ok = sorted((c for c in cands if c["min_margin"] >= 0),
                key=lambda c: (-round(c["mean_accuracy"], 9), c["mean_density"]))
    return {"chosen": ok[0] if ok else None, "qualified": [c["method"] for c in ok],
            "candidates": sorted(cands, key=lambda c: -c["min_margin"])}


RULE = ("DASH methods without per-model files (entmax, no calibration; summaries mean or "
        "minmax) whose accuracy on the tasks dense solves is >= the top-k curve on the same "
        "summaries at their measured density at every length; highest mean accuracy, ties to "
        "the lower mean density")
RULE_LEARNED = ("the same rule among DASH methods that need a per-model summary file "
                "(attn_pool); reported apart: a shipped default must work on any model")


RULE_SUMMARY = ("the chosen method's settings on another training-free summary kind replace it "
                "when they Pareto-dominate it: accuracy >= and measured density <= at every "
                "length")


def _same_knobs(a: dict, b: dict) -> bool:
    strip = lambda d: {k: v for k, v in (d or {}).items() if k != "summary"}  # noqa: E731
    return strip(a) == strip(b)


def choose_summary(comparison: Sequence[dict], methods: Sequence[dict],
                   chosen: Optional[dict]) -> dict:
    """The summary-kind step (module docstring): {"rule", "kind", "method", "dash",
    "per_length", "alternatives"}; ``kind`` stays the chosen method's own unless another
    kind's twin dominates it (the most accurate dominating twin wins)."""
    out = {"rule": RULE_SUMMARY, "kind": None, "method": None, "dash": None,
           "per_length": {}, "alternatives": []}
    if not chosen:
        return out
    rows = lambda name: {c["length"]: c for c in comparison if c["method"] == name}  # noqa
    base = rows(chosen["method"])
    out.update(kind=chosen["summary"], method=chosen["method"], dash=chosen["dash"],
               per_length={n: {"density": c["density"], "accuracy": c["accuracy_solved"]}
                           for n, c in base.items()})
    best = None
    for m in methods:
        kind = M.summary_kind(m.get("dash"))
        if (m["name"] == chosen["method"] or kind in (None, chosen["summary"])
                or _needs_file(m) or not _same_knobs(m["dash"], chosen["dash"])):
            continue
        twin = rows(m["name"])
        if sorted(twin) != sorted(base):
            continue
        dominates = all(twin[n]["accuracy_solved"] >= base[n]["accuracy_solved"]
                        and twin[n]["density"] <= base[n]["density"] for n in base)
        acc = sum(c["accuracy_solved"] for c in twin.values()) / len(twin)
        out["alternatives"].append({"method": m["name"], "kind": kind, "dominates": dominates,
                                    "mean_accuracy": acc})
        if dominates and (best is None or acc > best[0]):
            best = (acc, m, kind, twin)
    if best:
        _, m, kind, twin = best
        out.update(kind=kind, method=m["name"], dash=m["dash"],
                   per_length={n: {"density": c["density"], "accuracy": c["accuracy_solved"]}
                               for n, c in twin.items()})
    return out


def choose_default(comparison: Sequence[dict], methods: Sequence[dict]) -> dict:
    """Apply the default rule (module docstring): the training-free choice, the summary-kind
    step on it, and apart ("learned") the same rule over the methods that need a summary
    file."""
    picked = _pick(_candidates(comparison, methods, learned=False))
    return {"rule": RULE, **picked,
            "summary_choice": choose_summary(comparison, methods, picked["chosen"]),
            "learned": {"rule": RULE_LEARNED,
                        **_pick(_candidates(comparison, methods, learned=True))}}


# --------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------
def _dash_rows(comparison, kind: Optional[str] = None, length: Optional[int] = None) -> list:
    return [c for c in comparison if c.get("selector") in DASH_CLASSES
            and (kind is None or c.get("summary") == kind)
            and (length is None or c["length"] == length)]


def _result(tid: str, text: str, ok: bool, numbers: dict, note: str = "") -> dict:
    return {"id": tid, "target": text, "pass": bool(ok), "numbers": numbers, "note": note}


def _vs_topk(comparison, kind: str, tid: str, text: str) -> dict:
    """Some DASH method on ``kind`` summaries at or above ``kind``'s top-k at every length."""
    lengths = sorted({c["length"] for c in comparison})
    per: dict = {}
    for c in _dash_rows(comparison, kind):
        per.setdefault(c["method"], {})[c["length"]] = c["margin"]
    full = {m: v for m, v in per.items()
            if sorted(v) == lengths and all(x is not None for x in v.values())}
    if not full:
        return _result(tid, text, False, {"methods": per}, "no data: no DASH method on "
                       f"{kind} summaries has a top-k reference at every length")
    best = max(full, key=lambda m: min(full[m].values()))
    return _result(tid, text, min(full[best].values()) >= 0,
                   {"best": best, "margins": full[best],
                    "min_margin_per_method": {m: min(v.values()) for m, v in full.items()}})


def _pool_sparse(comparison) -> dict:
    text = ("attn_pool + DASH >= 3 points above attn_pool + top-k at >= 90% sparsity "
            "(every length)")
    lengths = sorted({c["length"] for c in comparison})
    best = {}
    for L in lengths:
        rows = [c for c in _dash_rows(comparison, "attn_pool", L)
                if c["density"] is not None and c["density"] <= SPARSE_DENSITY
                and c["margin"] is not None]
        if rows:
            b = max(rows, key=lambda c: c["margin"])
            best[L] = {"method": b["method"], "density": b["density"], "margin": b["margin"]}
    ok = bool(lengths) and all(L in best and best[L]["margin"] >= 0.03 for L in lengths)
    note = "" if len(best) == len(lengths) else (
        f"no data at {[L for L in lengths if L not in best]}: no attn_pool DASH run at "
        f"density <= {SPARSE_DENSITY} with a top-k reference")
    return _result("attn_pool_sparse", text, ok, {"best_per_length": best}, note)


def _long(comparison) -> Optional[int]:
    lengths = sorted({c["length"] for c in comparison})
    return 8192 if 8192 in lengths else (lengths[-1] if lengths else None)


def _row(comparison, method: str, length) -> Optional[dict]:
    return next((c for c in comparison if c["method"] == method and c["length"] == length),
                None)


def _best_kind_8k(comparison, tol: float = 0.05) -> dict:
    text = ("best DASH summary kind >= 5 points above today's default (dash-floor4-s2, mean) "
            "at equal density at 8K")
    L = _long(comparison)
    ref = _row(comparison, TODAY_DEFAULT, L)
    if ref is None or ref["accuracy_solved"] is None or ref["density"] is None:
        return _result("best_kind_vs_default_8k", text, False, {}, f"no data: no "
                       f"{TODAY_DEFAULT} accuracy at {L} (not run, or no task dense solves)")
    per_kind = {}
    for kind in M.SUMMARY_KINDS:
        rows = [c for c in _dash_rows(comparison, kind, L) if c["accuracy_solved"] is not None
                and c["density"] is not None and c["density"] <= ref["density"] * (1 + tol)]
        if rows:
            b = max(rows, key=lambda c: (c["accuracy_solved"], -c["density"]))
            per_kind[kind] = {"method": b["method"], "density": b["density"],
                              "accuracy": b["accuracy_solved"],
                              "gain": b["accuracy_solved"] - ref["accuracy_solved"]}
    best = max(per_kind.values(), key=lambda x: x["gain"], default=None)
    return _result("best_kind_vs_default_8k", text, best is not None and best["gain"] >= 0.05,
                   {"length": L, "default": {"density": ref["density"],
                                             "accuracy": ref["accuracy_solved"]},
                    "best_per_kind": per_kind},
                   f"equal density: DASH runs at most {100 * tol:.0f}% denser than the default")


def _density_to_reach(curve: list, target: float) -> Optional[float]:
    """The lowest density at which a (density, accuracy) curve (linear) reaches target."""
    if curve and curve[0][1] >= target:
        return curve[0][0]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y0 < target <= y1:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return None


def _near_dense_8k(comparison) -> dict:
    text = ("a DASH setting within 2 points of dense at 8K at <= half the density mean + "
            "top-k needs for the same")
    L = _long(comparison)
    dense = next((c for c in comparison if c["family"] == "dense" and c["length"] == L), None)
    if dense is None or dense["accuracy_solved"] is None:
        return _result("near_dense_8k", text, False, {}, f"no data: no dense accuracy at {L} "
                       "(not run, or no task dense solves)")
    need = dense["accuracy_solved"] - 0.02
    curve = sorted((c["density"], c["accuracy_solved"]) for c in comparison
                   if c["length"] == L and c["family"] in (M.topk_family("mean"), "dense")
                   and c["accuracy_solved"] is not None and c["density"] is not None)
    d_topk = _density_to_reach(curve, need)
    rows = [c for c in _dash_rows(comparison, None, L)
            if c["accuracy_solved"] is not None and c["accuracy_solved"] >= need]
    b = min(rows, key=lambda c: c["density"], default=None)
    numbers = {"length": L, "dense": dense["accuracy_solved"], "topk_mean_density": d_topk,
               "best_dash": None if b is None else {"method": b["method"],
                                                    "density": b["density"],
                                                    "accuracy": b["accuracy_solved"]}}
    ok = b is not None and d_topk is not None and b["density"] <= d_topk / 2
    return _result("near_dense_8k", text, ok, numbers,
                   "" if b is not None else "no DASH run comes within 2 points of dense")


def _recall_8k(comparison, choice: Optional[dict]) -> dict:
    text = ("attention recall of the shipped default at 8K (at <= ~10% density) within 2 "
            "points of the oracle at the same density")
    L = _long(comparison)
    chosen = (choice or {}).get("chosen")
    name = chosen["method"] if chosen else TODAY_DEFAULT
    row = _row(comparison, name, L)
    near = sorted(({"method": c["method"], "density": c["recall_density"],
                    "recall": c["recall"], "oracle": c["oracle_recall"]}
                   for c in _dash_rows(comparison, None, L) if c.get("recall") is not None
                   and c.get("recall_density") is not None
                   and abs(c["recall_density"] - SPARSE_DENSITY) <= 0.03),
                  key=lambda x: x["oracle"] - x["recall"])
    if row is None or row.get("recall") is None or row.get("oracle_recall") is None:
        return _result("default_recall_8k", text, False, {"method": name, "near_10pct": near},
                       f"no data: no recall row for {name} at {L}")
    gap = row["oracle_recall"] - row["recall"]
    d = row["recall_density"]
    sparse = d is not None and d <= SPARSE_DENSITY + 0.03       # at 10% or sparser
    note = "" if sparse else (
        f"the default's recall density {d:.3f} is above ~{SPARSE_DENSITY}: a gap measured "
        "there does not count; near_10pct lists the DASH runs near 10%")
    return _result("default_recall_8k", text, gap <= 0.02 and sparse,
                   {"method": name, "length": L, "density": d, "recall": row["recall"],
                    "oracle": row["oracle_recall"], "gap": gap, "near_10pct": near}, note)


def check_targets(comparison: Sequence[dict], methods: Sequence[dict],
                  choice: Optional[dict] = None) -> list:
    """The issue-13 targets (module docstring), each {"id", "target", "pass", "numbers",
    "note"}."""
    return [
        _vs_topk(comparison, "attn_pool", "attn_pool_dash_vs_topk",
                 "attn_pool + DASH at or above attn_pool + top-k at equal measured density at "
                 "every length"),
        _pool_sparse(comparison),
        _best_kind_8k(comparison),
        _near_dense_8k(comparison),
        _vs_topk(comparison, "minmax", "minmax_dash_vs_quest",
                 "DASH on minmax at or above Quest (minmax + top-k) at equal density at every "
                 "length"),
        _recall_8k(comparison, choice),
    ]


def format_targets(targets: Sequence[dict]) -> str:
    """One line per target: PASS/FAIL, id, the target, its note."""
    out = ["targets (issue 13):"]
    for t in targets:
        out.append(f"  {'PASS' if t['pass'] else 'FAIL'} {t['id']}: {t['target']}"
                   + (f" [{t['note']}]" if t["note"] else ""))
    return "\n".join(out)
