#!/usr/bin/env python3
"""Before/after comparison of two bench_kernels.py runs (same GPU, ideally one device call).

Matches rows by (heads, batch, context, method), prints after/before latency ratios and,
per method family (dash@, dash-dense, select@, dash+select@, and the dense baselines as a
drift control), the largest deviation. Writes the comparison as JSON with both runs' meta.

    python benchmarks/compare_kernels.py BEFORE.json AFTER.json --heads 32/8 --out cmp.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

KEY = ("heads", "batch", "context", "method")


def family(method: str) -> str:
    return method.split("@")[0]


def _rows(path: str, heads: set) -> tuple:
    with open(path) as f:
        data = json.load(f)
    rows = {tuple(r[k] for k in KEY): r for r in data["rows"]
            if r.get("status") == "ok" and (not heads or r["heads"] in heads)}
    return data.get("meta", {}), rows


def compare(before: str, after: str, heads: set, tolerance: float) -> dict:
    meta_b, rows_b = _rows(before, heads)
    meta_a, rows_a = _rows(after, heads)
    pairs = []
    for key in sorted(set(rows_b) & set(rows_a), key=lambda k: (k[0], k[1], k[2], k[3])):
        b, a = rows_b[key]["latency_us"], rows_a[key]["latency_us"]
        pairs.append(dict(zip(KEY, key), before_us=b, after_us=a, ratio=a / b))
    by_family = defaultdict(list)
    for p in pairs:
        by_family[family(p["method"])].append(p["ratio"])
    summary = {f: dict(rows=len(r), median_ratio=statistics.median(r), min_ratio=min(r),
                       max_ratio=max(r), max_dev=max(abs(x - 1) for x in r))
               for f, r in sorted(by_family.items())}
    ours = [p["ratio"] for p in pairs if family(p["method"]) in
            ("dash", "dash-dense", "select", "dash+select")]
    return dict(meta_before=meta_b, meta_after=meta_a, tolerance=tolerance, pairs=pairs,
                summary=summary,
                only_before=[dict(zip(KEY, k)) for k in sorted(set(rows_b) - set(rows_a))],
                only_after=[dict(zip(KEY, k)) for k in sorted(set(rows_a) - set(rows_b))],
                ours_within_tolerance=bool(ours) and all(abs(x - 1) <= tolerance for x in ours),
                ours_median_ratio=statistics.median(ours) if ours else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--heads", default="", help="Hq/Hk pairs to compare, comma separated "
                   "(default: all)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="largest |after/before - 1| of our kernels' rows called 'agree'")
    p.add_argument("--out", default=None, help="JSON path")
    a = p.parse_args(argv)
    res = compare(a.before, a.after, {h for h in a.heads.split(",") if h}, a.tolerance)
    gpu_b = res["meta_before"].get("gpu")
    gpu_a = res["meta_after"].get("gpu")
    print(f"GPU before: {gpu_b}; after: {gpu_a}")
    print(f"{'heads':>6} {'batch':>5} {'context':>8} {'method':<18} {'before us':>10} "
          f"{'after us':>10} {'ratio':>6}")
    for r in res["pairs"]:
        print(f"{r['heads']:>6} {r['batch']:>5} {r['context']:>8} {r['method']:<18} "
              f"{r['before_us']:>10.1f} {r['after_us']:>10.1f} {r['ratio']:>6.3f}")
    print("\nper method family: rows, median / min / max after/before")
    for f, s in res["summary"].items():
        print(f"  {f:<14} {s['rows']:>4}  {s['median_ratio']:.3f} / {s['min_ratio']:.3f} / "
              f"{s['max_ratio']:.3f}")
    print(f"\nour kernels' rows within {100 * a.tolerance:g}%: {res['ours_within_tolerance']} "
          f"(median ratio {res['ours_median_ratio']})")
    if res["only_before"] or res["only_after"]:
        print(f"unmatched rows: {len(res['only_before'])} only before, "
              f"{len(res['only_after'])} only after")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
