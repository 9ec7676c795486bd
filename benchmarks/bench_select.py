#!/usr/bin/env python
"""Stage-1 selection timing (kernels/select.py select_blocks_paged), GPU only.

Each case is captured once into a CUDA graph (static inputs, a preallocated
SelectWorkspace) and timed with triton.testing.do_bench over graph replays (median, µs).
Prints a table and writes JSON to --out.

    python benchmarks/bench_select.py --out results/bench_select.json
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton

import common
from vllm_dash.kernels.params import DashParams
from vllm_dash.kernels.select import SelectWorkspace, select_blocks_paged

K = 1024
CASES = [  # name, S, Hq, Hk, B, context, settings
    ("1x128K 32/8 B64", 1, 32, 8, 64, 128 * K, dict()),
    ("1x128K 32/8 B64 floor+cap", 1, 32, 8, 64, 128 * K,
     dict(min_blocks=8, max_blocks=64, sink_blocks=1, local_blocks=2)),
    ("1x32K 32/8 B64", 1, 32, 8, 64, 32 * K, dict()),
    ("8x32K 32/8 B64", 8, 32, 8, 64, 32 * K, dict()),
    ("32x32K 32/8 B64 floor+cap", 32, 32, 8, 64, 32 * K,
     dict(alpha=1.25, min_blocks=8, max_blocks=64, sink_blocks=1, local_blocks=2)),
    ("32x32K 32/8 B16 floor", 32, 32, 8, 16, 32 * K, dict(min_blocks=8)),
    ("1x128K 32/2 B64 floor+cap", 1, 32, 2, 64, 128 * K,
     dict(min_blocks=8, max_blocks=64, sink_blocks=1, local_blocks=2)),
    ("4x64K 32/2 B16 std+floor", 4, 32, 2, 16, 64 * K,
     dict(score_norm="standardize", score_scale=3.0, min_blocks=8, sink_blocks=1,
          local_blocks=1, prior_norm="max")),
    ("1x256K 32/8 B16 (tiled fallback)", 1, 32, 8, 16, 256 * K, dict(min_blocks=8)),
]


def run_case(name, S, Hq, Hk, B, ctx, kw, D=128, dtype=torch.bfloat16, seed=0):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    nmax = -(-ctx // B)
    num_blocks = S * nmax + 16
    summ = torch.randn(num_blocks, Hk, D, generator=g, device=dev)
    q = (torch.randn(S, Hq, D, generator=g, device=dev) * 2.0).to(dtype)
    bt = torch.randperm(num_blocks, generator=g, device=dev)[: S * nmax].view(S, nmax)
    bt = bt.to(torch.int32).contiguous()
    lens = torch.full((S,), ctx, dtype=torch.int32, device=dev)
    ids = torch.empty(S, Hk, nmax, dtype=torch.int32, device=dev)
    lp = torch.empty(S, Hk, nmax, dtype=torch.float32, device=dev)
    cnt = torch.empty(S, Hk, dtype=torch.int32, device=dev)
    ws = SelectWorkspace(S, Hq, Hk, nmax, device=dev)
    params = DashParams(**kw)

    def call():
        select_blocks_paged(q=q, summaries=summ, block_table=bt, seq_lens=lens,
                            out_block_ids=ids, out_log_prior=lp, out_counts=cnt,
                            workspace=ws, block_size=B, params=params)

    graph = common.capture_graph(call)                  # compiles and warms up first
    us = triton.testing.do_bench(graph.replay, warmup=50, rep=300,
                                 return_mode="median") * 1000.0
    density = float(cnt.float().mean()) / nmax
    return dict(name=name, S=S, Hq=Hq, Hk=Hk, B=B, context=ctx, n_blocks=nmax,
                settings=kw, us=us, mean_count=float(cnt.float().mean()),
                density=density, workspace_mb=ws.nbytes / 2**20)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_select.json")
    ap.add_argument("--only", default=None, help="substring filter on case names")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_select.py needs a CUDA GPU")
    rows = []
    print(f"{'case':40s} {'n_blocks':>8s} {'us':>9s} {'count':>8s} {'density':>8s}")
    for case in CASES:
        if args.only and args.only not in case[0]:
            continue
        r = run_case(*case)
        rows.append(r)
        print(f"{r['name']:40s} {r['n_blocks']:8d} {r['us']:9.1f} {r['mean_count']:8.1f} "
              f"{r['density']:8.3f}", flush=True)
    meta = dict(device=common.gpu_name(), **common.versions())
    common.write_json(args.out, dict(meta=meta, results=rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
