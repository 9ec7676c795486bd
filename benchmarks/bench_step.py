"""The attention part of one decode step, every layer, in one CUDA graph: DASH vs vLLM's FA3.

bench_kernels.py times one attention call; bench_e2e.py times whole vLLM steps. This sits in
between: per layer, what the two backends launch in a captured decode step, over L layers
with their own KV caches (no L2 reuse between layers, as in a model), on one GPU:

  fa3          vLLM's reshape_and_cache_flash (cache write) + FA3 paged decode
  fa3-attn     the FA3 call alone
  dash         write_kv_and_summaries + select_blocks_paged (+ statistics counts) +
               sparse_decode, as DashAttentionImpl runs them (page layout with the summaries
               in the page padding, capacities from --max-model-len like a real engine)
  dash-write   / dash-select / dash-decode: each part alone

Sequences shorter than --dense-below skip selection (DASH's dense path), so at 4K the
"dash" row is the cost of running the DASH machinery densely. Reports microseconds per
layer, and DASH / FA3. Writes a table to stdout and JSON to --out.

  python benchmarks/bench_step.py --contexts 4096,32768 --batches 1,8 --out step.json
"""
from __future__ import annotations

import argparse
import math
import os

import torch

import common
from common import bench_ms, fa3_module, gpu_name, ints

common.interpret_without_gpu()             # before the kernels import Triton
from vllm_dash import layout  # noqa: E402
from vllm_dash.kernels.decode import DecodeWorkspace, choose_num_splits, sparse_decode  # noqa: E402
from vllm_dash.kernels.params import DashParams  # noqa: E402
from vllm_dash.kernels.select import SelectWorkspace, select_blocks_paged  # noqa: E402
from vllm_dash.kernels.summaries import write_kv_and_summaries  # noqa: E402


def dash_caches(L, nb, Hk, B, D, dtype, device):
    """Per layer: (key_cache, value_cache, summaries) views of one padded page per block,
    the layout of vllm_dash's KV cache ([K | V | fp32 summaries] per block), made with
    vllm_dash.layout's own views."""
    esize = torch.tensor([], dtype=dtype).element_size()
    kv_elems = 2 * Hk * B * D
    page = kv_elems + layout.summary_page_bytes(Hk, D) // esize
    out = []
    for _ in range(L):
        raw = torch.randn(nb * page, device=device).to(dtype)
        kv = raw.as_strided((nb, 2, Hk, B, D), (page, Hk * B * D, B * D, D, 1))
        summ = layout.summary_view(kv, Hk, D)
        summ.copy_(torch.randn(summ.shape, device=device))
        out.append((*layout.kv_views(kv), summ))
    return out


