"""End-to-end decode benchmark: DASH vs vLLM's dense backends inside vLLM 0.26 (GPU).

A dummy-weight Llama-3-8B-shaped model (load_format "dummy"; config from --model, e.g. the
device recipe's make_dummy_llama.py), prompts of random token ids. For each method and each
(context, batch): submit `batch` requests of `context` tokens at once with one output token
(prefill), then the same prompts with --gen tokens (prefix caching makes their prefill a cache
hit, so all decode together), stepping the engine and timestamping every step on the host.
vLLM's dummy weights are replaced by a standard random init (random_init). Reported:
  prefill_s     submit -> every request has its first token (first pass)
  itl_ms        median (and mean) step time while all requests decode together
  decode_tok_s  batch * 1000 / itl_ms median
Methods: FLASH_ATTN, TRITON_ATTN (32K batch 1 only: its 128K prefill is very slow), and
DASH (CUSTOM) at two densities (score_scale values; the measured density is recorded from the
backend's statistics). Each method runs in its own child process (vllm_dash.serving.child:
one engine, CUDA graphs on; the rows of a child that fails or times out are kept).
Writes JSON (--out), a table, and a PNG (decode tok/s and ITL vs context) next to the JSON.
Run inside a private network namespace (vLLM 0.26 listens on all interfaces).

  python benchmarks/bench_e2e.py --model DIR --out benchmarks/results/e2e-h100.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

from common import gpu_name, write_json
from vllm_dash.serving import child as child_runner

# Two DASH densities. With dummy weights the standardized block scores are close to
# Gaussian, and entmax's support shrinks with the number of blocks: score_scale 0.35 gives
# ~25% at 128K (~45% at 32K), 0.6 gives ~25% at 32K (~14% at 128K); the measured density is
# recorded per row. dense_below 8192: sequences shorter than 8K tokens attend densely.
# min_blocks 0 (no per-head floor; the shipped default is 4): the records in
# benchmarks/results ran with it, and the density is set by score_scale alone.
_SPEED = {"dense_below": 8192, "stats_interval": 8, "min_blocks": 0,
          "score_norm": "standardize", "prior_weight": 0.0}
DEFAULT_METHODS = {
    "FLASH_ATTN": {"backend": "FLASH_ATTN"},
    "TRITON_ATTN": {"backend": "TRITON_ATTN", "contexts": [32768], "batches": ["1"]},
    "DASH@0.35": {"backend": "CUSTOM", "dash": {"score_scale": 0.35, **_SPEED}},
    "DASH@0.6": {"backend": "CUSTOM", "dash": {"score_scale": 0.6, **_SPEED}},
}
MAX_NUM_SEQS = 8


def measure(engine, SamplingParams, batch: int, ctx: int, gen: int, seed: int, vocab: int) -> dict:
    """Prefill: the batch's prompts with one output token each (timed until all are done).
    Decode: the same prompts again with `gen` tokens; prefix caching turns their prefill into
    a cache hit, so every request decodes together from the first step; the median step time
    over the steps where all requests decode is the inter-token latency."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(ctx)] for _ in range(batch)]

    def run(tag: str, max_tokens: int):
        sp = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                            temperature=0.0, detokenize=False)
        ids = [f"{tag}-{seed}-{i}" for i in range(batch)]
        t0 = time.perf_counter()
        for rid, p in zip(ids, prompts):
            engine.add_request(rid, {"prompt_token_ids": p}, sp)
        first, done, steps = {}, {}, []
        ntok = dict.fromkeys(ids, 0)
        while engine.has_unfinished_requests():
            outs = engine.step()
            t = time.perf_counter() - t0
            for o in outs:
                ntok[o.request_id] = len(o.outputs[0].token_ids)
                if ntok[o.request_id] and o.request_id not in first:
                    first[o.request_id] = t
                if o.finished:
                    done[o.request_id] = t
            steps.append((t, dict(ntok)))
        return first, done, steps

    first, _, _ = run("prefill", 1)
    prefill_s = max(first.values())
    first, done, steps = run("decode", gen)
    t_first, t_end = max(first.values()), min(done.values())
    lead = min(done, key=done.get)
    window = [(t, d[lead]) for t, d in steps if t_first <= t <= t_end]
    dts = [(tb - ta) / (kb - ka) for (ta, ka), (tb, kb) in zip(window, window[1:]) if kb > ka]
    if not dts:
        return {"prefill_s": round(prefill_s, 3), "error": "no all-decoding window"}
    itl = statistics.median(dts) * 1e3
    return {"prefill_s": round(prefill_s, 3), "itl_ms": round(itl, 3),
            "itl_ms_mean": round(statistics.mean(dts) * 1e3, 3),
            "decode_tok_s": round(batch * 1e3 / itl, 1), "decode_steps": len(dts),
            "decode_first_token_s": round(t_first, 3)}


