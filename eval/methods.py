"""The methods the harness compares, and the per-layer calibration of the score scale.

A method is ``{"name", "family", "dash"}``: ``dash`` None is dense attention (vLLM's default
backend); otherwise the DASH config the method runs with. Top-k is the DASH config with
``selector: "topk"`` (forced blocks + each head's ``min_blocks`` best blocks, same summaries,
same stage 2). A method with ``"calibrate": target`` gets per-layer score scales measured on
calibration prompts (``calibrate_scales``). Pure Python: nothing here runs a model.

Summary kinds (``dash["summary"]``: mean, minmax, attn_pool) are an ENGINE setting (page
padding, cache contents; the adapter refuses to switch them at run time), so the harness
runs one DASH engine per (summary, summary_file) group (``engine_groups``); attn_pool needs
a summary file (`vllm-dash distill`), and its methods are skipped with a note without one.
"""
from __future__ import annotations

import math
import os
from typing import Optional

from vllm_dash.config import TRAINING_FREE_SUMMARY
from vllm_dash.kernels.params import SUMMARY_KINDS


#: the DASH config keys that are engine settings (equal for every method of one engine)
ENGINE_KEYS = ("summary", "summary_file")

#: the prompt seed of the issue-13 record (never used for a choice before it)
RECORD13_SEED = 1313

#: DASH settings shared by the sweeps unless a method overrides them (min_blocks 0: no floor
#: unless a method sets one; the record ran when 0 was DashConfig's default)
BASE = {"score_norm": "standardize", "prior_weight": 0.0, "sink_blocks": 1, "local_blocks": 1,
        "min_blocks": 0, "dense_below": 0, "stats_interval": 1}

#: score_scale values at which calibration measures each layer's density
CALIB_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


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


def _kind_prefix(kind: str) -> str:
    return {"mean": "", "minmax": "minmax-", "attn_pool": "pool-"}[kind]


def topk_family(kind: str) -> str:
    """The family of plain top-k (sink + local + k per head) on ``kind`` summaries: the
    reference curve of every method on the same summaries ("topk" for mean, as in the
    first record)."""
    return "topk" if kind == "mean" else f"topk-{kind}"


def record_methods() -> list[dict]:
    """The issue-13 sweep (``--methods record13``): dense, then per summary kind (mean,
    attn_pool, minmax) top-k at k 1/2/4/8 (and 16 on mean: the density mean top-k needs to
    come near dense), DASH with the per-head floor (min_blocks 4, score_scale 2 and 4) and
    DASH without a floor (entmax alone, score_scale 1, 2, 3). The shipped default
    (dash-floor4-s2 on mean) keeps its name. Mean methods keep the first record's names and
    families; the others are prefixed "minmax-" / "pool-" and their families suffixed
    "-minmax" / "-attn_pool". 28 DASH-engine methods in 3 engines (one per kind)."""
    ms = [{"name": "dense", "family": "dense", "dash": None}]
    for kind in ("mean", "attn_pool", "minmax"):   # priority (a time budget cuts the tail)
        pre, suf = _kind_prefix(kind), ("" if kind == "mean" else f"-{kind}")
        ks = (1, 2, 4, 8, 16) if kind == "mean" else (1, 2, 4, 8)
        ms += [_m(f"{pre}topk-k{k}", topk_family(kind), selector="topk", min_blocks=k,
                  summary=kind) for k in ks]
        ms += [_m(f"{pre}dash-floor4-s{s:g}", f"dash-floor4{suf}", score_scale=s, min_blocks=4,
                  summary=kind) for s in (2.0, 4.0)]
        ms += [_m(f"{pre}dash-std-s{s:g}", f"dash-std{suf}", score_scale=s, summary=kind)
               for s in (1.0, 2.0, 3.0)]
    return ms


def summary_kind(dash: Optional[dict]) -> Optional[str]:
    """The summary kind a DASH config runs with (None for dense): its "summary" key;
    "auto" is attn_pool with a summary_file, else the adapter's training-free kind (its rule
    without pooling vectors in the checkpoint). No key is the harness's convention: attn_pool
    with a summary_file, else "mean" (the first record's methods ran on mean without the key;
    engine_groups writes the kind into every method, so the engine runs what this says)."""
    if dash is None:
        return None
    if "summary" not in dash:                # the harness's convention (engine_groups)
        return "attn_pool" if dash.get("summary_file") else "mean"
    if dash["summary"] == "auto":
        return "attn_pool" if dash.get("summary_file") else TRAINING_FREE_SUMMARY
    return dash["summary"]


def engine_groups(methods: list[dict], summary_file: Optional[str]) -> tuple:
    """Split the DASH methods into engines: ``([{"name", "engine_dash", "methods"}], notes,
    skipped)``. One engine per (summary, summary_file), in order of first appearance;
    ``engine_dash`` is the engine's start-up config (BASE plus its engine keys) and every
    method's dash gets the same engine keys. attn_pool methods take ``summary_file`` (the
    run's --summary-file) unless their dash names one; without a file that exists they are
    skipped (names in ``skipped``, the reason in ``notes``)."""
    groups: dict = {}
    notes, skipped = [], []
    for m in methods:
        if m["dash"] is None:
            continue
        dash = dict(m["dash"])
        if dash.get("summary") == "attn_pool" and not dash.get("summary_file") and summary_file:
            dash["summary_file"] = summary_file
        if dash.get("summary") == "attn_pool":
            path = dash.get("summary_file")
            if not path or not os.path.exists(path):
                skipped.append(m["name"])
                why = ("no --summary-file given" if not path else
                       f"summary file {path} does not exist")
                note = (f"attn_pool methods skipped: {why} (make one with `vllm-dash distill "
                        f"MODEL --out FILE`)")
                if note not in notes:
                    notes.append(note)
                continue
        dash["summary"] = summary_kind(dash)        # explicit: the engine runs the label
        key = tuple(dash.get(k) for k in ENGINE_KEYS)
        if key not in groups:
            name = "dash" if key == (None, None) else f"dash-{key[0] or 'auto'}"
            while any(g["name"] == name for g in groups.values()):
                name += "+"
            groups[key] = {"name": name, "methods": [],
                           "engine_dash": {**BASE, **{k: v for k, v in zip(ENGINE_KEYS, key)
                                                      if v is not None}}}
        groups[key]["methods"].append({**m, "dash": dash})
    return list(groups.values()), notes, skipped


def smoke_methods() -> list[dict]:
    """The CI smoke: dense, one top-k, one DASH."""
    return [{"name": "dense", "family": "dense", "dash": None},
            _m("topk-k2", "topk", selector="topk", min_blocks=2),
            _m("dash-floor2-s3", "dash-floor2", score_scale=3.0, min_blocks=2)]


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
