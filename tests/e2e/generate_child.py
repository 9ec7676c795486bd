"""Offline vLLM generation on a spec, run by e2e_helpers.run_vllm as a child process
(vllm_dash.serving.child): ``python generate_child.py SPEC.json``; one result row.

Spec: model, max_model_len, max_tokens, ignore_eos, llm_kwargs (more LLM(...) arguments),
prompts or rounds (lists of prompts run one after another), chats (message lists), and
dash_stats (add the backend's statistics snapshot). The __main__ guard matters: vLLM may
spawn processes that re-import the script.
"""
import time

from vllm_dash.serving import child


def generate(spec: dict) -> dict:
    t0 = time.time()
    from vllm import LLM, SamplingParams
    t1 = time.time()
    kw = dict(dtype="bfloat16", enforce_eager=True, seed=0)
    kw.update(spec.get("llm_kwargs", {}))
    llm = LLM(model=spec["model"], max_model_len=spec["max_model_len"], **kw)
    t2 = time.time()
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0,
                            ignore_eos=spec.get("ignore_eos", False))
    outs = []
    for prompts in spec.get("rounds", [spec.get("prompts", [])]):
        outs += llm.generate(prompts, params, use_tqdm=False)
    chats = [llm.chat(m, params)[0] for m in spec.get("chats", [])]
    t3 = time.time()
    stats = None
    if spec.get("dash_stats"):
        from vllm_dash.stats import STATS
        stats = STATS.snapshot()
    return {
        "outputs": [{"prompt_len": len(o.prompt_token_ids), "text": o.outputs[0].text,
                     "token_ids": list(o.outputs[0].token_ids)} for o in [*outs, *chats]],
        "seconds": {"import": t1 - t0, "init": t2 - t1, "generate": t3 - t2},
        "dash_stats": stats,
    }


if __name__ == "__main__":
    child.main(generate)
