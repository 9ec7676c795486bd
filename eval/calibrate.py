"""`vllm-dash calibrate`: per-layer score_scale for a target density.

On calibration prompts (passkey and niah_multikey_2 from their own seed, never eval's test
prompts) one DASH engine measures each layer's density at a grid of score_scale values
(standardized scores, no min_blocks floor); per layer, the scale that gives the target
density is interpolated (:func:`vllm_dash.eval.methods.calibrate_scales`) and written as
``{"score_scale": [...]}`` for the config key ``score_scale_file``. eval's "calib" methods
use the same procedure inside the DASH engine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from vllm_dash.eval import harness
from vllm_dash.eval import methods as M


def run_calibrate(args) -> dict:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)
    max_model_len = harness.model_len(args, tok)
    calib = harness.calibration_samples(tok, args.length, args.samples, args.seed,
                                        max_model_len)
    spec = {"model": args.model, "device": harness.device_of(args),
            "max_model_len": max_model_len, "samples": [], "calib_samples": calib,
            "engine": "dash", "calib_grid": args.grid, "max_num_seqs": args.max_num_seqs,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "cpu_kv_cache_gib": args.cpu_kv_cache_gib,
            "methods": [{"name": "calib", "calibrate": args.target_density,
                         "dash": dict(M.BASE)}]}
    res = _spawn_calibration(spec, args.timeout)
    grid = {float(k): v for k, v in res["calibration"].items()}
    if len(grid) < 2:
        raise SystemExit(f"vllm-dash calibrate: only {len(grid)} grid point(s) measured")
    scales = M.calibrate_scales(grid, args.target_density)
    out = {"score_scale": scales, "target_density": args.target_density,
           "score_norm": M.BASE["score_norm"], "min_blocks": M.BASE["min_blocks"],
           "model": os.path.basename(os.path.normpath(args.model)),
           "length": args.length, "samples": len(calib),
           "grid": {str(k): v for k, v in grid.items()}}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}: per-layer score_scale for density {args.target_density} "
          f"(score_norm {M.BASE['score_norm']}, no min_blocks floor); use it with "
          f"--additional-config '{{\"dash\": {{\"score_scale_file\": \"{args.out}\", "
          f"\"min_blocks\": 0}}}}'")
    return out


def _spawn_calibration(spec: dict, timeout: float) -> dict:
    """harness.spawn_engine (a run that measured the grid and then stopped still counts);
    a failure becomes a clean exit with the engine's error."""
    try:
        return harness.spawn_engine(spec, timeout, log=lambda m: print(m, file=sys.stderr))
    except RuntimeError as err:
        raise SystemExit(f"vllm-dash calibrate: {err}")


def calibrate_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vllm-dash calibrate", description="Per-layer score_scale for a target density "
        "(standardized scores), written as a score_scale_file for the DASH config.")
    harness.common_args(ap)
    ap.add_argument("--target-density", type=float, required=True)
    ap.add_argument("--length", type=int, default=8000, help="calibration prompt tokens")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--grid", type=float, nargs="+", default=list(M.CALIB_GRID))
    ap.add_argument("--out", required=True)
    return ap


def calibrate_main(argv: Sequence[str]) -> int:
    args = calibrate_parser().parse_args(list(argv))
    if not 0.0 < args.target_density < 1.0:
        raise SystemExit("vllm-dash calibrate: --target-density must be in (0, 1), got "
                         f"{args.target_density}")
    if len(args.grid) < 2 or any(g <= 0 for g in args.grid):
        raise SystemExit("vllm-dash calibrate: --grid needs >= 2 values > 0")
    harness.default_model(args)
    run_calibrate(args)
    return 0
