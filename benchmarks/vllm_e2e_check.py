"""DASH inside real vLLM 0.26, against vLLM's own backend, on one machine (GPU or CPU).

For each engine (its own subprocess, so memory is freed between them) it generates greedily
on prompts of several lengths and records the token ids; then it compares:
  * dense-equivalence: DASH with score_scale 0 (every block equally likely, so all selected)
    and prior_weight 0 must give the baseline's tokens;
  * sparse: DASH with a sparsity setting runs, reports its measured density (< 1).
GPU: baseline FLASH_ATTN, CUDA graphs on (enforce_eager False). CPU: baseline = vLLM's CPU
backend, eager. Writes JSON (--out). Run vLLM inside a private network namespace.

  python benchmarks/vllm_e2e_check.py --out e2e.json [--model DIR] [--device cuda|cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from common import gpu_name, write_json
from vllm_dash.serving import child

WORDS = ("the quick brown fox jumps over the lazy dog while seven wise owls count "
         "silver coins beside a quiet river under the old stone bridge").split()


def make_prompts(lengths):
    prompts = []
    for i, n in enumerate(lengths):
        words = [WORDS[(7 * j + 3 * i) % len(WORDS)] for j in range(n)]
        prompts.append(" ".join(words) + " . The secret word is")
    return prompts


def run_engine(args, backend: str, dash: dict | None) -> dict:
    """Child process: build one engine, generate; the result is the child's one row."""
    from vllm import LLM, SamplingParams
    kw = dict(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
              enforce_eager=args.device == "cpu", max_num_seqs=8,
              gpu_memory_utilization=0.5 if args.device == "cuda" else 0.3)
    if args.device == "cuda":
        # CUDA graphs for decode batches without torch.compile (shorter start-up)
        kw["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                    "cudagraph_capture_sizes": [1, 2, 4, 8]}
    else:
        kw["kv_cache_memory_bytes"] = 512 << 20
    if backend != "default":
        kw["attention_backend"] = backend
    if dash is not None:
        kw["additional_config"] = {"dash": dash}
    t0 = time.time()
    llm = LLM(**kw)
    t1 = time.time()
    prompts = make_prompts(args.lengths)
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                                ignore_eos=True))
    t2 = time.time()
    res = {"backend": backend, "dash": dash, "init_s": round(t1 - t0, 1),
           "generate_s": round(t2 - t1, 2),
           "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
           "tokens": [list(o.outputs[0].token_ids) for o in outs],
           "text": [o.outputs[0].text for o in outs]}
    if dash is not None:
        from vllm_dash.stats import STATS
        res["stats"] = STATS.snapshot()
    return res


def spawn(args, backend, dash):
    """One engine in a child process (vllm_dash.serving.child): its result, or an error."""
    spec = {"backend": backend, "dash": dash,
            "args": {k: getattr(args, k) for k in ("model", "device", "dtype", "max_model_len",
                                                   "max_tokens", "lengths")}}
    res = child.run([sys.executable, os.path.abspath(__file__), "--child"], spec,
                    timeout=args.timeout, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    if res.rows:
        return res.rows[0]
    err, tail = res.error or "exit 0 without a result", res.log_tail(3000)
    return {"backend": backend, "dash": dash, "returncode": res.returncode,
            "error": tail if err.startswith("exit") else f"{err}\n{tail}"}


def child_main(spec: dict) -> dict:
    """The child process: ``spec`` = the engine (backend, DASH config) and the arguments."""
    return run_engine(argparse.Namespace(**spec["args"]), spec["backend"], spec["dash"])


def prefix_match(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=False)
    ap.add_argument("--model", default=None, help="HF model dir (default: a generated tiny Llama)")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1200, 2500, 4100, 300])
    ap.add_argument("--sparse", default='{"score_scale": 3.0, "score_norm": "standardize"}')
    ap.add_argument("--timeout", type=float, default=420)
    args = ap.parse_args()
    if args.device is None:
        args.device = "cpu" if gpu_name(None) is None else "cuda"
    model_name = args.model
    if args.model is None:
        from vllm_dash.serving.models import make_tiny_llama
        model_name = "(generated tiny Llama: 2 layers, 8/2 heads, head_dim 128, random weights)"
        d = os.path.join(tempfile.mkdtemp(prefix="dash-e2e-"), "tiny")
        # head_dim 128 (FlashAttention-3 sizes), GQA 8/2, 2 layers, random weights
        args.model = str(make_tiny_llama(d, head_dim=128, num_layers=2, num_heads=8,
                                         num_kv_heads=2, hidden=256,
                                         max_position_embeddings=args.max_model_len))
    base = "FLASH_ATTN" if args.device == "cuda" else "default"
    sparse = json.loads(args.sparse)
    sparse.setdefault("stats_interval", 1)
    runs = {"baseline": spawn(args, base, None),
            "dash_dense": spawn(args, "CUSTOM",
                                {"score_scale": 0.0, "prior_weight": 0.0, "stats_interval": 1}),
            "dash_sparse": spawn(args, "CUSTOM", sparse)}
    report = {"device": args.device, "model": model_name, "lengths": args.lengths,
              "max_tokens": args.max_tokens, "runs": runs}
    if args.device == "cuda":
        report["gpu"] = gpu_name()
    ok = all("tokens" in r for r in runs.values())
    if ok:
        b = runs["baseline"]["tokens"]
        for name in ("dash_dense", "dash_sparse"):
            runs[name]["prefix_match"] = [prefix_match(x, y) for x, y in zip(b, runs[name]["tokens"])]
        report["dense_equivalent"] = runs["dash_dense"]["tokens"] == b
        dens = [v["density"] for v in runs["dash_sparse"].get("stats", {}).values()]
        report["sparse_density_per_layer"] = dens
        dens_dense = [v["density"] for v in runs["dash_dense"].get("stats", {}).values()]
        report["dense_density_per_layer"] = dens_dense
    report["ok"] = ok
    if args.out:
        write_json(args.out, report)
    summary = {k: report.get(k) for k in ("device", "gpu", "dense_equivalent",
                                          "sparse_density_per_layer", "dense_density_per_layer", "ok")}
    for name, r in runs.items():
        summary[name] = {k: r.get(k) for k in ("init_s", "generate_s", "prefix_match", "error")}
    print(json.dumps(summary, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:       # one engine (run by main through the runner)
        child.main(child_main)
    else:
        main()
