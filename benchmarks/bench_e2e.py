"""End-to-end decode benchmark: DASH vs vLLM's dense backends inside vLLM 0.26 (GPU).

A dummy-weight Llama-3-8B-shaped model (load_format "dummy"; config from --model, e.g. the
device recipe's make_dummy_llama.py), prompts of random token ids. For each method and each
(context, batch): submit `batch` requests of `context` tokens at once, step the engine and
timestamp every step on the host. Reported:
  prefill_s     submit -> every request has its first token
  itl_ms        median (and mean) step time while all requests decode together
  decode_tok_s  batch * 1000 / itl_ms median
Methods: FLASH_ATTN, TRITON_ATTN (32K only by default: its 128K prefill is very slow), and
DASH (CUSTOM) at two densities (score_scale values; the measured density is recorded from the
backend's statistics). Each method runs in its own subprocess (one engine, CUDA graphs on).
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
import subprocess
import sys
import time

DEFAULT_METHODS = {
    "FLASH_ATTN": {"backend": "FLASH_ATTN"},
    "TRITON_ATTN": {"backend": "TRITON_ATTN", "contexts": [32768]},
    "DASH@s1": {"backend": "CUSTOM", "dash": {"score_scale": 1.0, "stats_interval": 8}},
    "DASH@s2": {"backend": "CUSTOM", "dash": {"score_scale": 2.0, "stats_interval": 8}},
}


def measure(engine, SamplingParams, batch: int, ctx: int, gen: int, seed: int, vocab: int) -> dict:
    rng = random.Random(seed)
    sp = SamplingParams(max_tokens=gen, min_tokens=gen, ignore_eos=True, temperature=0.0,
                        detokenize=False)
    ids = [f"r{seed}-{batch}-{ctx}-{i}" for i in range(batch)]
    t0 = time.perf_counter()
    for rid in ids:
        engine.add_request(rid, {"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(ctx)]}, sp)
    first, done, steps = {}, {}, []          # steps: (t, tokens of the first request to finish)
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
    t_first, t_end = max(first.values()), min(done.values())
    lead = min(done, key=done.get)
    window = [(t, d[lead]) for t, d in steps if t_first <= t <= t_end]
    dts = [(tb - ta) / (kb - ka) for (ta, ka), (tb, kb) in zip(window, window[1:]) if kb > ka]
    if not dts:
        return {"error": "no all-decoding window"}
    itl = statistics.median(dts) * 1e3
    return {"prefill_s": round(t_first, 3), "itl_ms": round(itl, 3),
            "itl_ms_mean": round(statistics.mean(dts) * 1e3, 3),
            "decode_tok_s": round(batch * 1e3 / itl, 1), "decode_steps": len(dts)}


def child(args, name: str, spec: dict) -> None:
    from vllm import EngineArgs, LLMEngine, SamplingParams
    kw = dict(model=args.model, load_format="dummy", dtype="bfloat16",
              max_model_len=args.max_model_len, max_num_seqs=max(args.batches),
              gpu_memory_utilization=args.gpu_memory_utilization, seed=0,
              enable_prefix_caching=False, attention_backend=spec["backend"])
    if "dash" in spec:
        kw["additional_config"] = {"dash": spec["dash"]}
    t0 = time.time()
    engine = LLMEngine.from_engine_args(EngineArgs(**kw))
    rows = [{"method": name, "init_s": round(time.time() - t0, 1)}]
    vocab = 32000                     # random ids below every Llama vocabulary size
    for ctx in spec.get("contexts", args.contexts):
        for batch in args.batches:
            row = {"method": name, "context": ctx, "batch": batch}
            try:
                row.update(measure(engine, SamplingParams, batch, ctx, args.gen, 1, vocab))
            except Exception as e:                       # e.g. KV cache too small
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            if "dash" in spec:
                from vllm_dash.stats import STATS
                snap = STATS.snapshot()
                STATS.reset()
                if snap:
                    row["density"] = sum(v["density"] for v in snap.values()) / len(snap)
            print("E2E_ROW " + json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="config-only Llama dir (dummy weights)")
    ap.add_argument("--out", default="e2e.json")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=131072 + 256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args, args.child, DEFAULT_METHODS[args.child])
        return
    rows = []
    for name in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--model", args.model,
               "--gen", str(args.gen), "--max-model-len", str(args.max_model_len),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization),
               "--contexts", *map(str, args.contexts), "--batches", *map(str, args.batches)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                               env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0"))
            got = [json.loads(ln[8:]) for ln in p.stdout.splitlines() if ln.startswith("E2E_ROW ")]
            rows += got or [{"method": name, "error": p.stderr[-2000:]}]
        except subprocess.TimeoutExpired:
            rows.append({"method": name, "error": "timeout"})
        for r in rows:
            if r.get("method") == name:
                print(json.dumps(r), flush=True)
    import torch
    report = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "args": vars(args), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(args.batches), figsize=(6 * len(args.batches), 4))
        for ax, b in zip(list(axes) if len(args.batches) > 1 else [axes], args.batches):
            for name in args.methods.split(","):
                pts = sorted((r["context"], r["decode_tok_s"]) for r in rows
                             if r.get("method") == name and r.get("batch") == b and "decode_tok_s" in r)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set(title=f"batch {b} — {report['gpu']}", xlabel="context (tokens)",
                   ylabel="decode tok/s")
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=110)
    except Exception as e:
        print(f"PNG not written: {e!r}")


if __name__ == "__main__":
    main()
