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
* summary kind: a method's block summaries (mean, minmax, attn_pool;
  :func:`vllm_dash.eval.methods.summary_kind`); methods compare on the SAME summaries.
* top-k curve of a kind: the rows of the plain top-k family of that kind
  (``methods.topk_family``: "topk" for mean, "topk-minmax", "topk-attn_pool"; sink + local
  + k per head) as (density, accuracy over solved tasks) points, plus dense at density 1;
  linear between points. A method whose density lies below the sparsest top-k run has no
  reference.
* margin: a method's accuracy minus the top-k curve of its own kind at its measured density.
* recall (``--recall`` runs of eval): the dense attention mass inside the selected blocks on
  natural text, per method and length, with the oracle (blocks ranked by true mass) at the
  same density; joined to the comparison by (method, length).

The default rule and the issue-13 target checks: :mod:`vllm_dash.eval.targets`
(re-exported here as ``choose_default`` and ``check_targets``).

Pure Python (matplotlib only for the plot); nothing here runs a model.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from typing import Optional, Sequence

from vllm_dash.eval import methods as M
from vllm_dash.eval.targets import check_targets, choose_default, choose_summary, format_targets

__all__ = ["merge_reports", "solved_tasks", "compare", "choose_default", "choose_summary",
           "check_targets",
           "paired", "format_comparison", "format_recall", "pareto_png", "main"]

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
    recall: dict = {}
    for r in reports:
        for row in r["rows"]:
            rows[(row["method"], row["length"])] = row
        for m in r.get("methods", []):
            methods[m["name"]] = m
        for row in r.get("recall") or []:
            recall[(row["method"], row["length"])] = row
    done = set(rows)
    not_run = sorted({x for r in reports for x in r.get("not_run", [])
                      if tuple(_split_run(x)) not in done})
    merged = {k: v for k, v in first.items() if k not in ("rows", "table", "not_run",
                                                          "methods", "engines", "wall_s",
                                                          "recall")}
    merged.update(rows=list(rows.values()), methods=list(methods.values()), not_run=not_run,
                  wall_s=[r.get("wall_s") for r in reports],
                  engines=[r.get("engines") for r in reports])
    if recall:
        merged["recall"] = list(recall.values())
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


def selector_class(dash: Optional[dict], method: Optional[dict] = None) -> str:
    """dense, topk, calibrated (per-layer scales), floor (entmax with min_blocks > 0) or
    nofloor (entmax alone)."""
    if dash is None:
        return "dense"
    if ((method or {}).get("calibrate") or "score_scale_file" in dash
            or isinstance(dash.get("score_scale"), (list, tuple))):
        return "calibrated"
    if dash.get("selector", "entmax") == "topk":
        return "topk"
    return "floor" if (dash.get("min_blocks") or 0) > 0 else "nofloor"


def _curve(rows: Sequence[dict], length: int, tasks: Sequence[str],
           kind: str = "mean") -> list:
    """The top-k curve of summary ``kind`` at ``length`` (plus dense at density 1)."""
    fams = (M.topk_family(kind), "dense")
    pts = [(r["density"], _acc(r, tasks)) for r in rows
           if r["length"] == length and r.get("family") in fams
           and r.get("density") is not None]
    return sorted(p for p in pts if p[1] is not None)


