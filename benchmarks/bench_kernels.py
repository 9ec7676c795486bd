#!/usr/bin/env python
"""Kernel benchmark: DASH stage-2 decode (kernels/decode.py) vs dense decode baselines.

For every (heads, batch, context) it times, with triton.testing.do_bench (warm-up, median):
  dash@<d>      our split-KV kernel over random selections at density d (default 50/25/12.5 %;
                the current block always selected, random log priors, --prior-weight);
  dash-dense    our kernel with every block selected (fill_dense_selection, prior weight 0);
  sdpa-cudnn, sdpa-flash
                torch SDPA decode (q length 1) through torch.nn.attention.sdpa_kernel, over
                the same cache viewed as [batch, Hk, L, D] (identity block table; GQA through
                enable_gqa, else a contiguous copy, noted in the JSON);
  fa3-paged     vLLM's FlashAttention-3 paged decode (vllm.vllm_flash_attn
                flash_attn_varlen_func, block_table/seqused_k, fa_version=3), only if importable;
  fa3-sparse@<d> the same FA3 kernel over a compacted per-(sequence, KV head) page table
                (docs/design.md §4.4; needs --layout hnd; no log prior), only if importable;
  select@<d>, dash+select@<d>
                with a selection hook (--select module:function, or run(select_fn=...)): the
                hook alone and hook + our decode.

Each row reports latency (µs), bytes read (K+V of the tokens attended + q + out), achieved
TB/s and % of the GPU's HBM peak (H100 SXM 3.35 TB/s, H200 4.8 TB/s, by device name).
Writes a table to stdout, JSON to --out and, if matplotlib is importable, a PNG (latency vs
context, one line per method, one panel per heads/batch) next to it.

    python benchmarks/bench_kernels.py --out results/bench_kernels.json
    python benchmarks/bench_kernels.py --quick            # a few small configs

Selection hook signature (writes the compacted selection in place, no return value):
    fn(*, q, key_cache, value_cache, block_table, seq_lens, block_size, density,
       out_block_ids, out_log_prior, out_counts) -> None
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import traceback
from typing import Callable, Optional

import torch

import common
from common import DTYPES, bench_ms, fa3_module, floats, gpu_name, hbm_peak_tbs, ints

common.interpret_without_gpu()             # before the kernels import Triton
from dense_fill import fill_dense_selection  # noqa: E402
from fa_tables import (compact_head_major_tables, head_major_page_view,  # noqa: E402
                       queries_as_groups)
from vllm_dash.kernels.decode import (DecodeWorkspace, choose_num_splits,  # noqa: E402
                                      sparse_decode)
from vllm_dash.kernels.params import DashParams  # noqa: E402

# --------------------------------------------------------------------------------------
# selection hook
# --------------------------------------------------------------------------------------
def load_select(spec: Optional[str]):
    if not spec:
        return None
    mod, _, name = spec.partition(":")
    if not name:
        raise SystemExit("--select must be module:function")
    return getattr(importlib.import_module(mod), name)


# --------------------------------------------------------------------------------------
# one configuration
# --------------------------------------------------------------------------------------
def random_selection(block_table, num_kv_heads, n, k, ids, lp, counts, gen):
    """k random blocks per (sequence, KV head) incl. the current one, ascending, on device."""
    S = block_table.shape[0]
    r = torch.rand(S, num_kv_heads, n, device=block_table.device, generator=gen)
    r[..., n - 1] = 2.0
    logical = r.topk(k, dim=-1).indices.sort(-1).values
    phys = block_table[:, None, :n].expand(S, num_kv_heads, n).gather(-1, logical)
    ids.zero_()
    ids[:S, :, :k] = phys.to(ids.dtype)
    lp.zero_()
    prior = torch.rand(S, num_kv_heads, k, device=block_table.device, generator=gen)
    prior[..., -1] = 1.0
    lp[:S, :, :k] = prior.clamp_min(1e-3).log()
    counts[:S] = k


def run_config(*, Hq, Hk, batch, ctx, D, B, dtype, densities, prior_weight, num_splits,
               layout, warmup, rep, select_fn, fa3, fa3_reason, methods, peak, device,
               launch=None):
    launch = launch or {}
    elem = torch.finfo(dtype).bits // 8
    n = -(-ctx // B)
    nb = batch * n
    cache_bytes = 2 * nb * B * Hk * D * elem
    rows = []
    base = dict(heads=f"{Hq}/{Hk}", batch=batch, context=ctx, head_size=D, block_size=B,
                dtype=str(dtype).replace("torch.", ""), layout=layout)
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        need = cache_bytes + 4 * batch * Hk * n * 8 + (64 << 20)
        if need > 0.85 * free:
            return [dict(base, method="*", status=f"skipped: needs ~{need / 2**30:.1f} GiB, "
                                                  f"{free / 2**30:.1f} GiB free")]
    gen = torch.Generator(device=device).manual_seed(ctx + batch + Hk)
    if layout == "nhd":
        kc = torch.randn(nb, B, Hk, D, device=device, dtype=dtype, generator=gen)
        vc = torch.randn(nb, B, Hk, D, device=device, dtype=dtype, generator=gen)
        k_view, v_view = kc, vc
    else:
        kc = torch.randn(nb, Hk, B, D, device=device, dtype=dtype, generator=gen)
        vc = torch.randn(nb, Hk, B, D, device=device, dtype=dtype, generator=gen)
        k_view, v_view = kc.transpose(1, 2), vc.transpose(1, 2)
    bt = torch.arange(nb, device=device, dtype=torch.int32).view(batch, n)   # identity
    seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    q = torch.randn(batch, Hq, D, device=device, dtype=dtype, generator=gen)
    out = torch.empty_like(q)
    ids = torch.zeros(batch, Hk, n, device=device, dtype=torch.int32)
    lp = torch.zeros(batch, Hk, n, device=device, dtype=torch.float32)
    counts = torch.zeros(batch, Hk, device=device, dtype=torch.int32)
    ns = num_splits or choose_num_splits(num_seqs=batch, num_kv_heads=Hk, max_blocks_per_seq=n,
                                         block_size=B, device=device)
    ws = DecodeWorkspace(batch, Hq, D, max(ns, 1), device=device)
    qo_bytes = 2 * batch * Hq * D * elem
    dense_kv_bytes = 2 * batch * Hk * ctx * D * elem

    def record(method, ms, kv_bytes, **extra):
        total = kv_bytes + qo_bytes
        tbs = total / (ms * 1e-3) / 1e12 if ms else None
        rows.append(dict(base, method=method, status="ok", latency_us=ms * 1e3, bytes=total,
                         tb_per_s=tbs, pct_peak=(100 * tbs / peak) if (peak and tbs) else None,
                         timing=bench_ms.last_mode, **extra))

    def decode(pw):
        params = DashParams(prior_weight=pw)
        return lambda: sparse_decode(q=q, key_cache=k_view, value_cache=v_view, block_ids=ids,
                                     log_prior=lp, counts=counts, seq_lens=seq_lens, out=out,
                                     params=params, block_size=B, num_splits=ns,
                                     workspace=ws, **launch)

    def selected_kv_bytes():
        c = counts[:batch].long()
        tokens = (c * B).sum().item()            # every seq_len is a multiple of B here
        if ctx % B:
            tokens -= batch * Hk * (n * B - ctx)
        return 2 * tokens * D * elem

    def guarded(method, fn):
        if methods and not any(method.startswith(m) for m in methods):
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failing method must not stop the sweep
            rows.append(dict(base, method=method, status=f"error: {type(e).__name__}: {e}",
                             traceback=traceback.format_exc(limit=4)))
            if device == "cuda":
                torch.cuda.synchronize()

    # --- ours, random selections
    for d in densities:
        k = max(1, min(n, round(d * n)))
        name = f"dash@{d:g}"

        def _sparse(d=d, k=k, name=name):
            random_selection(bt, Hk, n, k, ids, lp, counts, gen)
            ms = bench_ms(decode(prior_weight), warmup, rep)
            record(name, ms, selected_kv_bytes(), density=k / n, num_splits=ns,
                   prior_weight=prior_weight)
        guarded(name, _sparse)

    # --- ours, every block selected
    def _dense():
        fill_dense_selection(block_table=bt, seq_lens=seq_lens, num_kv_heads=Hk, block_size=B,
                             out_block_ids=ids, out_log_prior=lp, out_counts=counts)
        ms = bench_ms(decode(0.0), warmup, rep)
        record("dash-dense", ms, selected_kv_bytes(), density=1.0, num_splits=ns,
               prior_weight=0.0)
    guarded("dash-dense", _dense)

    # --- selection hook
    if select_fn is not None:
        for d in densities:
            def _sel(d=d):
                def sel():
                    select_fn(q=q, key_cache=k_view, value_cache=v_view, block_table=bt,
                              seq_lens=seq_lens, block_size=B, density=d, out_block_ids=ids,
                              out_log_prior=lp, out_counts=counts)
                ms_sel = bench_ms(sel, warmup, rep)
                sel()
                kvb = selected_kv_bytes()
                record(f"select@{d:g}", ms_sel, 0)
                dec = decode(prior_weight)

                def both():
                    sel()
                    dec()
                ms = bench_ms(both, warmup, rep)
                dens = kvb / max(dense_kv_bytes, 1)
                record(f"dash+select@{d:g}", ms, kvb, density=dens, num_splits=ns,
                       prior_weight=prior_weight)
            guarded(f"select@{d:g}", _sel)

    # --- torch SDPA over the same cache (identity block table)
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        if layout == "nhd":
            kk = kc.view(batch, n * B, Hk, D)[:, :ctx].transpose(1, 2)
            vv = vc.view(batch, n * B, Hk, D)[:, :ctx].transpose(1, 2)
        else:
            kk = kc.view(batch, n, Hk, B, D).permute(0, 2, 1, 3, 4).reshape(batch, Hk, n * B, D)
            vv = vc.view(batch, n, Hk, B, D).permute(0, 2, 1, 3, 4).reshape(batch, Hk, n * B, D)
            kk, vv = kk[:, :, :ctx], vv[:, :, :ctx]
        q4 = q[:, :, None, :]
        for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
            def _sdpa(name=name, backend=backend):
                def attempt(k_, v_):
                    def f():
                        with sdpa_kernel(backend):
                            torch.nn.functional.scaled_dot_product_attention(
                                q4, k_, v_, enable_gqa=True)
                    f()
                    return f
                note = "strided view of the cache, enable_gqa"
                try:
                    f = attempt(kk, vv)
                except RuntimeError:
                    torch.cuda.synchronize()
                    if 2 * cache_bytes > 0.85 * torch.cuda.mem_get_info()[0]:
                        raise
                    note = "contiguous copy of K/V, enable_gqa"
                    f = attempt(kk.contiguous(), vv.contiguous())
                record(name, bench_ms(f, warmup, rep), dense_kv_bytes, density=1.0, note=note)
            guarded(name, _sdpa)

    # --- vLLM FlashAttention-3
    if fa3 is None:
        if not methods or any(m.startswith("fa3") for m in methods):
            rows.append(dict(base, method="fa3-paged", status=fa3_reason))
    elif layout == "nhd":
        def _fa3():
            cu = torch.arange(batch + 1, device=device, dtype=torch.int32)
            o = torch.empty_like(q)

            def f():
                fa3(q=q, k=kc, v=vc, max_seqlen_q=1, cu_seqlens_q=cu, max_seqlen_k=ctx,
                    seqused_k=seq_lens, softmax_scale=1.0 / math.sqrt(D), causal=True,
                    block_table=bt, out=o, fa_version=3)
            record("fa3-paged", bench_ms(f, warmup, rep), dense_kv_bytes, density=1.0)
        guarded("fa3-paged", _fa3)
    else:
        # head-major cache: page (b, h) = b * Hk + h; one pseudo-sequence per (seq, KV head)
        for d in densities:
            k = max(1, min(n, round(d * n)))

            def _fa3s(d=d, k=k):
                random_selection(bt, Hk, n, k, ids, lp, counts, gen)
                table = torch.empty(batch * Hk, ids.shape[2], device=device, dtype=torch.int32)
                used = torch.empty(batch * Hk, device=device, dtype=torch.int32)
                compact_head_major_tables(block_ids=ids, counts=counts, seq_lens=seq_lens,
                                          block_size=B, out_block_table=table,
                                          out_seqused_k=used)
                qq = queries_as_groups(q, Hk)
                cu = torch.arange(batch * Hk + 1, device=device, dtype=torch.int32)
                o = torch.empty_like(qq)
                kp, vp = head_major_page_view(kc), head_major_page_view(vc)

                def f():
                    fa3(q=qq, k=kp, v=vp, max_seqlen_q=1, cu_seqlens_q=cu, max_seqlen_k=k * B,
                        seqused_k=used, softmax_scale=1.0 / math.sqrt(D), causal=True,
                        block_table=table, out=o, fa_version=3)
                record(f"fa3-sparse@{d:g}", bench_ms(f, warmup, rep), selected_kv_bytes(),
                       density=k / n, prior_weight=0.0)
            guarded(f"fa3-sparse@{d:g}", _fa3s)

    del kc, vc
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=ints, default=[4096, 16384, 32768, 65536, 131072])
    p.add_argument("--batches", type=ints, default=[1, 8, 32])
    p.add_argument("--heads", default="32/8,32/2", help="Hq/Hk pairs, comma separated")
    p.add_argument("--densities", type=floats, default=[0.5, 0.25, 0.125])
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--layout", choices=["nhd", "hnd"], default="nhd",
                   help="cache layout: vLLM NHD [blocks, B, Hk, D] or head-major [blocks, Hk, "
                        "B, D] (our kernel reads its transpose(1, 2) view; fa3-sparse needs it)")
    p.add_argument("--prior-weight", type=float, default=1.0)
    p.add_argument("--num-splits", type=int, default=None, help="default: automatic")
    p.add_argument("--num-warps", type=int, default=None, help="our kernel's num_warps")
    p.add_argument("--num-stages", type=int, default=None, help="our kernel's num_stages")
    p.add_argument("--no-graph", action="store_true",
                   help="time eager calls (includes Python launch overhead) instead of "
                        "CUDA-graph replays")
    p.add_argument("--methods", default="", help="comma-separated method-name prefixes to run")
    p.add_argument("--select", default=None, help="selection hook module:function")
    p.add_argument("--no-fa3", action="store_true", help="skip the vLLM FA3 baselines")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--quick", action="store_true", help="contexts 4K,32K; batches 1,8")
    p.add_argument("--out", default="bench_kernels.json", help="JSON path (PNG beside it)")
    p.add_argument("--png", default=None, help="PNG path (default: --out with .png)")
    return p.parse_args(argv)


def print_table(rows):
    hdr = f"{'heads':>6} {'batch':>5} {'context':>8} {'method':<18} {'lat_us':>9} " \
          f"{'MB read':>9} {'TB/s':>6} {'%peak':>6}  status"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r.get("status") == "ok":
            print(f"{r['heads']:>6} {r['batch']:>5} {r['context']:>8} {r['method']:<18} "
                  f"{r['latency_us']:>9.1f} {r['bytes'] / 1e6:>9.1f} "
                  f"{(r['tb_per_s'] or 0):>6.2f} "
                  f"{(r['pct_peak'] if r['pct_peak'] is not None else float('nan')):>6.1f}  ok")
        else:
            print(f"{r['heads']:>6} {r['batch']:>5} {r['context']:>8} {r['method']:<18} "
                  f"{'':>9} {'':>9} {'':>6} {'':>6}  {r.get('status')}")


def write_png(rows, path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"not written: matplotlib unavailable ({type(e).__name__})"
    ok = [r for r in rows if r.get("status") == "ok"]
    panels = sorted({(r["heads"], r["batch"]) for r in ok})
    if not panels:
        return "not written: no successful rows"
    cols = len({b for _, b in panels})
    heads = sorted({h for h, _ in panels})
    batches = sorted({b for _, b in panels})
    fig, axes = plt.subplots(len(heads), cols, figsize=(5 * cols, 4 * len(heads)),
                             squeeze=False)
    for i, h in enumerate(heads):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            sub = [r for r in ok if r["heads"] == h and r["batch"] == b]
            for m in sorted({r["method"] for r in sub}):
                pts = sorted((r["context"], r["latency_us"]) for r in sub if r["method"] == m)
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"heads {h}, batch {b}")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("latency (µs)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"DASH decode vs dense — {gpu_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"written: {path}"


def run(args=None, select_fn: Optional[Callable] = None):
    """Run the sweep; ``select_fn`` (or --select) adds the selection-kernel timings."""
    args = args if isinstance(args, argparse.Namespace) else parse_args(args)
    select_fn = select_fn or load_select(args.select)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("no CUDA device: CPU/Triton-interpreter smoke run (timings meaningless)")
    name = gpu_name()
    peak = hbm_peak_tbs(name)
    bench_ms.use_graph = not args.no_graph
    launch = {k: v for k, v in (("num_warps", args.num_warps),
                                ("num_stages", args.num_stages)) if v is not None}
    fa3, fa3_reason = (None, "unavailable: --no-fa3") if args.no_fa3 else fa3_module()
    contexts = [4096, 32768] if args.quick else args.contexts
    batches = [1, 8] if args.quick else args.batches
    methods = [m for m in args.methods.split(",") if m]
    heads = [tuple(int(x) for x in h.split("/")) for h in args.heads.split(",") if h]
    rows = []
    for Hq, Hk in heads:
        for batch in batches:
            for ctx in contexts:
                rows += run_config(Hq=Hq, Hk=Hk, batch=batch, ctx=ctx, D=args.head_size,
                                   B=args.block_size, dtype=DTYPES[args.dtype],
                                   densities=args.densities, prior_weight=args.prior_weight,
                                   num_splits=args.num_splits, layout=args.layout,
                                   warmup=args.warmup, rep=args.rep, select_fn=select_fn,
                                   fa3=fa3, fa3_reason=fa3_reason, methods=methods,
                                   peak=peak, device=device, launch=launch)
                done = [r for r in rows if r["context"] == ctx and r["batch"] == batch
                        and r["heads"] == f"{Hq}/{Hk}"]
                print(f"[{Hq}/{Hk} batch {batch} ctx {ctx}] " + ", ".join(
                    f"{r['method']} {r['latency_us']:.1f}us" if r.get("status") == "ok"
                    else f"{r['method']} {r.get('status')}" for r in done), flush=True)
                _write_json(args, rows, name, peak, fa3, fa3_reason, "pending")
    print(f"\nGPU: {name}; HBM peak used for %: "
          f"{peak if peak else 'unknown'} TB/s; dtype {args.dtype}, D={args.head_size}, "
          f"B={args.block_size}, layout {args.layout}; FA3: {'available' if fa3 else fa3_reason}")
    print_table(rows)
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    png_status = write_png(rows, png)
    _write_json(args, rows, name, peak, fa3, fa3_reason, png_status)
    print(f"JSON: {args.out}; PNG {png_status}")
    return rows


def _write_json(args, rows, name, peak, fa3, fa3_reason, png_status):
    """Rewritten after every configuration, so a run cut short keeps what it measured."""
    meta = dict(gpu=name, hbm_peak_tb_per_s=peak, **common.versions(),
                fa3="available" if fa3 else fa3_reason, png=png_status,
                bytes_model="K+V of the attended tokens + q + out (metadata, workspace excluded)",
                args={k: v for k, v in vars(args).items()})
    common.write_json(args.out, dict(meta=meta, rows=rows))


if __name__ == "__main__":
    run()
