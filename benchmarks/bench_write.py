"""The fused cache write (kernels/summaries.py) per summary kind: ``bench_kernels.py --write``.

For every (heads, batch, context) of the sweep and every summary kind (mean, minmax,
attn_pool) it times, with common.bench_ms (CUDA-graph replay, L2 flushed, median):
  write-<kind>-decode   one decode step: one new token per sequence, each at a random
                        offset of its sequence's last block (context length ``ctx``);
  write-<kind>-prefill  one prefill chunk of ``chunk`` tokens per step, shared out over the
                        batch's sequences, each run near the sequence's end, starting and
                        ending mid-block (the first block's earlier slots read from the cache).
Rows carry ``vs_mean``: the latency over the mean kind's in the same phase (the issue's
target: attn_pool <= 1.05). Bytes model: key/value read and written to the cache, plus per
touched block the keys re-read for its summary and the summary written.
"""
from __future__ import annotations

import torch

from common import bench_ms
from vllm_dash.kernels.params import SUMMARY_KINDS, summary_dim
from vllm_dash.kernels.summaries import write_kv_and_summaries

__all__ = ["write_rows"]


def _slots(bt, starts, stops, B):
    """Slots of tokens [starts[s], stops[s]) of every sequence, in order."""
    out = []
    for s, (a, b) in enumerate(zip(starts, stops)):
        pos = torch.arange(a, b, device=bt.device)
        out.append(bt[s, pos // B].long() * B + pos % B)
    return torch.cat(out)


def _phases(bt, batch, ctx, B, chunk, gen):
    """{phase: slot_mapping}: a decode step and a prefill chunk (see the docstring)."""
    dev = bt.device
    last = (ctx - 1) // B * B
    offs = torch.randint(0, min(B, ctx - last), (batch,), generator=gen, device=dev)
    decode = _slots(bt, (last + offs).tolist(), (last + offs + 1).tolist(), B)
    per = max(1, min(ctx, chunk // batch))
    start = max(0, ctx - per - B // 2)           # mid-block start and end
    prefill = _slots(bt, [start] * batch, [min(ctx, start + per)] * batch, B)
    return {"decode": decode, "prefill": prefill}


def write_rows(*, Hk, batch, ctx, D, B, dtype, layout, warmup, rep, device, base, methods,
               chunk=2048, peak=None):
    """The rows of one (heads, batch, context): every kind x phase (module docstring)."""
    gen = torch.Generator(device=device).manual_seed(ctx + batch)
    n = -(-ctx // B)
    nb = batch * n
    shape = (nb, B, Hk, D) if layout == "nhd" else (nb, Hk, B, D)
    kc = torch.randn(*shape, device=device, dtype=dtype, generator=gen)
    vc = torch.randn(*shape, device=device, dtype=dtype, generator=gen)
    if layout != "nhd":
        kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)
    bt = torch.randperm(nb, device=device, generator=gen).view(batch, n).to(torch.int32)
    pool = torch.randn(Hk, D, device=device, generator=gen)
    elem = torch.finfo(dtype).bits // 8
    rows = []
    for phase, sm in _phases(bt, batch, ctx, B, chunk, gen).items():
        T = sm.numel()
        key = torch.randn(T, Hk, D, device=device, dtype=dtype, generator=gen)
        val = torch.randn(T, Hk, D, device=device, dtype=dtype, generator=gen)
        touched = int(torch.unique(sm // B).numel())
        mean_us = None
        for kind in SUMMARY_KINDS:
            method = f"write-{kind}-{phase}"
            if methods and not any(method.startswith(m) for m in methods):
                continue
            ds = summary_dim(kind, D)
            summ = torch.zeros(nb, Hk, ds, device=device)
            kw = dict(key=key, value=val, key_cache=kc, value_cache=vc, summaries=summ,
                      slot_mapping=sm, summary=kind,
                      pool=pool if kind == "attn_pool" else None)
            us = bench_ms(lambda kw=kw: write_kv_and_summaries(**kw), warmup, rep) * 1e3
            mean_us = us if kind == "mean" else mean_us
            nbytes = 4 * T * Hk * D * elem + touched * Hk * (B * D * elem + 4 * ds)
            tbs = nbytes / (us * 1e-6) / 1e12
            rows.append(dict(base, method=method, status="ok", latency_us=us, bytes=nbytes,
                             tb_per_s=tbs, pct_peak=100 * tbs / peak if peak else None,
                             timing=bench_ms.last_mode, summary=kind, phase=phase,
                             tokens=T, touched_blocks=touched,
                             vs_mean=us / mean_us if mean_us else None))
            del summ
    return rows


def print_ratios(rows) -> None:
    """The write rows as kind x phase latencies with the ratio to mean."""
    write = [r for r in rows if r.get("phase") and r.get("status") == "ok"]
    if not write:
        return
    print(f"\n{'heads':>6} {'batch':>5} {'context':>8} {'phase':<8} {'kind':<10} "
          f"{'tokens':>6} {'lat_us':>9} {'vs mean':>8}")
    for r in write:
        ratio = f"{r['vs_mean']:.3f}" if r["vs_mean"] else "-"
        print(f"{r['heads']:>6} {r['batch']:>5} {r['context']:>8} {r['phase']:<8} "
              f"{r['summary']:<10} {r['tokens']:>6} {r['latency_us']:>9.1f} {ratio:>8}")
