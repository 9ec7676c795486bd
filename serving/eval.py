"""Accuracy harness: `vllm-dash eval` and `vllm-dash calibrate`.

`eval` generates the offline long-context tasks of :mod:`eval_tasks` (passkey, RULER-style
needles, variable tracking) at several prompt lengths, answers them greedily through vLLM's
LLM API and scores them with RULER's string_match_all. Methods:

  dense        vLLM's default attention backend (its own engine)
  DASH / top-k every other method, in ONE eager DASH engine (--attention-backend CUSTOM):
               the DASH config is switched between methods with
               ``vllm_dash.backend.set_runtime_config`` (prefix caching keeps the prompts'
               KV, so a method costs only its decode steps). Top-k is the DASH config with
               ``selector: "topk"`` (forced blocks + each head's ``min_blocks`` best blocks,
               same summaries, same stage 2).

The measured density comes from the backend's statistics (stats_interval 1): selected
tokens / context tokens over every decode step, per layer, per (method, length) run.
Prefill is dense for every method (DASH selects blocks for decode tokens only); the first
answer token therefore comes from dense attention.

`calibrate` measures, on calibration prompts (their own seed), each layer's density at a
grid of score_scale values and interpolates the per-layer scale that gives a target
density; it writes ``{"score_scale": [...]}`` for the config key ``score_scale_file``.
The eval's "calib" methods use the same procedure.

Each engine runs in a child process (`python -m vllm_dash.serving.eval --child SPEC`) with
the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so that statistics and the config
switch reach it. Run the whole command inside a private network namespace (vLLM opens a
listener on all interfaces).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from vllm_dash.serving import eval_report, eval_tasks

DEFAULT_LENGTHS = (2048, 4096, 8192)
CHILD_RESULT = "VLLM_DASH_EVAL "
CHILD_ROW = "VLLM_DASH_EVAL_ROW "      # one per finished (method, length): a cut run keeps them

# --------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------
#: DASH settings shared by the sweeps unless a method overrides them (min_blocks 0: no floor
#: unless a method sets one; the record ran when 0 was DashConfig's default)
BASE = {"score_norm": "standardize", "prior_weight": 0.0, "sink_blocks": 1, "local_blocks": 1,
        "min_blocks": 0, "dense_below": 0, "stats_interval": 1}


def _m(name: str, family: str, **dash) -> dict:
    return {"name": name, "family": family, "dash": {**BASE, **dash}}


def default_methods() -> list[dict]:
    """The sweep of the record run: dense, top-k at several k, plain DASH (one global
    scale, raw scores: the naive form), DASH with standardized scores, DASH with a per-head
    floor (the lead candidate), prior variants, no sink/local, and per-layer calibration."""
    # in order of priority (a --time-budget cut drops the tail)
    ms = [{"name": "dense", "family": "dense", "dash": None}]
    ms += [_m(f"topk-k{k}", "topk", selector="topk", min_blocks=k) for k in (1, 2, 4, 8, 16)]
    ms += [_m(f"dash-floor{f}-s{s:g}", f"dash-floor{f}", score_scale=s, min_blocks=f)
           for f in (2, 4) for s in (2.0, 3.0, 5.0, 8.0)]
    ms += [_m(f"dash-std-s{s:g}", "dash-std", score_scale=s) for s in (1.0, 2.0, 3.0, 5.0)]
    ms += [{"name": f"dash-calib-d{t:g}", "family": "dash-calib", "calibrate": t,
            "dash": dict(BASE)} for t in (0.1, 0.2, 0.35)]
    ms += [_m(f"dash-raw-s{s:g}", "dash-raw", score_norm="none", score_scale=s)
           for s in (0.5, 1.0, 2.0)]
    ms += [_m("dash-std-s2-prior1-max", "dash-prior", score_scale=2.0, prior_weight=1.0,
              prior_norm="max"),
           _m("dash-std-s2-nosinklocal", "dash-nosl", score_scale=2.0, sink_blocks=0,
              local_blocks=0),
           _m("topk-k4-nosinklocal", "topk-nosl", selector="topk", min_blocks=4,
              sink_blocks=0, local_blocks=0)]
    return ms


def smoke_methods() -> list[dict]:
    """The CI smoke: dense, one top-k, one DASH."""
    return [{"name": "dense", "family": "dense", "dash": None},
            _m("topk-k2", "topk", selector="topk", min_blocks=2),
            _m("dash-floor2-s3", "dash-floor2", score_scale=3.0, min_blocks=2)]


# --------------------------------------------------------------------------------------
# child: one engine, many methods
# --------------------------------------------------------------------------------------
def _engine_kwargs(spec: dict, dash_engine: bool) -> dict:
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
        kw.update(attention_backend="CUSTOM", additional_config={"dash": dict(BASE)})
    return kw


def _generate(llm, SamplingParams, samples: list[dict]) -> list[str]:
    params = [SamplingParams(temperature=0.0, max_tokens=eval_tasks.MAX_NEW_TOKENS[s["task"]])
              for s in samples]
    outs = llm.generate([s["prompt"] for s in samples], params, use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def _density(snap: dict) -> tuple[Optional[float], list]:
    if not snap:
        return None, []
    layers = [snap[k]["density"] for k in sorted(snap, key=int)]
    return sum(layers) / len(layers), layers


def calibrate_scales(per_scale: dict, target: float) -> list[float]:
    """Per layer, the score_scale whose measured density is ``target``, by linear
    interpolation of log(scale) against density between the two grid points around it
    (clamped to the grid). ``per_scale``: {scale: [density per layer]}; density falls as
    the scale grows."""
    grid = sorted(per_scale)
    n_layers = len(per_scale[grid[0]])
    out = []
    for layer in range(n_layers):
        pts = [(s, per_scale[s][layer]) for s in grid]
        chosen = pts[-1][0] if pts[-1][1] > target else pts[0][0]
        for (s0, d0), (s1, d1) in zip(pts, pts[1:]):
            if d0 >= target >= d1 and d0 > d1:
                w = (d0 - target) / (d0 - d1)
                chosen = math.exp(math.log(s0) + w * (math.log(s1) - math.log(s0)))
                break
        out.append(round(chosen, 4))
    return out


def _emit(row: dict) -> None:
    print(CHILD_ROW + json.dumps(row), flush=True)


def run_child(spec: dict) -> dict:
    """Run every method of `spec` on one engine; returns per (method, length) results."""
    from vllm import LLM, SamplingParams
    dash_engine = spec["engine"] == "dash"
    t0 = time.time()
    llm = LLM(**_engine_kwargs(spec, dash_engine))
    init_s = time.time() - t0
    samples = spec["samples"]
    lengths = sorted({s["length"] for s in samples})
    calib = spec.get("calib_samples") or []
    results, skipped = [], []
    if dash_engine:
        from vllm_dash.backend import set_runtime_config
        from vllm_dash.stats import STATS

        def use(dash: dict) -> None:
            # the engine samples on its start-up interval: the layers must record every step
            dash = {**dash, "stats_interval": BASE["stats_interval"]}
            llm.apply_model(lambda model: set_runtime_config(model, dash))

        # calibration grid (only when a method asks for it): per-layer density per scale
        per_scale: dict = {}
        deadline = spec.get("deadline")
        if calib and any("calibrate" in m for m in spec["methods"]) and \
                not (deadline and time.time() > deadline):
            for s in spec.get("calib_grid", CALIB_GRID):
                use({**BASE, "score_scale": s})
                STATS.reset()
                _generate(llm, SamplingParams, calib)
                per_scale[s] = _density(STATS.snapshot())[1]
            _emit({"calibration": {str(k): v for k, v in per_scale.items()}})
        # method outside, length inside: with a KV cache that holds every prompt (prefix
        # caching), a method costs only its decode steps
        for m in spec["methods"]:
            if (deadline and time.time() > deadline) or ("calibrate" in m and not per_scale):
                skipped.append(m["name"])
                continue
            dash = dict(m["dash"])
            if "calibrate" in m:
                dash["score_scale"] = calibrate_scales(per_scale, m["calibrate"])
            use(dash)
            for length in lengths:
                cell = [s for s in samples if s["length"] == length]
                STATS.reset()
                t = time.time()
                texts = _generate(llm, SamplingParams, cell)
                mean, layers = _density(STATS.snapshot())
                results.append({"method": m["name"], "length": length, "texts": texts,
                                "density": mean, "density_per_layer": layers,
                                "dash": dash, "seconds": round(time.time() - t, 2)})
                _emit(results[-1])
        out = {"init_s": round(init_s, 1), "results": results, "skipped": skipped,
               "calibration": {str(k): v for k, v in per_scale.items()}}
    else:
        for length in lengths:
            cell = [s for s in samples if s["length"] == length]
            t = time.time()
            texts = _generate(llm, SamplingParams, cell)
            results.append({"method": "dense", "length": length, "texts": texts,
                            "density": 1.0, "density_per_layer": [],
                            "seconds": round(time.time() - t, 2)})
            _emit(results[-1])
        out = {"init_s": round(init_s, 1), "results": results}
    return out


CALIB_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


# --------------------------------------------------------------------------------------
# parent: samples, children, scoring, report
# --------------------------------------------------------------------------------------
def _spawn(spec: dict, timeout: float, log, cmd: Optional[list] = None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        path = f.name
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cmd = (cmd or [sys.executable, "-m", "vllm_dash.serving.eval", "--child"]) + [path]
    log(f"vllm-dash eval: {spec['engine']} engine, {len(spec['methods'])} method(s), "
        f"{len(spec['samples'])} samples")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", env=env, start_new_session=True)
    error = None

    def stop() -> tuple:
        os.killpg(proc.pid, 15)              # the child's own process group only
        try:
            return proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            return proc.communicate()

    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = stop()
        error = f"timeout after {timeout:.0f} s"
    except BaseException:                    # Ctrl-C, ...: never leave the engine running
        stop()
        raise
    finally:
        os.unlink(path)
    lines = stdout.splitlines()
    final = [ln for ln in lines if ln.startswith(CHILD_RESULT)]
    if proc.returncode == 0 and final and error is None:
        return json.loads(final[-1][len(CHILD_RESULT):])
    # cut short: keep what finished
    rows = [json.loads(ln[len(CHILD_ROW):]) for ln in lines if ln.startswith(CHILD_ROW)]
    results = [r for r in rows if "method" in r]
    calib = [r["calibration"] for r in rows if "calibration" in r]
    error = error or f"exit {proc.returncode}"
    if not results and not calib:
        raise RuntimeError(f"vllm-dash eval: the {spec['engine']} engine failed ({error}):\n"
                           f"{(stderr or stdout)[-4000:]}")
    log(f"vllm-dash eval: the {spec['engine']} engine stopped early ({error}); keeping its "
        f"{len(results)} finished runs")
    return {"init_s": None, "results": results, "error": error, "stderr_tail": stderr[-2000:],
            "calibration": calib[-1] if calib else {}}


def _progress(i: int, n: int, what: str) -> None:
    width = 30
    done = int(width * i / max(n, 1))
    print(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {what:<40}", end="", flush=True,
          file=sys.stderr)
    if i == n:
        print(file=sys.stderr)


def make_all_samples(tokenizer, tasks, lengths, n, seed, max_model_len) -> list[dict]:
    out = []
    todo = [(t, L) for L in lengths for t in tasks]
    for i, (task, length) in enumerate(todo):
        _progress(i, len(todo), f"generating {task} @ {length}")
        # the prompt plus the answer must fit the model's context
        fit = min(length, max_model_len - eval_tasks.MAX_NEW_TOKENS[task] - 8)
        for s in eval_tasks.make_samples(task, tokenizer=tokenizer, length=fit, n=n,
                                         seed=seed):
            d = s.to_dict()
            d["length"] = length            # the nominal length of the cell
            out.append(d)
    _progress(len(todo), len(todo), "samples ready")
    return out


def calibration_samples(tokenizer, length, n, seed, max_model_len) -> list[dict]:
    """The calibration prompts of `calibrate` and of eval's calibrated methods: passkey and
    niah_multikey_2, n in all, from their own seed (never eval's test prompts)."""
    return make_all_samples(tokenizer, ("passkey", "niah_multikey_2"), [length],
                            max(1, n // 2), seed + 1000, max_model_len)


def summarize(samples: list[dict], runs: list[dict]) -> dict:
    """Per (method, length, task): accuracy; per (method, length): density, mean accuracy."""
    rows, per_sample = [], []
    for r in runs:
        cell = [s for s in samples if s["length"] == r["length"]]
        scores: dict = {}
        for s, text in zip(cell, r["texts"]):
            score = eval_tasks.string_match_all(text, s["answers"])
            scores.setdefault(s["task"], []).append(score)
            per_sample.append({"method": r["method"], "length": r["length"], "task": s["task"],
                               "index": s["index"], "depth": s["depth"],
                               "n_tokens": s["n_tokens"], "answers": s["answers"],
                               "prediction": text, "score": score})
        acc = {t: sum(v) / len(v) for t, v in scores.items()}
        rows.append({"method": r["method"], "family": r.get("family"), "length": r["length"],
                     "density": r["density"], "accuracy": acc,
                     "accuracy_mean": sum(acc.values()) / len(acc),
                     "n_per_task": {t: len(v) for t, v in scores.items()},
                     "density_per_layer": r.get("density_per_layer", []),
                     "dash": r.get("dash")})
    return {"rows": rows, "samples": per_sample}


def table(rows: list[dict], tasks: Sequence[str]) -> str:
    short = {"passkey": "pass", "niah_single_1": "ns1", "niah_multikey_2": "mk2",
             "niah_multikey_3": "mk3", "vt": "vt"}
    head = f"{'method':<26} {'len':>5} {'density':>7} " + " ".join(
        f"{short.get(t, t):>5}" for t in tasks) + f" {'mean':>6}"
    out = [head]
    for r in sorted(rows, key=lambda r: (r["length"], r.get("family") or "", r["method"])):
        d = f"{r['density']:.3f}" if r["density"] is not None else "-"
        out.append(f"{r['method']:<26} {r['length']:>5} {d:>7} " + " ".join(
            f"{100 * r['accuracy'].get(t, float('nan')):>5.1f}" for t in tasks)
            + f" {100 * r['accuracy_mean']:>6.1f}")
    return "\n".join(out)


def run_eval(args) -> dict:
    from transformers import AutoTokenizer
    tasks = args.tasks.split(",")
    for t in tasks:
        if t not in eval_tasks.TASKS:
            raise SystemExit(f"vllm-dash eval: unknown task {t!r}; allowed: "
                             f"{', '.join(eval_tasks.TASKS)}")
    methods = default_methods() if args.methods == "default" else (
        smoke_methods() if args.methods == "smoke" else json.loads(open(args.methods).read()))
    if args.only:
        keep = set(args.only.split(","))
        methods = [m for m in methods if m["name"] in keep or m.get("family") in keep]
        if not methods:
            raise SystemExit(f"vllm-dash eval: --only {args.only!r} matches no method")
    tok = AutoTokenizer.from_pretrained(args.model)
    max_model_len = _max_model_len(args, tok)
    samples = make_all_samples(tok, tasks, args.lengths, args.samples, args.seed,
                               max_model_len)
    calib = []
    if any("calibrate" in m for m in methods):
        calib = calibration_samples(tok, max(args.lengths), max(4, args.calib_samples),
                                    args.seed, max_model_len)
    device = args.device or ("cuda" if _cuda() else "cpu")
    spec = {"model": args.model, "device": device, "max_model_len": max_model_len,
            "samples": samples, "max_num_seqs": args.max_num_seqs,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "cpu_kv_cache_gib": args.cpu_kv_cache_gib}
    runs = []
    t0 = time.time()
    engines = []
    if any(m["dash"] is None for m in methods):
        engines.append({**spec, "engine": "dense", "methods": []})
    dash_methods = [m for m in methods if m["dash"] is not None]
    if dash_methods:
        engines.append({**spec, "engine": "dash", "methods": dash_methods,
                        "calib_samples": calib})
    if args.time_budget:
        for e in engines:
            e["deadline"] = t0 + args.time_budget
    info: dict = {}
    fam = {m["name"]: m.get("family") for m in methods}
    report: dict = {}
    for i, e in enumerate(engines):
        _progress(i, len(engines), f"{e['engine']} engine")
        timeout = args.timeout
        if args.time_budget:   # a method started before the budget ends may finish; start-up
            timeout = min(timeout, max(180.0, t0 + args.time_budget + 90 - time.time()))
        try:
            res = _spawn(e, timeout, log=lambda m: print("\n" + m, file=sys.stderr))
        except RuntimeError as err:            # keep the other engine's results
            print(f"\n{err}", file=sys.stderr)
            info[e["engine"]] = {"error": str(err)[-2000:]}
        else:
            info[e["engine"]] = {"init_s": res["init_s"], "skipped": res.get("skipped", []),
                                 "error": res.get("error")}
            if res.get("calibration"):
                info["calibration_grid"] = res["calibration"]
            for r in res["results"]:
                r["family"] = fam.get(r["method"], "dense")
            runs += res["results"]
        report = _write_report(args, tasks, samples, runs, methods, info, device,
                               max_model_len, t0)     # after every engine: nothing is lost
    _progress(len(engines), len(engines), "done")
    print("\n".join(report["table"]))
    if report["not_run"]:
        print(f"not run (time budget, timeout or failure): {report['not_run']}",
              file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}, its -samples.json; PNG: {report.get('png')}")
    return report


def _write_report(args, tasks, samples, runs, methods, info, device, max_model_len,
                  t0) -> dict:
    summary = summarize(samples, runs)
    done = {(r["method"], r["length"]) for r in runs}
    not_run = [f"{m['name']}@{L}" for m in methods for L in args.lengths
               if (m["name"], L) not in done]
    report = {"model": os.path.basename(os.path.normpath(args.model)), "device": device,
              "gpu": _gpu_name(), "tasks": tasks, "lengths": args.lengths,
              "samples_per_cell": args.samples, "seed": args.seed,
              "max_model_len": max_model_len, "wall_s": round(time.time() - t0, 1),
              "engines": info, "not_run": not_run, "methods": methods,
              "rows": summary["rows"]}
    report["table"] = table(summary["rows"], tasks).splitlines()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.splitext(args.out)[0] + "-samples.json", "w") as f:
            json.dump(summary["samples"], f)
        png = args.png or os.path.splitext(args.out)[0] + ".png"
        report["png"] = f"{png}: " + eval_report.pareto_png(     # solved / all tasks
            eval_report.compare(summary["rows"]), png,
            f"{report['model']} ({report['gpu'] or device})")
    return report


def run_calibrate(args) -> dict:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)
    max_model_len = _max_model_len(args, tok)
    calib = calibration_samples(tok, args.length, args.samples, args.seed, max_model_len)
    device = args.device or ("cuda" if _cuda() else "cpu")
    spec = {"model": args.model, "device": device, "max_model_len": max_model_len,
            "samples": [], "calib_samples": calib, "engine": "dash",
            "calib_grid": args.grid, "max_num_seqs": args.max_num_seqs,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "cpu_kv_cache_gib": args.cpu_kv_cache_gib,
            "methods": [{"name": "calib", "calibrate": args.target_density,
                         "dash": dict(BASE)}]}
    res = _spawn_calibration(spec, args.timeout)
    grid = {float(k): v for k, v in res["calibration"].items()}
    if len(grid) < 2:
        raise SystemExit(f"vllm-dash calibrate: only {len(grid)} grid point(s) measured")
    scales = calibrate_scales(grid, args.target_density)
    out = {"score_scale": scales, "target_density": args.target_density,
           "score_norm": BASE["score_norm"], "min_blocks": BASE["min_blocks"],
           "model": os.path.basename(os.path.normpath(args.model)),
           "length": args.length, "samples": len(calib),
           "grid": {str(k): v for k, v in grid.items()}}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}: per-layer score_scale for density {args.target_density} "
          f"(score_norm {BASE['score_norm']}, no min_blocks floor); use it with "
          f"--additional-config '{{\"dash\": {{\"score_scale_file\": \"{args.out}\", "
          f"\"min_blocks\": 0}}}}'")
    return out


