"""`vllm-dash eval-report`: DASH against top-k at equal measured density, from `vllm-dash
eval` reports, and the rule that picks the DASH defaults.

Inputs are one or more summary JSON files written by `vllm-dash eval --out` from the same
model, seed, tasks and lengths (e.g. a record run cut by its time budget and a second run
of the methods it did not reach). Rows of later files replace rows of earlier ones for the
same (method, length).

Definitions (all per length):

* solved tasks: the tasks on which dense attention scores at least `--solved` (default 0.8).
  A task dense fails cannot rank sparse methods (a 135M model fails multi-key retrieval
  with every block attended), so comparisons use the mean accuracy over solved tasks.
* top-k curve: the top-k rows of the plain family "topk" (sink + local + k per head) as
  (density, accuracy over solved tasks) points, plus dense at density 1; linear between
  points. A method whose density lies below the sparsest top-k run has no reference.
* margin: a method's accuracy minus the top-k curve at the method's measured density.

Default rule (`choose_default`): among the DASH methods that need no per-model file
(selector entmax, no calibration), keep those with margin >= 0 at every length; pick the
highest mean accuracy over lengths; ties go to the lower mean density.

Pure Python (matplotlib only for the plot); nothing here runs a model.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from typing import Optional, Sequence

__all__ = ["merge_reports", "solved_tasks", "compare", "choose_default", "paired",
           "format_comparison", "pareto_png", "main"]

TOPK_FAMILY = "topk"


def merge_reports(reports: Sequence[dict]) -> dict:
    """One report from several of the same evaluation; later rows win per (method, length)."""
    if not reports:
        raise ValueError("no reports to merge")
    first = reports[0]
    for r in reports[1:]:
        for key in ("model", "seed", "samples_per_cell", "max_model_len"):
            if r.get(key) != first.get(key):
                raise ValueError(f"reports differ in {key}: {first.get(key)!r} vs "
                                 f"{r.get(key)!r}; only runs of one evaluation can be merged")
    rows: dict = {}
    methods: dict = {}
    for r in reports:
        for row in r["rows"]:
            rows[(row["method"], row["length"])] = row
        for m in r.get("methods", []):
            methods[m["name"]] = m
    done = set(rows)
    not_run = sorted({x for r in reports for x in r.get("not_run", [])
                      if tuple(_split_run(x)) not in done})
    merged = {k: v for k, v in first.items() if k not in ("rows", "table", "not_run",
                                                          "methods", "engines", "wall_s")}
    merged.update(rows=list(rows.values()), methods=list(methods.values()), not_run=not_run,
                  wall_s=[r.get("wall_s") for r in reports],
                  engines=[r.get("engines") for r in reports])
    return merged


def _split_run(name: str) -> tuple:
    method, _, length = name.rpartition("@")
    return method, int(length)


def solved_tasks(rows: Sequence[dict], threshold: float) -> dict:
    """{length: [tasks dense scores >= threshold on]} (a length without dense: absent)."""
    out = {}
    for row in rows:
        if row.get("family") == "dense":
            out[row["length"]] = sorted(t for t, a in row["accuracy"].items() if a >= threshold)
    return out


def _acc(row: dict, tasks: Sequence[str]) -> Optional[float]:
    vals = [row["accuracy"][t] for t in tasks if t in row["accuracy"]]
    return sum(vals) / len(vals) if vals and len(vals) == len(tasks) else None


def _curve(rows: Sequence[dict], length: int, tasks: Sequence[str]) -> list:
    pts = [(r["density"], _acc(r, tasks)) for r in rows
           if r["length"] == length and r.get("family") in (TOPK_FAMILY, "dense")
           and r.get("density") is not None]
    return sorted(p for p in pts if p[1] is not None)


def _interp(curve: list, x: float) -> Optional[float]:
    if not curve or x < curve[0][0] or x > curve[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


def compare(rows: Sequence[dict], threshold: float = 0.8) -> list:
    """Per (method, length): density, accuracy over solved tasks (and over all tasks),
    the top-k curve's accuracy at that density and the margin."""
    solved = solved_tasks(rows, threshold)
    out = []
    for r in sorted(rows, key=lambda r: (r["length"], r.get("family") or "", r["method"])):
        L = r["length"]
        tasks = solved.get(L, [])
        acc = _acc(r, tasks) if tasks else None
        ref = None
        if acc is not None and r.get("density") is not None and r.get("family") != "dense":
            ref = _interp(_curve(rows, L, tasks), r["density"])
        out.append({"method": r["method"], "family": r.get("family"), "length": L,
                    "density": r.get("density"), "solved_tasks": tasks,
                    "accuracy_solved": acc, "accuracy_all": r.get("accuracy_mean"),
                    "topk_at_density": ref,
                    "margin": None if ref is None else acc - ref,
                    "dash": r.get("dash")})
    return out


