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
With --write it times the fused cache write per summary kind instead (benchmarks/
bench_write.py: write-<kind>-decode / -prefill rows, each with its ratio to mean).

Each row reports latency (µs), bytes read (K+V of the tokens attended + q + out), achieved
TB/s and % of the GPU's HBM peak (H100 SXM 3.35 TB/s, H200 4.8 TB/s, by device name).
Writes a table to stdout, JSON to --out and, if matplotlib is importable, a PNG (latency vs
context, one line per method, one panel per heads/batch) next to it.

    python benchmarks/bench_kernels.py --out results/bench_kernels.json
    python benchmarks/bench_kernels.py --quick            # a few small configs
    python benchmarks/bench_kernels.py --write --contexts 131072 --batches 8 --heads 32/8

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
from bench_write import print_ratios, write_rows  # noqa: E402
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
    """Every method of the module docstring on one (heads, batch, context): the rows."""
    base = dict(heads=f"{Hq}/{Hk}", batch=batch, context=ctx, head_size=D, block_size=B,
                dtype=str(dtype).replace("torch.", ""), layout=layout)
    if device == "cuda":
        n = -(-ctx // B)
        need = (2 * batch * n * B * Hk * D * (torch.finfo(dtype).bits // 8)
                + 4 * batch * Hk * n * 8 + (64 << 20))
        free, _ = torch.cuda.mem_get_info()
        if need > 0.85 * free:
            return [dict(base, method="*", status=f"skipped: needs ~{need / 2**30:.1f} GiB, "
                                                  f"{free / 2**30:.1f} GiB free")]
    cb = ConfigBench(Hq=Hq, Hk=Hk, batch=batch, ctx=ctx, D=D, B=B, dtype=dtype, layout=layout,
                     num_splits=num_splits, warmup=warmup, rep=rep, methods=methods,
                     peak=peak, device=device, base=base, launch=launch or {})
    cb.ours(densities, prior_weight)
    if select_fn is not None:
        cb.selection(select_fn, densities, prior_weight)
    if device == "cuda":
        cb.sdpa()
    cb.fa3(fa3, fa3_reason, densities)
    rows = cb.rows
    del cb
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


class ConfigBench:
    """One (heads, batch, context): a random paged cache with an identity block table, the
    selection buffers our decode reads, and one method per call; rows collect in ``rows``."""

    def __init__(self, *, Hq, Hk, batch, ctx, D, B, dtype, layout, num_splits, warmup, rep,
                 methods, peak, device, base, launch):
        self.Hq, self.Hk, self.batch, self.ctx, self.D, self.B = Hq, Hk, batch, ctx, D, B
        self.layout, self.warmup, self.rep, self.methods = layout, warmup, rep, methods
        self.peak, self.device, self.base, self.launch = peak, device, base, launch
        self.rows = []
        self.elem = torch.finfo(dtype).bits // 8
        n = self.n = -(-ctx // B)
        nb = batch * n
        self.cache_bytes = 2 * nb * B * Hk * D * self.elem
        gen = self.gen = torch.Generator(device=device).manual_seed(ctx + batch + Hk)
        shape = (nb, B, Hk, D) if layout == "nhd" else (nb, Hk, B, D)
        self.kc = torch.randn(*shape, device=device, dtype=dtype, generator=gen)
        self.vc = torch.randn(*shape, device=device, dtype=dtype, generator=gen)
        if layout == "nhd":
            self.k_view, self.v_view = self.kc, self.vc
        else:
            self.k_view, self.v_view = self.kc.transpose(1, 2), self.vc.transpose(1, 2)
        self.bt = torch.arange(nb, device=device, dtype=torch.int32).view(batch, n)  # identity
        self.seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
        self.q = torch.randn(batch, Hq, D, device=device, dtype=dtype, generator=gen)
        self.out = torch.empty_like(self.q)
        self.ids = torch.zeros(batch, Hk, n, device=device, dtype=torch.int32)
        self.lp = torch.zeros(batch, Hk, n, device=device, dtype=torch.float32)
        self.counts = torch.zeros(batch, Hk, device=device, dtype=torch.int32)
        self.ns = num_splits or choose_num_splits(num_seqs=batch, num_kv_heads=Hk,
                                                  max_blocks_per_seq=n, block_size=B,
                                                  device=device)
        self.ws = DecodeWorkspace(batch, Hq, D, max(self.ns, 1), device=device)
        self.qo_bytes = 2 * batch * Hq * D * self.elem
        self.dense_kv_bytes = 2 * batch * Hk * ctx * D * self.elem

    # ---------------------------------------------------------------- helpers
    def record(self, method, ms, kv_bytes, **extra):
        total = kv_bytes + self.qo_bytes
        tbs = total / (ms * 1e-3) / 1e12 if ms else None
        pct = (100 * tbs / self.peak) if (self.peak and tbs) else None
        self.rows.append(dict(self.base, method=method, status="ok", latency_us=ms * 1e3,
                              bytes=total, tb_per_s=tbs, pct_peak=pct,
                              timing=bench_ms.last_mode, **extra))

    def bench(self, fn) -> float:
        return bench_ms(fn, self.warmup, self.rep)

    def decode(self, pw):
        """Our decode over the current selection buffers, as a timed callable."""
        params = DashParams(prior_weight=pw)
        return lambda: sparse_decode(q=self.q, key_cache=self.k_view, value_cache=self.v_view,
                                     block_ids=self.ids, log_prior=self.lp, counts=self.counts,
                                     seq_lens=self.seq_lens, out=self.out, params=params,
                                     block_size=self.B, num_splits=self.ns, workspace=self.ws,
                                     **self.launch)

    def selected_kv_bytes(self):
        c = self.counts[:self.batch].long()
        tokens = (c * self.B).sum().item()       # every seq_len is a multiple of B here
        if self.ctx % self.B:
            tokens -= self.batch * self.Hk * (self.n * self.B - self.ctx)
        return 2 * tokens * self.D * self.elem

    def random_selection(self, k):
        random_selection(self.bt, self.Hk, self.n, k, self.ids, self.lp, self.counts, self.gen)

    def guarded(self, method, fn):
        if self.methods and not any(method.startswith(m) for m in self.methods):
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failing method must not stop the sweep
            self.rows.append(dict(self.base, method=method,
                                  status=f"error: {type(e).__name__}: {e}",
                                  traceback=traceback.format_exc(limit=4)))
            if self.device == "cuda":
                torch.cuda.synchronize()

    # ---------------------------------------------------------------- methods
    def ours(self, densities, prior_weight):
        """dash@<d> over random selections, dash-dense over every block."""
        for d in densities:
            k = max(1, min(self.n, round(d * self.n)))
            name = f"dash@{d:g}"

            def _sparse(d=d, k=k, name=name):
                self.random_selection(k)
                ms = self.bench(self.decode(prior_weight))
                self.record(name, ms, self.selected_kv_bytes(), density=k / self.n,
                            num_splits=self.ns, prior_weight=prior_weight)
            self.guarded(name, _sparse)

        def _dense():
            fill_dense_selection(block_table=self.bt, seq_lens=self.seq_lens,
                                 num_kv_heads=self.Hk, block_size=self.B,
                                 out_block_ids=self.ids, out_log_prior=self.lp,
                                 out_counts=self.counts)
            ms = self.bench(self.decode(0.0))
            self.record("dash-dense", ms, self.selected_kv_bytes(), density=1.0,
                        num_splits=self.ns, prior_weight=0.0)
        self.guarded("dash-dense", _dense)

    def selection(self, select_fn, densities, prior_weight):
        """select@<d>: the hook alone; dash+select@<d>: the hook, then our decode."""
        for d in densities:
            def _sel(d=d):
                def sel():
                    select_fn(q=self.q, key_cache=self.k_view, value_cache=self.v_view,
                              block_table=self.bt, seq_lens=self.seq_lens, block_size=self.B,
                              density=d, out_block_ids=self.ids, out_log_prior=self.lp,
                              out_counts=self.counts)
                ms_sel = self.bench(sel)
                sel()
                kvb = self.selected_kv_bytes()
                self.record(f"select@{d:g}", ms_sel, 0)
                dec = self.decode(prior_weight)

                def both():
                    sel()
                    dec()
                ms = self.bench(both)
                dens = kvb / max(self.dense_kv_bytes, 1)
                self.record(f"dash+select@{d:g}", ms, kvb, density=dens, num_splits=self.ns,
                            prior_weight=prior_weight)
            self.guarded(f"select@{d:g}", _sel)

    def dense_views(self):
        """K, V as [batch, Hk, ctx, D] views of the cache (identity block table)."""
        batch, n, Hk, B, D, ctx = self.batch, self.n, self.Hk, self.B, self.D, self.ctx
        if self.layout == "nhd":
            kk = self.kc.view(batch, n * B, Hk, D)[:, :ctx].transpose(1, 2)
            vv = self.vc.view(batch, n * B, Hk, D)[:, :ctx].transpose(1, 2)
            return kk, vv
        kk = self.kc.view(batch, n, Hk, B, D).permute(0, 2, 1, 3, 4).reshape(batch, Hk, n * B, D)
        vv = self.vc.view(batch, n, Hk, B, D).permute(0, 2, 1, 3, 4).reshape(batch, Hk, n * B, D)
        return kk[:, :, :ctx], vv[:, :, :ctx]

    def sdpa(self):
        """torch SDPA decode through the cuDNN and flash backends (GPU only)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kk, vv = self.dense_views()
        q4 = self.q[:, :, None, :]
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
                    if 2 * self.cache_bytes > 0.85 * torch.cuda.mem_get_info()[0]:
                        raise
                    note = "contiguous copy of K/V, enable_gqa"
                    f = attempt(kk.contiguous(), vv.contiguous())
                self.record(name, self.bench(f), self.dense_kv_bytes, density=1.0, note=note)
            self.guarded(name, _sdpa)

    def fa3(self, fa3, fa3_reason, densities):
        """vLLM's FA3: paged dense decode (NHD), or over compacted tables (head-major)."""
        if fa3 is None:
            if not self.methods or any(m.startswith("fa3") for m in self.methods):
                self.rows.append(dict(self.base, method="fa3-paged", status=fa3_reason))
            return
        scale = 1.0 / math.sqrt(self.D)
        if self.layout == "nhd":
            def _fa3():
                cu = torch.arange(self.batch + 1, device=self.device, dtype=torch.int32)
                o = torch.empty_like(self.q)

                def f():
                    fa3(q=self.q, k=self.kc, v=self.vc, max_seqlen_q=1, cu_seqlens_q=cu,
                        max_seqlen_k=self.ctx, seqused_k=self.seq_lens, softmax_scale=scale,
                        causal=True, block_table=self.bt, out=o, fa_version=3)
                self.record("fa3-paged", self.bench(f), self.dense_kv_bytes, density=1.0)
            self.guarded("fa3-paged", _fa3)
            return
        # head-major cache: page (b, h) = b * Hk + h; one pseudo-sequence per (seq, KV head)
        for d in densities:
            k = max(1, min(self.n, round(d * self.n)))
            self.guarded(f"fa3-sparse@{d:g}", lambda d=d, k=k: self._fa3_sparse(fa3, d, k))

    def _fa3_sparse(self, fa3, d, k):
        self.random_selection(k)
        rows = self.batch * self.Hk
        table = torch.empty(rows, self.ids.shape[2], device=self.device, dtype=torch.int32)
        used = torch.empty(rows, device=self.device, dtype=torch.int32)
        compact_head_major_tables(block_ids=self.ids, counts=self.counts,
                                  seq_lens=self.seq_lens, block_size=self.B,
                                  out_block_table=table, out_seqused_k=used)
        qq = queries_as_groups(self.q, self.Hk)
        cu = torch.arange(rows + 1, device=self.device, dtype=torch.int32)
        o = torch.empty_like(qq)
        kp, vp = head_major_page_view(self.kc), head_major_page_view(self.vc)

        def f():
            fa3(q=qq, k=kp, v=vp, max_seqlen_q=1, cu_seqlens_q=cu, max_seqlen_k=k * self.B,
                seqused_k=used, softmax_scale=1.0 / math.sqrt(self.D), causal=True,
                block_table=table, out=o, fa_version=3)
        self.record(f"fa3-sparse@{d:g}", self.bench(f), self.selected_kv_bytes(),
                    density=k / self.n, prior_weight=0.0)


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
    p.add_argument("--write", action="store_true",
                   help="time the fused cache write per summary kind instead of decode")
    p.add_argument("--write-chunk", type=int, default=2048,
                   help="tokens of the --write prefill step (shared out over the batch)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--quick", action="store_true", help="contexts 4K,32K; batches 1,8")
    p.add_argument("--out", default="bench_kernels.json", help="JSON path (PNG beside it)")
    p.add_argument("--png", default=None, help="PNG path (default: --out with .png)")
    return p.parse_args(argv)


def print_table(rows):
    hdr = f"{'heads':>6} {'batch':>5} {'context':>8} {'method':<24} {'lat_us':>9} " \
          f"{'MB read':>9} {'TB/s':>6} {'%peak':>6}  status"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r.get("status") == "ok":
            print(f"{r['heads']:>6} {r['batch']:>5} {r['context']:>8} {r['method']:<24} "
                  f"{r['latency_us']:>9.1f} {r['bytes'] / 1e6:>9.1f} "
                  f"{(r['tb_per_s'] or 0):>6.2f} "
                  f"{(r['pct_peak'] if r['pct_peak'] is not None else float('nan')):>6.1f}  ok")
        else:
            print(f"{r['heads']:>6} {r['batch']:>5} {r['context']:>8} {r['method']:<24} "
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
                if args.write:
                    base = dict(heads=f"{Hq}/{Hk}", batch=batch, context=ctx,
                                head_size=args.head_size, block_size=args.block_size,
                                dtype=args.dtype, layout=args.layout)
                    rows += write_rows(Hk=Hk, batch=batch, ctx=ctx, D=args.head_size,
                                       B=args.block_size, dtype=DTYPES[args.dtype],
                                       layout=args.layout, warmup=args.warmup, rep=args.rep,
                                       device=device, base=base, methods=methods,
                                       chunk=args.write_chunk, peak=peak)
                else:
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
    print_ratios(rows)
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    png_status = write_png(rows, png)
    _write_json(args, rows, name, peak, fa3, fa3_reason, png_status)
    print(f"JSON: {args.out}; PNG {png_status}")
    return rows


def _write_json(args, rows, name, peak, fa3, fa3_reason, png_status):
    """Rewritten after every configuration, so a run cut short keeps what it measured."""
    meta = dict(gpu=name, hbm_peak_tb_per_s=peak, **common.versions(),
                fa3="available" if fa3 else fa3_reason, png=png_status,
                bytes_model=("key/value read and written to the cache + per touched block its "
                             "keys re-read and its summary written" if args.write else
                             "K+V of the attended tokens + q + out (metadata, workspace "
                             "excluded)"),
                args={k: v for k, v in vars(args).items()})
    common.write_json(args.out, dict(meta=meta, rows=rows))


if __name__ == "__main__":
    run()
