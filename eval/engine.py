"""The harness's engine child: one vLLM engine answers every method's prompts.

Run by the harness through the child runner (vllm_dash.serving.child), never by hand::

    python -m vllm_dash.eval.engine SPEC.json

with the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so that the backend's
statistics and the config switch reach it. The spec says which engine ("dense": vLLM's
default backend; "dash": --attention-backend CUSTOM, eager), the model, the samples, the
methods and an optional deadline. Rows sent back, each as soon as it is known (a run cut
short keeps them):

  {"init_s": s}                          the engine is up
  {"calibration": {scale: [density per layer]}}   the calibration grid, when a method asks
  {"method", "length", "texts", "density", "density_per_layer", "dash", "seconds"}
                                         one per finished (method, length)
  {"skipped": [names]}                   DASH methods not started (deadline, no grid)

A DASH engine starts with the spec's ``engine_dash`` (the DASH config of --additional-config:
its summary kind and summary file are engine settings that every method of the engine
shares; default: methods.BASE). The spec engine "recall" starts no vLLM engine: it runs
:func:`vllm_dash.eval.recall.measure_recall` (transformers) one length at a time and sends
``{"recall": [rows]}`` per length.

DASH methods share the one eager engine: between methods, ``set_runtime_config`` switches the
DASH config of every attention layer in place; prefix caching keeps the prompts' KV, so a
method costs only its decode steps. The measured density comes from the backend's statistics
(stats_interval 1): selected tokens / context tokens over every decode step, per layer.
"""
from __future__ import annotations

import time
from typing import Optional

from vllm_dash.eval import methods as M
from vllm_dash.eval import tasks
from vllm_dash.serving import child


def set_runtime_config(model, dash: Optional[dict]) -> int:
    """Give every DASH attention layer of ``model`` (a worker's model, reached through
    ``LLM.apply_model``) the DASH config ``dash``; returns the number of layers changed.

    It exists for this harness only: one engine compares many settings. The config is
    validated like --additional-config and handed to each layer's
    ``DashAttentionImpl.set_config``; the memory-relevant engine settings (block size,
    capacities) do not change. Only for eager engines (enforce_eager=True): decode steps
    replayed from CUDA graphs keep the settings they were captured with.
    """
    from vllm_dash.backend import DashAttentionImpl
    from vllm_dash.config import DashConfig
    cfg = DashConfig.from_mapping(dash)
    impls = [m.impl for m in model.modules()
             if isinstance(getattr(m, "impl", None), DashAttentionImpl)]
    cfg.check_num_layers(len(impls))
    for impl in impls:
        impl.set_config(cfg)
    return len(impls)


def engine_kwargs(spec: dict, dash_engine: bool) -> dict:
    """vLLM LLM(...) arguments: eager, prefix caching, the KV cache sized by the spec."""
    kw = dict(model=spec["model"], max_model_len=spec["max_model_len"], seed=0,
              enforce_eager=True, enable_prefix_caching=True,
              max_num_seqs=spec.get("max_num_seqs", 64))
    if spec["device"] == "cuda":
        kw.update(dtype="bfloat16", gpu_memory_utilization=spec.get("gpu_memory_utilization",
                                                                    0.8))
    else:
        kw.update(dtype="float32", kv_cache_memory_bytes=int(spec.get("cpu_kv_cache_gib", 1)
                                                              * (1 << 30)),
                  max_num_batched_tokens=spec.get("max_num_batched_tokens", 2048))
    if dash_engine:
        kw.update(attention_backend="CUSTOM",
                  additional_config={"dash": dict(spec.get("engine_dash") or M.BASE)})
    return kw