def _interp(curve: list, x: float) -> Optional[float]:
    if not curve or x < curve[0][0] or x > curve[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


def compare(rows: Sequence[dict], threshold: float = 0.8,
            recall: Optional[Sequence[dict]] = None) -> list:
    """Per (method, length): summary kind, selector class, density, accuracy over solved
    tasks (and over all tasks), the top-k curve of the same kind at that density, the
    margin, and (from ``recall`` rows) recall, its density and the oracle's recall."""
    solved = solved_tasks(rows, threshold)
    rec = {(x["method"], x["length"]): x for x in recall or []}
    out = []
    for r in sorted(rows, key=lambda r: (r["length"], r.get("family") or "", r["method"])):
        L = r["length"]
        tasks = solved.get(L, [])
        acc = _acc(r, tasks) if tasks else None
        dense = r.get("family") == "dense"
        dash = r.get("dash")
        kind = None if dense else M.summary_kind(dash or {})
        ref = None
        if acc is not None and r.get("density") is not None and not dense:
            ref = _interp(_curve(rows, L, tasks, kind), r["density"])
        x = rec.get((r["method"], L), {})
        out.append({"method": r["method"], "family": r.get("family"), "length": L,
                    "summary": kind,
                    "selector": "dense" if dense else selector_class(dash or {}),
                    "density": r.get("density"), "solved_tasks": tasks,
                    "accuracy_solved": acc, "accuracy_all": r.get("accuracy_mean"),
                    "topk_at_density": ref,
                    "margin": None if ref is None else acc - ref,
                    "recall": x.get("recall"), "recall_density": x.get("density"),
                    "oracle_recall": x.get("oracle_recall"),
                    "dash": dash})
    return out


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
    """One line per (method, length): accuracy and margin over the same kind's top-k; with
    recall data also recall, its density and the oracle's recall at that density."""
    with_recall = any(c.get("recall") is not None for c in comparison)
    head = (f"{'method':<26} {'len':>5} {'density':>7} {'solved':>7} {'all':>6} "
            f"{'topk@d':>7} {'margin':>7}")
    if with_recall:
        head += f" {'recall':>7} {'r-dens':>7} {'oracle':>7}"
    out = [head]
    for c in comparison:
        d = "-" if c["density"] is None else f"{c['density']:.3f}"
        line = (f"{c['method']:<26} {c['length']:>5} {d:>7} {_pct(c['accuracy_solved']):>7} "
                f"{_pct(c['accuracy_all']):>6} {_pct(c['topk_at_density']):>7} "
                f"{_pct(c['margin'], True):>7}")
        if with_recall:
            rd = c.get("recall_density")
            line += (f" {_pct(c.get('recall')):>7} {'-' if rd is None else f'{rd:.3f}':>7} "
                     f"{_pct(c.get('oracle_recall')):>7}")
        out.append(line)
    return "\n".join(out)


def format_recall(recall: Sequence[dict]) -> str:
    """The recall rows alone: method, length, density, recall, oracle at that density."""
    out = [f"{'recall: method':<26} {'len':>5} {'density':>7} {'recall':>7} {'oracle':>7} "
           f"{'gap':>6}"]
    for x in sorted(recall, key=lambda x: (x["length"], x["method"])):
        gap = (None if x.get("recall") is None or x.get("oracle_recall") is None
               else x["oracle_recall"] - x["recall"])
        d = x.get("density")
        out.append(f"{x['method']:<26} {x['length']:>5} {'-' if d is None else f'{d:.3f}':>7} "
                   f"{_pct(x.get('recall')):>7} {_pct(x.get('oracle_recall')):>7} "
                   f"{_pct(gap):>6}")
    return "\n".join(out)


KIND_STYLE = {"mean": ("tab:blue", "o"), "minmax": ("tab:orange", "s"),
              "attn_pool": ("tab:green", "^")}
SELECTOR_LS = {"topk": "-", "floor": "--", "nofloor": ":", "calibrated": "-."}


def _styles(comparison: Sequence[dict]) -> dict:
    """{family: (colour, marker, line style)}: colour and marker per summary kind (per
    family when only one kind ran, as in the first record), line style per selector."""
    fams = {}
    for c in comparison:
        if c["family"] != "dense":
            fams.setdefault(c["family"], (c.get("summary") or "mean", c.get("selector")))
    kinds = {k for k, _ in fams.values()}
    others = [c for i, c in enumerate(_tab10()) if i != 3]             # red: top-k
    out = {}
    for i, (fam, (kind, sel)) in enumerate(sorted(fams.items())):
        if len(kinds) > 1:
            colour, marker = KIND_STYLE.get(kind, ("tab:gray", "x"))
        else:
            colour = "tab:red" if fam == TOPK_FAMILY else others[i % len(others)]
            marker = "o"
        out[fam] = (colour, marker, SELECTOR_LS.get(sel, "-"))
    return out


def _tab10() -> list:
    import matplotlib.pyplot as plt
    return list(plt.cm.tab10.colors)


def _panel(ax, cell: Sequence[dict], key: str, dkey: str, styles: dict) -> None:
    """One panel: ``key`` (x100) against 1 - ``dkey`` per family; dense as a line."""
    for fam in ["dense"] + sorted(styles):
        pts = sorted((1 - c[dkey], 100 * c[key]) for c in cell
                     if c["family"] == fam and c.get(key) is not None
                     and c.get(dkey) is not None)
        if not pts:
            continue
        if fam == "dense":
            ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="dense")
            continue
        colour, marker, ls = styles[fam]
        ax.plot(*zip(*pts), marker=marker, ms=3.5, ls=ls, color=colour, label=fam,
                lw=1.8 if ls == "-" else 1.2)
    if key == "recall":       # the oracle at each method's density: the upper bound
        pts = sorted((1 - c[dkey], 100 * c["oracle_recall"]) for c in cell
                     if c.get("oracle_recall") is not None and c.get(dkey) is not None)
        if pts:
            ax.plot(*zip(*pts), color="0.5", lw=0.8, marker="x", ms=3, label="oracle")