def _spawn_calibration(spec: dict, timeout: float) -> dict:
    """_spawn (a run that measured the grid and then stopped still counts); a failure
    becomes a clean exit with the engine's error."""
    try:
        return _spawn(spec, timeout, log=lambda m: print(m, file=sys.stderr))
    except RuntimeError as err:
        raise SystemExit(f"vllm-dash calibrate: {err}")


def _max_model_len(args, tokenizer) -> int:
    """--max-model-len, else the model's max_position_embeddings (config.json), else the
    tokenizer's model_max_length when it is a real limit, else 8192."""
    if args.max_model_len:
        return int(args.max_model_len)
    try:
        with open(os.path.join(args.model, "config.json")) as f:
            n = json.load(f).get("max_position_embeddings")
        if isinstance(n, int) and n > 0:
            return n
    except (OSError, ValueError):
        pass
    n = int(getattr(tokenizer, "model_max_length", 0) or 0)
    return n if 0 < n < 10 ** 7 else 8192


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _gpu_name() -> Optional[str]:
    try:
        import torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None,
                    help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8,
                    help="GPU: the KV cache should hold every prompt (prefix caching)")
    ap.add_argument("--cpu-kv-cache-gib", type=float, default=1.0,
                    help="CPU: KV cache size (fp32; make it hold every prompt of a run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per engine")


