"""Attention recall of the compared methods on natural text (issue 13, item 4).

At sampled decode positions of held-out natural text (eval/text.py, slice "recall": Python
stdlib docstrings that `vllm-dash distill` never fits on), per attention layer and KV head:
the fraction of the dense softmax mass that falls inside the blocks a method selects
(kernels/recall.attention_recall), at the method's measured density (selected tokens /
context length), and the oracle - the blocks ranked by their true mass - with the same
number of blocks per (position, layer, KV head). It needs no task the model can solve, so
it ranks selectors on any model and at any length.

Per layer, a method's selection is reference.select_blocks with the method's DashParams
(vllm_dash.config.DashConfig.from_mapping(dash).params_for_layer(i), summary "auto"
resolved as the engine would: attn_pool when pooling vectors are given, else the
training-free kind) over the block summaries of the captured post-RoPE keys
(reference.block_summaries of that kind; attn_pool with the ``pool`` rows of the summary
file: the method's own summary_file, else ``summary_file``). Queries and keys come from one
prefill per window (eval/capture.py), so every method is scored on the same positions.
Decode positions are drawn from the last eighth of each window (context lengths in
[7/8 * length, length]). Dense attention (``dash`` None) has recall 1 at density 1.

``python -m vllm_dash.eval.recall [MODEL] --out FILE.json`` runs it from the command line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import torch

from vllm_dash.eval import capture as cap_mod
from vllm_dash.eval import text as text_mod
from vllm_dash.eval.distill import int_list, progress_bar
from vllm_dash.kernels import reference
from vllm_dash.kernels.recall import attention_recall

__all__ = ["measure_recall", "load_pool", "recall_methods", "recall_main"]

def load_pool(path: str, num_layers: int, num_kv_heads: int, head_size: int) -> torch.Tensor:
    """The summary file's ``pool`` fp32 [L, Hk, D], checked against the model as the engine
    checks it (vllm_dash.summary_source)."""
    from vllm_dash.summary_source import ModelShape, checked_file_pool
    return checked_file_pool(path, ModelShape(num_layers, num_kv_heads, head_size))


def _method_plan(m: dict, num_layers: int, summary_file: Optional[str]) -> Optional[dict]:
    """{"kind", "params": [DashParams per layer], "file"} of a DASH method (None: dense)."""
    from vllm_dash.config import DashConfig

    if m.get("dash") is None:
        return None
    dash = dict(m["dash"])
    cfg = DashConfig.from_mapping(dash)
    file = dash.get("summary_file") or summary_file
    if hasattr(cfg, "resolve_summary"):
        cfg = cfg.resolve_summary(has_pool=file is not None)
    params = [cfg.params_for_layer(i) for i in range(num_layers)]
    kind = getattr(params[0], "summary", "mean")
    return {"kind": kind, "params": params, "file": file if kind == "attn_pool" else None}


def _score_window(cap, plans: dict, pools: dict, acc: dict, block_size: int) -> None:
    """Add one window's per-layer sums (recall, oracle, density) to ``acc``."""
    lens = cap.positions + 1
    P = len(lens)
    for layer, (k, q, scale) in enumerate(zip(cap.keys, cap.queries, cap.scales)):
        kk = k.float()[None].expand(P, *k.shape)                        # [P, Hk, T, D]
        qq = q.float().transpose(0, 1).contiguous()                      # [P, Hq, D]
        lens_d = lens.to(qq.device)
        mass = cap_mod.dense_block_mass(q, k, cap.positions, block_size=block_size,
                                        scale=scale)                    # [P, Hq, n]
        summaries = {}
        for name, plan in plans.items():
            key = (plan["kind"], plan["file"])
            if key not in summaries:
                pool = pools[plan["file"]][layer].to(qq.device) if plan["file"] else None
                summaries[key] = reference.block_summaries(kk, block_size, lens_d,
                                                           summary=plan["kind"], pool=pool)
            sel = reference.select_blocks(qq, summaries[key], lens_d,
                                          params=plan["params"][layer],
                                          block_size=block_size, scale=scale)
            r = attention_recall(mass, sel)
            a = acc[name]
            a["recall"][layer] += float(r["recall"].mean()) * P
            a["oracle"][layer] += float(r["oracle"].mean()) * P
            a["density"][layer] += float(sel.density().mean()) * P
            a["n"][layer] += P