def _agnostic(method: dict) -> bool:
    """A DASH method that needs no per-model file: entmax selector, no calibration."""
    dash = method.get("dash") or {}
    return (method.get("family") not in (None, "dense") and not method.get("calibrate")
            and dash.get("selector", "entmax") == "entmax" and "score_scale_file" not in dash
            and not isinstance(dash.get("score_scale"), (list, tuple)))


def choose_default(comparison: Sequence[dict], methods: Sequence[dict]) -> dict:
    """Apply the default rule (module docstring); returns the choice and the candidates."""
    by_name = {m["name"]: m for m in methods}
    lengths = sorted({c["length"] for c in comparison})
    cands = []
    for name, m in by_name.items():
        if not _agnostic(m):
            continue
        cs = [c for c in comparison if c["method"] == name]
        if sorted(c["length"] for c in cs) != lengths or any(c["margin"] is None for c in cs):
            continue
        cands.append({"method": name, "dash": m["dash"],
                      "min_margin": min(c["margin"] for c in cs),
                      "mean_accuracy": sum(c["accuracy_solved"] for c in cs) / len(cs),
                      "mean_density": sum(c["density"] for c in cs) / len(cs),
                      "per_length": {c["length"]: {"density": c["density"],
                                                   "accuracy": c["accuracy_solved"],
                                                   "margin": c["margin"]} for c in cs}})
    ok = [c for c in cands if c["min_margin"] >= 0]
    ok.sort(key=lambda c: (-round(c["mean_accuracy"], 9), c["mean_density"]))
    cands.sort(key=lambda c: -c["min_margin"])
    return {"rule": "DASH methods without per-model files (entmax, no calibration) whose "
                    "accuracy on the tasks dense solves is >= the top-k curve at their "
                    "measured density at every length; highest mean accuracy, ties to the "
                    "lower mean density",
            "chosen": ok[0] if ok else None, "qualified": [c["method"] for c in ok],
            "candidates": cands}


def paired(samples: Sequence[dict], a: str, b: str, length: int,
           tasks: Sequence[str]) -> dict:
    """Per-sample comparison of methods a and b at one length on `tasks`: how often a
    scores higher, lower, the same (the scores of one prompt are paired)."""
    key = lambda s: (s["task"], s["index"])       # noqa: E731
    sa = {key(s): s["score"] for s in samples
          if s["method"] == a and s["length"] == length and s["task"] in tasks}
    sb = {key(s): s["score"] for s in samples
          if s["method"] == b and s["length"] == length and s["task"] in tasks}
    common = sorted(set(sa) & set(sb))
    return {"a": a, "b": b, "length": length, "n": len(common),
            "a_better": sum(sa[k] > sb[k] for k in common),
            "b_better": sum(sa[k] < sb[k] for k in common),
            "same": sum(sa[k] == sb[k] for k in common)}


