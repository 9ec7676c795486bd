"""The methods the harness compares, and the per-layer calibration of the score scale.

A method is ``{"name", "family", "dash"}``: ``dash`` None is dense attention (vLLM's default
backend); otherwise the DASH config the method runs with. Top-k is the DASH config with
``selector: "topk"`` (forced blocks + each head's ``min_blocks`` best blocks, same summaries,
same stage 2). A method with ``"calibrate": target`` gets per-layer score scales measured on
calibration prompts (``calibrate_scales``). Pure Python: nothing here runs a model.
"""
from __future__ import annotations

import math

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