def pareto_png(comparison: Sequence[dict], path: str, title: str) -> str:
    """Per length (columns): accuracy over the tasks dense solves vs measured sparsity (top)
    and attention recall vs the sparsity measured with it, with the oracle (bottom; accuracy
    over all tasks when there is no recall data). Colour and marker: summary kind; line
    style: selector (top-k solid, DASH with floor dashed, entmax alone dotted)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"not written: {e}"
    lengths = sorted({c["length"] for c in comparison})
    if not lengths:
        return "not written: no results"
    with_recall = any(c.get("recall") is not None for c in comparison)
    styles = _styles(comparison)
    fig, axes = plt.subplots(2, len(lengths), figsize=(5.2 * len(lengths), 8), squeeze=False)
    for j, L in enumerate(lengths):
        cell = [c for c in comparison if c["length"] == L]
        solved = next((c["solved_tasks"] for c in cell), [])
        panels = [("accuracy_solved", "density", "accuracy (%)",
                   f"tasks dense solves: {', '.join(solved) or 'none'}")]
        panels.append(("recall", "recall_density", "attention recall (%)",
                       "recall on natural text, oracle at the same density") if with_recall
                      else ("accuracy_all", "density", "accuracy (%)", "all tasks"))
        for i, (key, dkey, ylabel, what) in enumerate(panels):
            ax = axes[i][j]
            _panel(ax, cell, key, dkey, styles)
            ax.set(title=f"{L} tokens - {what}", xlabel="measured sparsity (1 - density)",
                   ylabel=ylabel, ylim=(-2, 102))
            ax.title.set_fontsize(8)
            ax.grid(alpha=0.3)
    for ax in (axes[0][-1], axes[1][-1]) if with_recall else (axes[0][-1],):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="lower left", ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "written"


def _print_choice(label: str, choice: dict) -> None:
    ch = choice["chosen"]
    if ch:
        print(f"{label}: {ch['method']} (min margin {_pct(ch['min_margin'], True)} points, "
              f"mean accuracy {_pct(ch['mean_accuracy'])}%, mean density "
              f"{ch['mean_density']:.3f}); qualified: {', '.join(choice['qualified'])}")
    else:
        print(f"{label}: none (no DASH method matches top-k on its summaries at every length)")


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
    comp = compare(merged["rows"], args.solved, merged.get("recall"))
    choice = choose_default(comp, merged["methods"])
    targets = check_targets(comp, merged["methods"], choice)
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
            fam = M.topk_family(c.get("summary") or "mean")
            topk = [x for x in comp if x["family"] == fam and x["length"] == c["length"]]
            if topk:     # the top-k run on the same summaries nearest in density
                near = min(topk, key=lambda x: abs(x["density"] - c["density"]))
                pairs.append(paired(samples, c["method"], near["method"], c["length"],
                                    solved.get(c["length"], [])))
    print(format_comparison(comp))
    print(f"\ndefault rule: {choice['rule']}")
    _print_choice("chosen", choice)
    sc = choice.get("summary_choice") or {}
    if sc.get("method"):
        alts = ", ".join(f"{a['method']} ({'dominates' if a['dominates'] else 'does not'})"
                         for a in sc["alternatives"]) or "none run"
        print(f"summary kind: {sc['rule']}\n  -> {sc['kind']} ({sc['method']}); "
              f"twins: {alts}")
    if choice["learned"]["candidates"]:
        print(f"per-model file (attn_pool), reported apart: {choice['learned']['rule']}")
        _print_choice("best learned", choice["learned"])
    print("\n" + format_targets(targets))
    for p in pairs:
        print(f"paired @{p['length']}: {p['a']} better on {p['a_better']}, {p['b']} better on "
              f"{p['b_better']}, same on {p['same']} of {p['n']} prompts")
    if args.out:
        merged.update(comparison=comp, default_choice=choice, targets=targets, paired=pairs,
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