def random_init(model) -> int:
    """Replace vLLM's dummy weights (uniform +-1e-3, which make every attention score ~0, so
    no selection can be sparse) by a standard random init: norms 1, matrices N(0, 1/fan_in),
    embeddings N(0, 1). In place, so captured CUDA graphs stay valid."""
    import torch
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.normal_(0.0, 1.0)
            n += p.numel()
    return n


def child(spec: dict) -> None:
    """The child process: one engine for ``spec["method"]``, a row per (context, batch)."""
    from vllm import EngineArgs, LLMEngine, SamplingParams
    args, name = argparse.Namespace(**spec["args"]), spec["method"]
    spec = DEFAULT_METHODS[name]
    kw = dict(model=args.model, load_format="dummy", dtype="bfloat16",
              max_model_len=args.max_model_len, max_num_seqs=MAX_NUM_SEQS,
              gpu_memory_utilization=args.gpu_memory_utilization, seed=0,
              enable_prefix_caching=True, attention_backend=spec["backend"],
              compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]})
    if "dash" in spec:
        kw["additional_config"] = {"dash": spec["dash"]}
    t0 = time.time()
    engine = LLMEngine.from_engine_args(EngineArgs(**kw))
    engine.apply_model(random_init)
    cache = engine.vllm_config.cache_config
    kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
    rows = [{"method": name, "init_s": round(time.time() - t0, 1), "kv_cache_tokens": kv_tokens}]
    child_runner.emit(rows[0])
    vocab = 32000                     # random ids below every Llama vocabulary size
    for ctx in spec.get("contexts", args.contexts):
        ctx = min(ctx, args.max_model_len - args.gen)       # 128K prompt + 128 new tokens
        per_seq = -(-(ctx + args.gen) // cache.block_size) * cache.block_size
        fits = min(MAX_NUM_SEQS, kv_tokens // per_seq) if kv_tokens else MAX_NUM_SEQS
        todo = []
        for b in spec.get("batches", args.batches):
            b = fits if b == "max" else int(b)
            if b > fits:
                child_runner.emit({"method": name, "context": ctx, "batch": b,
                                   "skipped": f"KV cache holds {fits} sequences of {ctx} tokens"})
            elif b >= 1 and b not in todo:
                todo.append(b)
        for batch in todo:
            row = {"method": name, "context": ctx, "batch": batch, "max_batch": batch == fits}
            try:
                row.update(measure(engine, SamplingParams, batch, ctx, args.gen, ctx * 100 + batch,
                                   vocab))
            except Exception as e:                       # e.g. KV cache too small
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            if "dash" in spec:
                from vllm_dash.stats import STATS
                snap = STATS.snapshot()
                STATS.reset()
                if snap:
                    row["density"] = sum(v["density"] for v in snap.values()) / len(snap)
            child_runner.emit(row)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="config-only Llama dir (dummy weights)")
    ap.add_argument("--out", default="e2e.json")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--batches", nargs="+", default=["1", "8", "max"],
                    help="batch sizes; 'max' = the most sequences of the context the KV cache "
                         f"holds (at most {MAX_NUM_SEQS})")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=131072,
                    help="a context that does not fit with --gen tokens is cut to "
                         "max_model_len - gen")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--merge", nargs="+", default=None,
                    help="combine earlier --out JSON files (rows of later files win) into --out")
    args = ap.parse_args()
    if args.merge:
        finish(merge(args.merge), args)
        return
    rows = []
    spec_args = {k: getattr(args, k) for k in ("model", "gen", "max_model_len",
                                               "gpu_memory_utilization", "contexts", "batches")}
    for name in args.methods.split(","):
        res = child_runner.run([sys.executable, os.path.abspath(__file__), "--child"],
                               {"method": name, "args": spec_args}, timeout=args.timeout,
                               env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
        rows += res.rows
        if not res.rows or not res.ok:
            timed_out = (res.error or "").startswith("timeout")
            rows.append({"method": name, "error": res.error if timed_out else res.log_tail(2000)})
        for r in rows:
            if r.get("method") == name:
                print(json.dumps(r), flush=True)
    report = {"gpu": gpu_name(None),
              "args": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
              "methods": {m: DEFAULT_METHODS[m] for m in args.methods.split(",")}, "rows": rows}
    finish(report, args)


def merge(paths) -> dict:
    """One report from earlier --out files (rows of later files win); refuses mixed GPUs."""
    merged, gpu, sources = {}, None, []
    for path in paths:
        with open(path) as f:
            rep = json.load(f)
        if gpu and rep.get("gpu") and rep["gpu"] != gpu:
            raise SystemExit(f"--merge: {path} ran on {rep['gpu']}, not {gpu}: only runs "
                             "on one GPU model can share a table")
        gpu = gpu or rep.get("gpu")
        # a merged file keeps its own sources; a run file becomes one source
        sources += rep.get("sources") or [{"file": os.path.basename(path),
                                           "args": rep.get("args"),
                                           "methods": rep.get("methods")}]
        for r in rep["rows"]:
            merged[(r["method"], r.get("context"), r.get("batch"))] = r
    return {"gpu": gpu, "sources": sources, "rows": list(merged.values())}


def table(rows) -> str:
    """Decode tok/s, ITL and prefill per (context, batch), with the ratio to FLASH_ATTN."""
    base = {(r["context"], r["batch"]): r for r in rows
            if r.get("method") == "FLASH_ATTN" and "itl_ms" in r}
    out = [f"{'method':<12} {'context':>8} {'batch':>5} {'prefill_s':>9} {'itl_ms':>8} "
           f"{'tok/s':>8} {'vs FA':>6} {'density':>8}"]
    for r in sorted((r for r in rows if "context" in r),
                    key=lambda r: (r["context"], r["batch"], r["method"])):
        if "itl_ms" not in r:
            out.append(f"{r['method']:<12} {r['context']:>8} {r['batch']:>5} "
                       f"{r.get('skipped') or r.get('error', '')[:60]}")
            continue
        b = base.get((r["context"], r["batch"]))
        ratio = f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}x" if b else "-"
        dens = f"{r['density']:.3f}" if "density" in r else "-"
        out.append(f"{r['method']:<12} {r['context']:>8} {r['batch']:>5} {r['prefill_s']:>9.2f} "
                   f"{r['itl_ms']:>8.2f} {r['decode_tok_s']:>8.1f} {ratio:>6} {dens:>8}")
    return "\n".join(out)


def finish(report: dict, args) -> None:
    rows = report["rows"]
    text = table(rows)
    print(f"GPU: {report['gpu']}\n{text}")
    report["table"] = text.splitlines()
    write_json(args.out, report)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        kinds = [("1", lambda r: r["batch"] == 1), ("8", lambda r: r["batch"] == 8),
                 ("max", lambda r: r.get("max_batch"))]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4))
        for ax, (label, pick) in zip(axes, kinds):
            for name in methods:
                pts = sorted((r["context"], r["decode_tok_s"]) for r in rows
                             if r.get("method") == name and "decode_tok_s" in r and pick(r))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set(title=f"batch {label} — {report['gpu']}", xlabel="context (tokens)",
                   ylabel="decode tok/s (higher is better)")
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=110)
    except Exception as e:
        print(f"PNG not written: {e!r}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:       # a method's engine (run by main through the runner)
        child_runner.main(child)
    else:
        main()