def measure_recall(model, methods: Sequence[dict], lengths: Sequence[int], *, windows: int,
                   positions: int, seed: int, device: str = "cpu",
                   summary_file: Optional[str] = None, progress: bool = True,
                   block_size: int = 64) -> list:
    """Rows {"method", "family", "summary", "length", "recall", "density", "oracle_recall",
    "recall_per_layer", "oracle_per_layer", "density_per_layer", "n_positions"}, one per
    (method, length), in the order of ``methods`` then ``lengths``. Means are over
    positions, KV heads (density) or query heads (recall), then layers."""
    if not isinstance(windows, int) or windows < 1:
        raise ValueError(f"windows={windows!r} is invalid: must be an integer >= 1")
    if not isinstance(positions, int) or positions < 1:
        raise ValueError(f"positions={positions!r} is invalid: must be an integer >= 1")
    lm, tok = cap_mod.load_model(model, device)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    bar = progress_bar(len(lengths) * windows, "recall", progress)
    try:
        for T in lengths:
            acc, plans, pools, n_pos, L = None, None, {}, 0, 0
            for ids in text_mod.token_windows(tok, "recall", int(T), windows, seed):
                pos = cap_mod.sample_positions(T, positions, gen, low=T - max(1, T // 8))
                cap = cap_mod.capture(lm, ids, pos)
                if plans is None:
                    L = cap.num_layers
                    Hk, D = cap.keys[0].shape[0], cap.keys[0].shape[-1]
                    plans = {m["name"]: _method_plan(m, L, summary_file) for m in methods}
                    plans = {n: p for n, p in plans.items() if p is not None}
                    for p in plans.values():
                        if p["file"] and p["file"] not in pools:
                            pools[p["file"]] = load_pool(p["file"], L, Hk, D)
                    acc = {n: {k: [0.0] * L for k in ("recall", "oracle", "density", "n")}
                           for n in plans}
                _score_window(cap, plans, pools, acc, block_size)
                n_pos += len(pos)
                bar.update(1)
            rows += _rows(methods, plans, acc, T, L, n_pos)
    finally:
        bar.close()
    return rows


def _rows(methods, plans, acc, T, L, n_pos) -> list:
    out = []
    for m in methods:
        base = {"method": m["name"], "family": m.get("family"), "length": int(T),
                "n_positions": n_pos}
        if m["name"] not in plans:                      # dense: everything, all the mass
            out.append({**base, "summary": None, "recall": 1.0, "density": 1.0,
                        "oracle_recall": 1.0, "recall_per_layer": [1.0] * L,
                        "oracle_per_layer": [1.0] * L, "density_per_layer": [1.0] * L})
            continue
        a = acc[m["name"]]
        per = {k: [s / max(n, 1) for s, n in zip(a[k], a["n"])]
               for k in ("recall", "oracle", "density")}
        mean = {k: sum(v) / len(v) for k, v in per.items()}
        out.append({**base, "summary": plans[m["name"]]["kind"],
                    "recall": mean["recall"], "density": mean["density"],
                    "oracle_recall": mean["oracle"], "recall_per_layer": per["recall"],
                    "oracle_per_layer": per["oracle"], "density_per_layer": per["density"]})
    return out


# ----------------------------------------------------------------------------- CLI
def recall_methods(summary_file: Optional[str] = None) -> list:
    """A default comparison: dense; per summary kind (attn_pool only with a summary file)
    top-k at k = 2, 4, 8, 16, DASH with the serving defaults, and DASH without the floor
    (min_blocks 0: entmax's own budget) at score_scale 2."""
    base = {"score_norm": "standardize", "prior_weight": 0.0, "sink_blocks": 1,
            "local_blocks": 1, "dense_below": 0}
    out = [{"name": "dense", "family": "dense", "dash": None}]
    kinds = ["mean", "minmax"] + (["attn_pool"] if summary_file else [])
    for kind in kinds:
        extra = {"summary": kind}
        out += [{"name": f"{kind}-topk-k{k}", "family": f"{kind}-topk",
                 "dash": {**base, **extra, "selector": "topk", "min_blocks": k}}
                for k in (2, 4, 8, 16)]
        out.append({"name": f"{kind}-dash-default", "family": f"{kind}-dash",
                    "dash": dict(extra)})
        out.append({"name": f"{kind}-dash-nofloor-s2", "family": f"{kind}-dash-nofloor",
                    "dash": {**base, **extra, "score_scale": 2.0, "min_blocks": 0}})
    return out


def recall_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m vllm_dash.eval.recall",
        description="Attention recall (dense softmax mass inside the selected blocks) of "
                    "methods on held-out Python stdlib docstrings, with the oracle at the "
                    "same density.")
    ap.add_argument("model", nargs="?", default=None,
                    help="Hugging Face model folder or 'smollm2-135m-instruct' (default)")
    ap.add_argument("--out", required=True, help="output JSON file")
    ap.add_argument("--methods", default=None,
                    help="JSON file: a list of method dicts {name, family, dash} (default: "
                         "dense, top-k and DASH's defaults per summary kind)")
    ap.add_argument("--summary-file", default=None,
                    help="pooling vectors (vllm-dash distill) for attn_pool methods")
    ap.add_argument("--lengths", type=int_list, default=[4096, 8192])
    ap.add_argument("--windows", type=int, default=2, help="text windows per length")
    ap.add_argument("--positions", type=int, default=16, help="decode positions per window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--device", choices=cap_mod.DEVICES, default=None,
                    help="default cuda when available")
    ap.add_argument("--quiet", action="store_true")
    return ap


def recall_main(argv: Sequence[str]) -> int:
    args = recall_parser().parse_args(list(argv))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.methods:
        with open(args.methods) as f:
            methods = json.load(f)
    else:
        methods = recall_methods(args.summary_file)
    t0 = time.time()
    try:
        rows = measure_recall(args.model, methods, args.lengths, windows=args.windows,
                              positions=args.positions, seed=args.seed, device=device,
                              summary_file=args.summary_file, progress=not args.quiet,
                              block_size=args.block_size)
    except ValueError as exc:
        print(f"recall: error: {exc}", file=sys.stderr)
        return 2
    meta = {"model": args.model or "smollm2-135m-instruct", "data": text_mod.describe(
            "recall", args.seed), "windows": args.windows, "positions": args.positions,
            "block_size": args.block_size, "summary_file": args.summary_file,
            "device": device, "wall_s": round(time.time() - t0, 1)}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    for r in rows:
        print(f"{r['method']:24s} {r['length']:6d}  recall {r['recall']:.3f}  density "
              f"{r['density']:.3f}  oracle {r['oracle_recall']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(recall_main(sys.argv[1:]))