def eval_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vllm-dash eval", description="Accuracy of DASH vs dense vs top-k on offline "
        "long-context tasks (passkey, RULER-style needles, variable tracking) through vLLM.")
    _common(ap)
    ap.add_argument("--tasks", default=",".join(eval_tasks.TASKS),
                    help=f"comma-separated, from {', '.join(eval_tasks.TASKS)}")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    ap.add_argument("--samples", type=int, default=30, help="samples per task and length")
    ap.add_argument("--methods", default="default",
                    help="'default' (the record sweep), 'smoke', or a JSON file with a list of "
                         "{name, family, dash} (dash null = dense)")
    ap.add_argument("--only", default=None, help="comma-separated method names or families")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: methods not started by then are skipped (and listed); an "
                         "engine still running 90 s later is stopped, its finished runs kept")
    ap.add_argument("--out", default=None, help="summary JSON (samples go to *-samples.json)")
    ap.add_argument("--png", default=None, help="Pareto plot (default: next to --out)")
    return ap


def calibrate_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vllm-dash calibrate", description="Per-layer score_scale for a target density "
        "(standardized scores), written as a score_scale_file for the DASH config.")
    _common(ap)
    ap.add_argument("--target-density", type=float, required=True)
    ap.add_argument("--length", type=int, default=8000, help="calibration prompt tokens")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--grid", type=float, nargs="+", default=list(CALIB_GRID))
    ap.add_argument("--out", required=True)
    return ap


def _default_model(args) -> None:
    if args.model is None:
        from vllm_dash.serving.models import default_model_dir
        args.model = str(default_model_dir())


def eval_main(argv: Sequence[str]) -> int:
    args = eval_parser().parse_args(list(argv))
    if args.samples < 1:
        raise SystemExit("vllm-dash eval: --samples must be >= 1")
    _default_model(args)
    run_eval(args)
    return 0


def calibrate_main(argv: Sequence[str]) -> int:
    args = calibrate_parser().parse_args(list(argv))
    if not 0.0 < args.target_density < 1.0:
        raise SystemExit("vllm-dash calibrate: --target-density must be in (0, 1), got "
                         f"{args.target_density}")
    if len(args.grid) < 2 or any(g <= 0 for g in args.grid):
        raise SystemExit("vllm-dash calibrate: --grid needs >= 2 values > 0")
    _default_model(args)
    run_calibrate(args)
    return 0


def _child_main(path: str) -> None:
    spec = json.load(open(path))
    print(CHILD_RESULT + json.dumps(run_child(spec)), flush=True)


if __name__ == "__main__":   # the child (vLLM may re-import this module in its processes)
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child_main(sys.argv[2])
    else:
        sys.exit(eval_main(sys.argv[1:]))
