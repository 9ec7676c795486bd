"""Several vLLM engines one after another in ONE child process (the import and vLLM's
start-up work are paid once): ``python summary_child.py SPEC.json``, one row per engine.

Spec: prompts, max_tokens, max_model_len, engines: a list of {name, model, llm_kwargs,
runtime (optional: DASH configs applied in turn through the harness's set_runtime_config,
the prompts generated again after each)}.
Row: {name, token_ids (per prompt), layers (DASH layers: resolved summary kind, the
DashParams' kind, pooling vectors or None, via LLM.apply_model), runtime (per runtime config:
{token_ids} or {error}), seconds} or, when the engine fails to start, {name, error}. Put
engines expected to fail last.
"""
import gc
import time

from vllm_dash.serving import child


def layer_info(model) -> list:
    """The summary settings each DASH layer of a worker's model ended up with."""
    from vllm_dash.backend import DashAttentionImpl
    out = []
    for m in model.modules():
        impl = getattr(m, "impl", None)
        if isinstance(impl, DashAttentionImpl):
            out.append({"layer": m.layer_name, "summary": impl.summary,
                        "params_summary": impl._params.summary if impl._params else None,
                        "pool": None if impl.pool is None else impl.pool.cpu().tolist()})
    return out


def run_engine(engine: dict, spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    t0 = time.time()
    kw = dict(dtype="float32", enforce_eager=True, seed=0, kv_cache_memory_bytes=64 << 20,
              max_model_len=spec["max_model_len"])
    kw.update(engine.get("llm_kwargs", {}))
    try:
        llm = LLM(model=engine["model"], **kw)
    except Exception as e:            # noqa: BLE001 - the start-up error is the result
        return {"name": engine["name"], "error": f"{type(e).__name__}: {e}"}
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    outs = llm.generate(spec["prompts"], params, use_tqdm=False)
    layers = []
    if kw.get("attention_backend") == "CUSTOM":
        layers = llm.apply_model(layer_info)[0]
    runtime = [apply_and_generate(llm, dash, spec["prompts"], params)
               for dash in engine.get("runtime", [])]
    row = {"name": engine["name"], "token_ids": [list(o.outputs[0].token_ids) for o in outs],
           "prompt_lens": [len(o.prompt_token_ids) for o in outs], "layers": layers,
           "runtime": runtime, "seconds": round(time.time() - t0, 1)}
    del llm, outs
    gc.collect()
    return row


def apply_and_generate(llm, dash: dict, prompts, params) -> dict:
    """Switch every DASH layer to ``dash`` as the accuracy harness does, then generate."""
    from vllm_dash.eval.engine import set_runtime_config
    try:
        llm.apply_model(lambda model: set_runtime_config(model, dash))
    except Exception as e:            # noqa: BLE001 - a refused change is the result
        return {"error": f"{type(e).__name__}: {e}"}
    outs = llm.generate(prompts, params, use_tqdm=False)
    return {"token_ids": [list(o.outputs[0].token_ids) for o in outs]}


def run(spec: dict) -> None:
    for engine in spec["engines"]:
        child.emit(run_engine(engine, spec))


if __name__ == "__main__":
    child.main(run)