def run_config(*, ctx, batch, L, Hq, Hk, D, B, dtype, max_model_len, dense_below,
               score_scale, fa3, device, warmup, rep):
    g = torch.Generator(device=device).manual_seed(0)
    n = -(-ctx // B)
    cap = -(-max_model_len // B)
    nb = batch * n + 8
    bt = torch.zeros(batch, cap, dtype=torch.int32, device=device)
    bt[:, :n] = torch.randperm(nb, device=device, generator=g)[:batch * n].view(batch, n).int()
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    slots = (bt[:, (ctx - 1) // B].long() * B + (ctx - 1) % B)
    qs = [torch.randn(batch, Hq, D, device=device, dtype=dtype) for _ in range(L)]
    ks = [torch.randn(batch, Hk, D, device=device, dtype=dtype) for _ in range(L)]
    vs = [torch.randn(batch, Hk, D, device=device, dtype=dtype) for _ in range(L)]
    out = torch.empty(batch, Hq, D, device=device, dtype=dtype)
    scale = 1.0 / math.sqrt(D)
    rows = []
    base = dict(context=ctx, batch=batch, layers=L, heads=f"{Hq}/{Hk}", head_size=D,
                block_size=B, max_model_len=max_model_len, dense_below=dense_below,
                score_scale=score_scale)

    def record(method, fn):
        ms = bench_ms(fn, warmup, rep)
        rows.append(dict(base, method=method, us_per_layer=ms * 1e3 / L, mode=bench_ms.last_mode))

    # ---- DASH
    caches = dash_caches(L, nb, Hk, B, D, dtype, device)
    sws = SelectWorkspace(batch, Hq, Hk, cap, device=device)
    ns = choose_num_splits(num_seqs=batch, num_kv_heads=Hk, max_blocks_per_seq=cap,
                           block_size=B, device=device)
    dws = DecodeWorkspace(batch, Hq, D, ns, device=device)
    ids = torch.zeros(batch, Hk, cap, dtype=torch.int32, device=device)
    lp = torch.zeros(batch, Hk, cap, dtype=torch.float32, device=device)
    cnt = torch.zeros(batch, Hk, dtype=torch.int32, device=device)
    stats = torch.zeros(L, batch, Hk, dtype=torch.int32, device=device)
    params = DashParams(score_scale=score_scale, dense_below=dense_below, sink_blocks=1,
                        local_blocks=1)
    sel_kw = dict(block_size=B, scale=scale, params=params, workspace=sws)

    def dash_write(i):
        kc, vc, sm = caches[i]
        write_kv_and_summaries(key=ks[i], value=vs[i], key_cache=kc, value_cache=vc,
                               summaries=sm, slot_mapping=slots)

    def dash_select(i):
        select_blocks_paged(q=qs[i], summaries=caches[i][2], block_table=bt, seq_lens=seq_lens,
                            out_block_ids=ids, out_log_prior=lp, out_counts=cnt,
                            out_counts_copy=stats[i], **sel_kw)

    def dash_decode(i):
        kc, vc, _ = caches[i]
        sparse_decode(q=qs[i], key_cache=kc, value_cache=vc, block_ids=ids, log_prior=lp,
                      counts=cnt, seq_lens=seq_lens, out=out, params=params, block_size=B,
                      scale=scale, num_splits=ns, workspace=dws)

    def all_layers(*parts):
        def f():
            for i in range(L):
                for p in parts:
                    p(i)
        return f

    record("dash", all_layers(dash_write, dash_select, dash_decode))
    record("dash-write", all_layers(dash_write))
    record("dash-select", all_layers(dash_select))
    record("dash-decode", all_layers(dash_decode))
    density = float(cnt.sum()) / (batch * Hk * n)
    for r in rows:
        r["num_splits"], r["density"] = ns, density
    del caches
    # ---- FA3 (vLLM's layout [2, nb, B, Hk, D] per layer)
    if fa3 is not None:
        from vllm import _custom_ops as ops
        fa_caches = [torch.randn(2, nb, B, Hk, D, device=device).to(dtype) for _ in range(L)]
        cu = torch.arange(batch + 1, device=device, dtype=torch.int32)
        one = torch.ones((), device=device, dtype=torch.float32)

        def fa_write(i):
            ops.reshape_and_cache_flash(ks[i], vs[i], fa_caches[i][0], fa_caches[i][1], slots,
                                        "auto", one, one)

        def fa_attn(i):
            fa3(q=qs[i], k=fa_caches[i][0], v=fa_caches[i][1], max_seqlen_q=1, cu_seqlens_q=cu,
                max_seqlen_k=max_model_len, seqused_k=seq_lens, softmax_scale=scale,
                causal=True, block_table=bt, out=out, fa_version=3)

        record("fa3", all_layers(fa_write, fa_attn))
        record("fa3-attn", all_layers(fa_attn))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=ints, default=[4096, 32768])
    p.add_argument("--batches", type=ints, default=[1, 8])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", default="32/8", help="Hq/Hk")
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=131072,
                   help="capacity of the block table and workspaces, as in a vLLM engine")
    p.add_argument("--dense-below", type=int, default=8192)
    p.add_argument("--score-scale", type=float, default=0.35)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rep", type=int, default=50)
    p.add_argument("--out", default="bench_step.json")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    fa3, fa3_reason = fa3_module() if device == "cuda" else (None, "no GPU")
    Hq, Hk = (int(x) for x in a.heads.split("/"))
    rows = []
    for ctx in a.contexts:
        for batch in a.batches:
            rows += run_config(ctx=ctx, batch=batch, L=a.layers, Hq=Hq, Hk=Hk, D=a.head_size,
                               B=a.block_size, dtype=dtype, max_model_len=a.max_model_len,
                               dense_below=a.dense_below, score_scale=a.score_scale, fa3=fa3,
                               device=device, warmup=a.warmup, rep=a.rep)
    name = gpu_name()
    print(f"GPU: {name}; {a.layers} layers, heads {a.heads}, D={a.head_size}, "
          f"B={a.block_size}, capacity {a.max_model_len} tokens, dense_below {a.dense_below}"
          + ("" if fa3 else f"; FA3 {fa3_reason}"))
    print(f"{'context':>8} {'batch':>5} {'method':<12} {'us/layer':>9} {'vs fa3':>7} "
          f"{'density':>7}")
    for r in rows:
        fa = next((x["us_per_layer"] for x in rows if x["method"] == "fa3"
                   and x["context"] == r["context"] and x["batch"] == r["batch"]), None)
        ratio = f"{r['us_per_layer'] / fa:.2f}x" if fa else "-"
        print(f"{r['context']:>8} {r['batch']:>5} {r['method']:<12} {r['us_per_layer']:>9.2f} "
              f"{ratio:>7} {r.get('density', float('nan')):>7.3f}")
    common.write_json(a.out, {"gpu": name, **common.versions(),
                              "args": dict(vars(a), out=os.path.basename(a.out)),
                              "fa3": fa3_reason or "available", "rows": rows})


if __name__ == "__main__":
    main()
