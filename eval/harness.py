"""`vllm-dash eval`: accuracy of DASH vs dense vs top-k on offline long-context tasks.

`eval` generates the offline long-context tasks of :mod:`vllm_dash.eval.tasks` (passkey,
RULER-style needles, variable tracking) at several prompt lengths, answers them greedily
through vLLM's LLM API and scores them with RULER's string_match_all. Methods
(:mod:`vllm_dash.eval.methods`):

  dense        vLLM's default attention backend (its own engine)
  DASH / top-k every other method, in one eager DASH engine (--attention-backend CUSTOM)
               per summary kind (mean, minmax, attn_pool: an engine setting, see
               :func:`vllm_dash.eval.methods.engine_groups`); within an engine the DASH config
               is switched between methods in place
               (:func:`vllm_dash.eval.engine.set_runtime_config`). attn_pool methods need
               --summary-file (`vllm-dash distill`); without one they are skipped with a note.
  --recall     attention recall of every sparse method at every length on natural text
               (:func:`vllm_dash.eval.recall.measure_recall`, transformers, its own child),
               stored under "recall" in the report, with the oracle at the same density.

Each engine runs in a child process (:mod:`vllm_dash.eval.engine`, through the child runner
vllm_dash.serving.child), which sends one row per finished (method, length): an engine that
fails, times out or is cut by --time-budget keeps what it finished, and the report is
rewritten after every engine. Prefill is dense for every method (DASH selects blocks for
decode tokens only); the first answer token therefore comes from dense attention. Run the
whole command inside a private network namespace (vLLM opens a listener on all interfaces).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Optional, Sequence

from vllm_dash.eval import methods as M
from vllm_dash.eval import provenance
from vllm_dash.eval import report as eval_report
from vllm_dash.eval import tasks as eval_tasks
from vllm_dash.serving import child

DEFAULT_LENGTHS = (2048, 4096, 8192)
ENGINE_CMD = (sys.executable, "-m", "vllm_dash.eval.engine")


# --------------------------------------------------------------------------------------
# engines
# --------------------------------------------------------------------------------------
def spawn_engine(spec: dict, timeout: float, log: Callable[[str], None],
                 cmd: Optional[list] = None) -> dict:
    """Run one engine child on ``spec``: {"init_s", "results", "skipped", "calibration",
    "recall"}, plus "error" and "stderr_tail" when it stopped early with finished runs;
    RuntimeError (with the engine's log tail) when it stopped before finishing anything."""
    log(f"vllm-dash eval: {spec['engine']} engine, {len(spec['methods'])} method(s), "
        f"{len(spec['samples'])} samples")
    res = child.run(cmd or ENGINE_CMD, spec, timeout=timeout,
                    env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    rows = res.rows
    out = {"init_s": next((r["init_s"] for r in rows if "init_s" in r), None),
           "results": [r for r in rows if "method" in r],
           "skipped": next((r["skipped"] for r in rows if "skipped" in r), []),
           "calibration": next((r["calibration"] for r in reversed(rows)
                                if "calibration" in r), {}),
           "recall": [x for r in rows if "recall" in r for x in r["recall"]]}
    if res.ok:
        return out
    if not out["results"] and not out["calibration"] and not out["recall"]:
        raise RuntimeError(f"vllm-dash eval: the {spec['engine']} engine failed "
                           f"({res.error}):\n{res.log_tail(4000)}")
    log(f"vllm-dash eval: the {spec['engine']} engine stopped early ({res.error}); keeping "
        f"its {len(out['results']) + len(out['recall'])} finished runs")
    return {**out, "error": res.error, "stderr_tail": res.stderr[-2000:]}


def _progress(i: int, n: int, what: str) -> None:
    width = 30
    done = int(width * i / max(n, 1))
    print(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {what:<40}", end="", flush=True,
          file=sys.stderr)
    if i == n:
        print(file=sys.stderr)


# --------------------------------------------------------------------------------------
# samples and scoring
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
METHOD_SETS = {"default": M.default_methods, "smoke": M.smoke_methods,
               "record13": M.record_methods}


def select_methods(args) -> list[dict]:
    """--methods (a name of METHOD_SETS or a JSON file), filtered by --only."""
    if args.methods in METHOD_SETS:
        methods = METHOD_SETS[args.methods]()
    else:
        with open(args.methods) as f:
            methods = json.load(f)
    if args.only:
        keep = set(args.only.split(","))
        methods = [m for m in methods if m["name"] in keep or m.get("family") in keep]
        if not methods:
            raise SystemExit(f"vllm-dash eval: --only {args.only!r} matches no method")
    return methods


def engine_specs(args, methods, samples, calib, max_model_len, device, t0) -> tuple:
    """(specs, notes): one spec per engine: dense (when a method is dense), then with
    --recall the recall child, then one DASH engine per summary group
    (methods.engine_groups; notes say which methods were skipped and why)."""
    spec = {"model": args.model, "device": device, "max_model_len": max_model_len,
            "samples": samples, "max_num_seqs": args.max_num_seqs,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "cpu_kv_cache_gib": args.cpu_kv_cache_gib}
    engines = []
    if any(m["dash"] is None for m in methods):
        engines.append({**spec, "engine": "dense", "methods": []})
    sf = getattr(args, "summary_file", None)       # absolute: the engines compare paths
    groups, notes, _ = M.engine_groups(methods, os.path.abspath(sf) if sf else None)
    if getattr(args, "recall", False) and groups:
        engines.append(recall_spec(args, groups, device))
    for g in groups:
        engines.append({**spec, "engine": g["name"], "methods": g["methods"],
                        "engine_dash": g["engine_dash"], "calib_samples": calib})
    if args.time_budget:
        for e in engines:
            e["deadline"] = t0 + args.time_budget
    return engines, notes


def recall_spec(args, groups, device) -> dict:
    """The recall child's spec: every runnable sparse method (without calibration: its
    scales come from an engine), the eval lengths, the summary file for attn_pool."""
    methods = [dict(m) for g in groups for m in g["methods"] if "calibrate" not in m]
    return {"engine": "recall", "model": args.model, "device": device, "methods": methods,
            "samples": [], "lengths": list(args.lengths), "windows": args.recall_windows,
            "positions": args.recall_positions, "seed": args.seed,
            "summary_file": next((m["dash"]["summary_file"] for m in methods
                                  if m["dash"].get("summary_file")), None),
            "timeout": args.recall_timeout}


def run_eval(args) -> dict:
    from transformers import AutoTokenizer
    tasks = args.tasks.split(",")
    for t in tasks:
        if t not in eval_tasks.TASKS:
            raise SystemExit(f"vllm-dash eval: unknown task {t!r}; allowed: "
                             f"{', '.join(eval_tasks.TASKS)}")
    methods = select_methods(args)
    tok = AutoTokenizer.from_pretrained(args.model)
    max_model_len = model_len(args, tok)
    samples = make_all_samples(tok, tasks, args.lengths, args.samples, args.seed,
                               max_model_len)
    calib = []
    if any("calibrate" in m for m in methods):
        calib = calibration_samples(tok, max(args.lengths), max(4, args.calib_samples),
                                    args.seed, max_model_len)
    device = device_of(args)
    t0 = time.time()
    engines, notes = engine_specs(args, methods, samples, calib, max_model_len, device, t0)
    for n in notes:
        print(f"vllm-dash eval: {n}", file=sys.stderr)
    runs, recall, info = [], [], {"notes": notes}
    fam = {m["name"]: m.get("family") for m in methods}
    report = _write_report(args, tasks, samples, runs, recall, methods, info, device,
                           max_model_len, t0)
    for i, e in enumerate(engines):
        _progress(i, len(engines), f"{e['engine']} engine")
        res = _run_one(args, e, t0, info)
        if res is not None:
            for r in res["results"]:
                r["family"] = fam.get(r["method"], "dense")
            runs += res["results"]
            recall += res.get("recall", [])
        report = _write_report(args, tasks, samples, runs, recall, methods, info, device,
                               max_model_len, t0)     # after every engine: nothing is lost
    _progress(len(engines), len(engines), "done")
    print("\n".join(report["table"]))
    if report["not_run"]:
        print(f"not run (time budget, timeout or failure): {report['not_run']}",
              file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}, its -samples.json; PNG: {report.get('png')}")
    return report


def _run_one(args, e: dict, t0: float, info: dict) -> Optional[dict]:
    """Spawn one engine (or the recall child) within the time budget; its info goes to
    ``info[name]``; None when it failed or the budget was spent before it started."""
    timeout = e.get("timeout") or args.timeout
    if args.time_budget:   # a method started before the budget ends may finish; start-up
        left = t0 + args.time_budget - time.time()
        if left <= 0:
            info[e["engine"]] = {"error": "not started: time budget spent"}
            return None
        timeout = min(timeout, max(180.0, left + 90))
    try:
        res = spawn_engine(e, timeout, log=lambda m: print("\n" + m, file=sys.stderr))
    except RuntimeError as err:            # keep the other engines' results
        print(f"\n{err}", file=sys.stderr)
        info[e["engine"]] = {"error": str(err)[-2000:]}
        return None
    info[e["engine"]] = {"init_s": res["init_s"], "skipped": res.get("skipped", []),
                         "error": res.get("error")}
    if e.get("engine_dash"):
        info[e["engine"]]["engine_dash"] = e["engine_dash"]
    if res.get("calibration"):
        info["calibration_grid"] = res["calibration"]
    return res


def _write_report(args, tasks, samples, runs, recall, methods, info, device, max_model_len,
                  t0) -> dict:
    summary = summarize(samples, runs)
    done = {(r["method"], r["length"]) for r in runs}
    not_run = [f"{m['name']}@{L}" for m in methods for L in args.lengths
               if (m["name"], L) not in done]
    report = {"model": os.path.basename(os.path.normpath(args.model)), "device": device,
              "gpu": _gpu_name(), "tasks": tasks, "lengths": args.lengths,
              "samples_per_cell": args.samples, "seed": args.seed,
              "method_set": args.methods, "max_model_len": max_model_len,
              "wall_s": round(time.time() - t0, 1), "engines": info,
              "notes": info.get("notes", []), "not_run": not_run, "methods": methods,
              "rows": summary["rows"], "versions": provenance.versions(),
              "commit": provenance.commit()}
    if getattr(args, "summary_file", None):
        report["summary_file"] = summary_file_info(args.summary_file)
    if getattr(args, "recall", False):
        report["recall"] = recall
        report["recall_settings"] = {"windows": args.recall_windows,
                                     "positions": args.recall_positions, "seed": args.seed}
    report["table"] = table(summary["rows"], tasks).splitlines()
    if recall:
        report["table"] += [""] + eval_report.format_recall(recall).splitlines()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.splitext(args.out)[0] + "-samples.json", "w") as f:
            json.dump(summary["samples"], f)
        png = args.png or os.path.splitext(args.out)[0] + ".png"
        report["png"] = f"{png}: " + eval_report.pareto_png(     # accuracy / recall
            eval_report.compare(summary["rows"], recall=recall), png,
            f"{report['model']} ({report['gpu'] or device})")
    return report


def summary_file_info(path: str) -> dict:
    """The summary file's path, size and metadata (what distill recorded), when readable."""
    path = os.path.abspath(path)
    out: dict = {"path": path, "exists": os.path.exists(path)}
    if out["exists"]:
        out["bytes"] = os.path.getsize(path)
        try:
            from safetensors import safe_open
            with safe_open(path, "np") as f:
                out["metadata"] = f.metadata() or {}
        except Exception as e:          # noqa: BLE001 - a report field, never a failure
            out["metadata_error"] = str(e)[:200]
    return out


def model_len(args, tokenizer) -> int:
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


def device_of(args) -> str:
    """--device, else cuda when a GPU is visible, else cpu."""
    return args.device or ("cuda" if _cuda() else "cpu")


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def common_args(ap: argparse.ArgumentParser) -> None:
    """The options eval and calibrate share (model, device, engine sizes, seed, timeout)."""
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
    common_args(ap)
    ap.add_argument("--tasks", default=",".join(eval_tasks.TASKS),
                    help=f"comma-separated, from {', '.join(eval_tasks.TASKS)}")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    ap.add_argument("--samples", type=int, default=30, help="samples per task and length")
    ap.add_argument("--methods", default="default",
                    help="'default' (the first record's sweep), 'record13' (summary kinds: "
                         "the issue-13 record), 'smoke', or a JSON file with a list of "
                         "{name, family, dash} (dash null = dense)")
    ap.add_argument("--summary-file", default=None,
                    help="pooling vectors for attn_pool methods (`vllm-dash distill`); without "
                         "it attn_pool methods are skipped")
    ap.add_argument("--recall", action="store_true",
                    help="also measure attention recall (natural text, transformers) of every "
                         "sparse method at every length, with the oracle at the same density")
    ap.add_argument("--recall-windows", type=int, default=4,
                    help="recall: text windows per length")
    ap.add_argument("--recall-positions", type=int, default=16,
                    help="recall: decode positions sampled per window")
    ap.add_argument("--recall-timeout", type=float, default=240,
                    help="recall: seconds for the recall child")
    ap.add_argument("--only", default=None, help="comma-separated method names or families")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: methods not started by then are skipped (and listed); an "
                         "engine still running 90 s later is stopped, its finished runs kept")
    ap.add_argument("--out", default=None, help="summary JSON (samples go to *-samples.json)")
    ap.add_argument("--png", default=None, help="Pareto plot (default: next to --out)")
    return ap


def default_model(args) -> None:
    """--model defaults to the embedded SmolLM2 (converted on first use)."""
    if args.model is None:
        from vllm_dash.serving.models import default_model_dir
        args.model = str(default_model_dir())


def eval_main(argv: Sequence[str]) -> int:
    args = eval_parser().parse_args(list(argv))
    if args.samples < 1:
        raise SystemExit("vllm-dash eval: --samples must be >= 1")
    for opt in ("recall_windows", "recall_positions"):
        if getattr(args, opt) < 1:
            raise SystemExit(f"vllm-dash eval: --{opt.replace('_', '-')} must be >= 1, got "
                             f"{getattr(args, opt)}")
    default_model(args)
    run_eval(args)
    return 0