def _generate(llm, samples: list[dict]) -> list[str]:
    from vllm import SamplingParams
    params = [SamplingParams(temperature=0.0, max_tokens=tasks.MAX_NEW_TOKENS[s["task"]])
              for s in samples]
    outs = llm.generate([s["prompt"] for s in samples], params, use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def _density(snap: dict) -> tuple[Optional[float], list]:
    if not snap:
        return None, []
    layers = [snap[k]["density"] for k in sorted(snap, key=int)]
    return sum(layers) / len(layers), layers


def _cells(samples: list[dict]):
    """(length, the samples of that length), shortest first."""
    for length in sorted({s["length"] for s in samples}):
        yield length, [s for s in samples if s["length"] == length]


def run_dense(llm, spec: dict) -> None:
    for length, cell in _cells(spec["samples"]):
        t = time.time()
        texts = _generate(llm, cell)
        child.emit({"method": "dense", "length": length, "texts": texts, "density": 1.0,
                    "density_per_layer": [], "seconds": round(time.time() - t, 2)})


def run_dash(llm, spec: dict) -> None:
    """The calibration grid (only when a method asks for it), then every method; methods
    outside, lengths inside: with a KV cache that holds every prompt (prefix caching), a
    method costs only its decode steps."""
    from vllm_dash.stats import STATS

    engine_keys = {k: v for k, v in (spec.get("engine_dash") or {}).items()
                   if k in M.ENGINE_KEYS}

    def use(dash: dict) -> None:
        # the engine samples on its start-up interval: the layers must record every step;
        # the summary kind and file are the engine's (the adapter refuses to switch them)
        dash = {**dash, **engine_keys, "stats_interval": M.BASE["stats_interval"]}
        llm.apply_model(lambda model: set_runtime_config(model, dash))

    deadline = spec.get("deadline")
    late = lambda: bool(deadline) and time.time() > deadline  # noqa: E731
    calib = spec.get("calib_samples") or []
    per_scale: dict = {}
    if calib and any("calibrate" in m for m in spec["methods"]) and not late():
        for s in spec.get("calib_grid", M.CALIB_GRID):
            use({**M.BASE, "score_scale": s})
            STATS.reset()
            _generate(llm, calib)
            per_scale[s] = _density(STATS.snapshot())[1]
        child.emit({"calibration": {str(k): v for k, v in per_scale.items()}})
    skipped = []
    for m in spec["methods"]:
        if late() or ("calibrate" in m and not per_scale):
            skipped.append(m["name"])
            continue
        dash = dict(m["dash"])
        if "calibrate" in m:
            dash["score_scale"] = M.calibrate_scales(per_scale, m["calibrate"])
        use(dash)
        for length, cell in _cells(spec["samples"]):
            STATS.reset()
            t = time.time()
            texts = _generate(llm, cell)
            mean, layers = _density(STATS.snapshot())
            child.emit({"method": m["name"], "length": length, "texts": texts,
                        "density": mean, "density_per_layer": layers, "dash": dash,
                        "seconds": round(time.time() - t, 2)})
    child.emit({"skipped": skipped})


def run_recall(spec: dict) -> None:
    """Attention recall of the spec's methods (no vLLM): one ``{"recall": rows}`` per length,
    so a run cut short keeps the lengths it finished."""
    from vllm_dash.eval.recall import measure_recall
    deadline = spec.get("deadline")
    for length in spec["lengths"]:
        if deadline and time.time() > deadline:
            break
        rows = measure_recall(spec["model"], spec["methods"], [length],
                              windows=spec["windows"], positions=spec["positions"],
                              seed=spec["seed"], device=spec["device"],
                              summary_file=spec.get("summary_file"), progress=True)
        child.emit({"recall": rows})


def run_engine(spec: dict) -> None:
    """Start the spec's engine, then answer its methods' prompts (rows: module docstring)."""
    if spec["engine"] == "recall":
        return run_recall(spec)
    from vllm import LLM
    dash_engine = spec["engine"] != "dense"
    t0 = time.time()
    llm = LLM(**engine_kwargs(spec, dash_engine))
    child.emit({"init_s": round(time.time() - t0, 1)})
    (run_dash if dash_engine else run_dense)(llm, spec)


if __name__ == "__main__":      # the child (vLLM may re-import this module in its processes)
    child.main(run_engine)