def _pct(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def format_comparison(comparison: Sequence[dict]) -> str:
    head = (f"{'method':<26} {'len':>5} {'density':>7} {'solved':>7} {'all':>6} "
            f"{'topk@d':>7} {'margin':>7}")
    out = [head]
    for c in comparison:
        d = "-" if c["density"] is None else f"{c['density']:.3f}"
        out.append(f"{c['method']:<26} {c['length']:>5} {d:>7} {_pct(c['accuracy_solved']):>7} "
                   f"{_pct(c['accuracy_all']):>6} {_pct(c['topk_at_density']):>7} "
                   f"{_pct(c['margin'], True):>7}")
    return "\n".join(out)


def pareto_png(comparison: Sequence[dict], path: str, title: str) -> str:
    """Accuracy vs measured sparsity, one curve per family: top row over the tasks dense
    solves, bottom row over all tasks; one column per length."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"not written: {e}"
    lengths = sorted({c["length"] for c in comparison})
    if not lengths:
        return "not written: no results"
    fig, axes = plt.subplots(2, len(lengths), figsize=(5.2 * len(lengths), 8), squeeze=False)
    fams = sorted({c["family"] for c in comparison if c["family"] != "dense"})
    others = [c for i, c in enumerate(plt.cm.tab10.colors) if i != 3]     # red: top-k
    colors = {f: others[i % len(others)]
              for i, f in enumerate(x for x in fams if x != TOPK_FAMILY)}
    colors[TOPK_FAMILY] = "tab:red"
    for j, L in enumerate(lengths):
        cell = [c for c in comparison if c["length"] == L and c["density"] is not None]
        for i, key in enumerate(("accuracy_solved", "accuracy_all")):
            ax = axes[i][j]
            for fam in ["dense"] + fams:
                pts = sorted((1 - c["density"], 100 * c[key]) for c in cell
                             if c["family"] == fam and c[key] is not None)
                if not pts:
                    continue
                if fam == "dense":
                    ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="dense")
                else:
                    ax.plot(*zip(*pts), marker="o", ms=3.5, lw=1.8 if fam == "topk" else 1.2,
                            color=colors[fam], label=fam)
            solved = next((c["solved_tasks"] for c in cell), [])
            what = (f"tasks dense solves: {', '.join(solved) or 'none'}" if i == 0
                    else "all tasks")
            ax.set(title=f"{L} tokens - {what}", xlabel="measured sparsity (1 - density)",
                   ylabel="accuracy (%)", ylim=(-2, 102))
            ax.title.set_fontsize(8)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "written"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vllm-dash eval-report",
        description="Compare DASH with top-k at equal measured density from `vllm-dash eval` "
                    "reports, and apply the default rule.")
    ap.add_argument("reports", nargs="+", help="summary JSON files of `vllm-dash eval --out`"
                    " (same model and seed; later files win per method and length)")
    ap.add_argument("--samples", nargs="*", default=None,
                    help="their *-samples.json(.gz) files, for paired per-prompt counts "
                         "(default: found next to the reports)")
    ap.add_argument("--solved", type=float, default=0.8,
                    help="dense accuracy from which a task counts as solved (0..1)")
    ap.add_argument("--out", default=None, help="merged report + comparison (JSON)")
    ap.add_argument("--png", default=None, help="Pareto plot (default: next to --out)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if not 0.0 < args.solved <= 1.0:
        raise SystemExit(f"vllm-dash eval-report: --solved {args.solved} must be in (0, 1]")
    reports = []
    for p in args.reports:
        with open(p) as f:
            reports.append(json.load(f))
    merged = merge_reports(reports)
    comp = compare(merged["rows"], args.solved)
    choice = choose_default(comp, merged["methods"])
    sample_files = args.samples
    if sample_files is None:
        sample_files = [p for p in (os.path.splitext(r)[0] + "-samples.json"
                                    for r in args.reports) if os.path.exists(p)]
    samples = []
    for p in sample_files:
        opener = gzip.open if p.endswith(".gz") else open
        with opener(p, "rt") as f:
            samples += json.load(f)
    pairs = []
    if samples and choice["chosen"]:
        solved = solved_tasks(merged["rows"], args.solved)
        for c in comp:
            if c["method"] != choice["chosen"]["method"]:
                continue
            topk = [x for x in comp if x["family"] == TOPK_FAMILY and x["length"] == c["length"]]
            if topk:     # the top-k run nearest in density
                near = min(topk, key=lambda x: abs(x["density"] - c["density"]))
                pairs.append(paired(samples, c["method"], near["method"], c["length"],
                                    solved.get(c["length"], [])))
    print(format_comparison(comp))
    print(f"\ndefault rule: {choice['rule']}")
    if choice["chosen"]:
        ch = choice["chosen"]
        print(f"chosen: {ch['method']} (min margin {_pct(ch['min_margin'], True)} points, "
              f"mean accuracy {_pct(ch['mean_accuracy'])}%, mean density "
              f"{ch['mean_density']:.3f}); qualified: {', '.join(choice['qualified'])}")
    else:
        print("chosen: none (no DASH method matches top-k at every length)")
    for p in pairs:
        print(f"paired @{p['length']}: {p['a']} better on {p['a_better']}, {p['b']} better on "
              f"{p['b_better']}, same on {p['same']} of {p['n']} prompts")
    if args.out:
        merged.update(comparison=comp, default_choice=choice, paired=pairs,
                      solved_threshold=args.solved,
                      table=format_comparison(comp).splitlines())
        with open(args.out, "w") as f:
            json.dump(merged, f, indent=1)
        png = args.png or os.path.splitext(args.out)[0] + ".png"
        title = f"{merged.get('model')} ({merged.get('gpu') or merged.get('device')})"
        print(f"wrote {args.out}; PNG {png}: {pareto_png(comp, png, title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
