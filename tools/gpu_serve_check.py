"""`vllm-dash serve` on the GPU machine: the same scenario as tests/e2e/test_serving.py
(tests/e2e/serving_scenario.py, a child process of vllm_dash.serving.child: OpenAI client,
streaming, 50 concurrent requests, bad requests, /metrics, SIGTERM), with CUDA graphs on. Run
inside a private network namespace (`unshare -n python3 serving/netns.py ...`).

    python3 tools/gpu_serve_check.py OUTDIR [MODEL_DIR [SERVED_NAME]]

No MODEL_DIR: a generated tiny Llama (head_dim 128). Writes OUTDIR/serve_<name>.json and
prints a one-screen summary; exit code 0 when every check the CPU test asserts holds."""
import json
import os
import sys
import tempfile

from vllm_dash.serving import child

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main() -> int:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="dash-serve-")
    if len(sys.argv) > 2:
        model, name = sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else "model")
    else:
        from vllm_dash.serving.models import make_tiny_llama
        model = str(make_tiny_llama(os.path.join(work, "tiny"), head_dim=128, num_layers=2,
                                    num_heads=8, num_kv_heads=2, hidden=256,
                                    max_position_embeddings=4096))
        name = "tiny"
    port = 8011
    spec = {
        "server_cmd": [sys.executable, "-m", "vllm_dash.serving.cli", "serve", model,
                       "--served-model-name", name, "--max-model-len", "4096",
                       "--port", str(port), "--gpu-memory-utilization", "0.3",
                       "--max-num-seqs", "64"],
        "port": port, "model": name, "max_model_len": 4096, "ready_timeout": 300,
        "log_file": os.path.join(out, f"serve_{name}.log"),
        "completion": {"prompt": "The capital of France is", "max_tokens": 8},
        "chat": {"content": "What is the capital of France?", "max_tokens": 12},
        "concurrent": {"n": 50, "max_tokens": [1, 3, 8, 16], "repeats": [1, 2, 5, 9]},
        "bad_requests": True, "metrics": True,
    }
    res = child.run([sys.executable, os.path.join(ROOT, "tests", "e2e", "serving_scenario.py")],
                    spec, timeout=600,
                    cwd=work)   # not the repo root: its vllm_dash/ would shadow the install
    if not res.rows:
        print(res.error, res.stdout[-3000:], res.stderr[-3000:])
        return 1
    r = res.rows[-1]
    with open(os.path.join(out, f"serve_{name}.json"), "w") as f:
        json.dump(r, f, indent=1)
    c = r.get("checks", {})
    o, cc, b, m = (c.get(k, {}) for k in ("openai", "concurrent", "bad_requests", "metrics"))
    bad_ok = all(b.get(k, {}).get("status") == 400 for k in (
        "prompt_too_long", "prompt_too_long_tokens", "max_tokens_negative",
        "temperature_negative", "chat_max_tokens_negative", "no_prompt"))
    vals = m.get("values", {})
    summary = {
        "ready_s": round(r.get("ready_s", -1), 1),
        "listeners": r.get("listeners"),
        "completion": o.get("completion", {}).get("text"),
        "stream_equal": (o.get("completion_stream", {}).get("text")
                         == o.get("completion", {}).get("text")),
        "chat": o.get("chat", {}).get("text"),
        "concurrent_ok": f'{cc.get("ok")}/{cc.get("n")}',
        "bad_requests_400": bad_ok, "unknown_model": b.get("unknown_model", {}).get("status"),
        "metrics_density_mean": vals.get("vllm_dash_decode_density_mean"),
        "metrics_samples": vals.get("vllm_dash_stats_samples_total"),
        "stop": r.get("stop"),
        "exceptions": [k for k, v in c.items() if isinstance(v, dict) and "exception" in v],
    }
    print(json.dumps(summary, indent=1))
    ok = (r.get("ready") and summary["stream_equal"] and cc.get("ok") == cc.get("n") == 50
          and bad_ok and not summary["exceptions"]
          and (summary["metrics_density_mean"] or 0) > 0
          and r.get("stop", {}).get("returncode") == 0 and not r.get("stop", {}).get("killed"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
