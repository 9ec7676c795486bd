"""DashConfig: the DASH settings of a serving process, parsed from vLLM's
``--additional-config '{"dash": {...}}'`` and validated at startup.

The method's knobs are those of :class:`vllm_dash.kernels.params.DashParams` (with the
serving defaults chosen from the accuracy record); DashConfig adds the serving concerns:
unknown keys, help text, a per-layer score_scale, score_scale_file, stats_interval. It hands
out one validated DashParams per attention layer (:meth:`DashConfig.params_for_layer`),
built once. :func:`engine_config` parses a vLLM config's DASH settings once per process (a
score_scale_file is read once, not once per layer).

Unknown keys and out-of-range values raise ``ValueError`` with the key and its allowed
values, so a bad setting stops the server before it serves anything. No vLLM import here.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from vllm_dash.kernels.params import RULES, DashParams, is_number
from vllm_dash.layout import SUPPORTED_BLOCK_SIZES

__all__ = ["DashConfig", "SUPPORTED_BLOCK_SIZES", "config_help", "engine_config"]

# key -> (allowed values in words, help): one place for error messages, the README table
# and CLI help. The allowed values of the method's knobs come from DashParams' RULES.
_HELP = {
    "alpha": "entmax alpha (1.5: entmax15, 2: sparsemax)",
    "score_scale": "sparsity knob: block scores are multiplied by it (0 = every block)",
    "score_scale_file": "per-layer score_scale from a calibration run",
    "prior_weight": "weight of log-prior in stage 2 (0 = flat)",
    "sink_blocks": "first blocks of every sequence always attended",
    "local_blocks": "last blocks (incl. the current one) always attended",
    "min_blocks": "per-head floor: that many top-scoring blocks kept",
    "max_blocks": "hard cap on attended blocks per (sequence, KV head)",
    "dense_below": "shorter sequences attend densely",
    "stats_interval": "sample decode statistics (vllm_dash_* metrics) every that many steps; "
                      "0 = off",
    "score_norm": "standardize scores per head before entmax",
    "prior_norm": "normalise the prior by its max",
    "selector": "entmax = DASH; topk = baseline: only forced blocks + min_blocks per head",
}
_ALLOWED = {
    **RULES,
    "score_scale": RULES["score_scale"] + ", or a list with one such number per attention "
                   "layer",
    "score_scale_file": 'a path to a JSON file {"score_scale": [one number per attention '
                        'layer]}',
    "stats_interval": "an integer >= 0",
}
_DOC = {key: (_ALLOWED[key], text) for key, text in _HELP.items()}


@dataclass(frozen=True)
class DashConfig:
    """Validated DASH settings. The defaults of score_scale, min_blocks, score_norm,
    prior_weight and sink/local blocks were chosen by the rule of `vllm-dash eval-report` from
    the accuracy record (benchmarks/results/accuracy-smollm2-135m-instruct.json): method
    dash-floor4-s2, the most accurate DASH setting that matched or beat top-k at equal measured
    density at 2K, 4K and 8K tokens (tests/cpu/test_eval_report.py keeps them in step)."""
    alpha: float = 1.5
    score_scale: Any = 2.0                      # float, or tuple of per-layer floats
    score_scale_file: Optional[str] = None
    prior_weight: float = 0.0
    sink_blocks: int = 1
    local_blocks: int = 1
    min_blocks: int = 4
    max_blocks: Optional[int] = None
    dense_below: int = 0
    score_norm: str = "standardize"
    prior_norm: str = "none"
    stats_interval: int = 16
    selector: str = "entmax"

    # ---------------------------------------------------------------- construction
    @classmethod
    def keys(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, data: Optional[Mapping[str, Any]]) -> "DashConfig":
        """Build from the ``"dash"`` mapping of --additional-config (None: defaults)."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f'--additional-config "dash" must be a JSON object, got '
                             f"{type(data).__name__}")
        unknown = sorted(set(data) - set(cls.keys()))
        if unknown:
            raise ValueError(f"unknown DASH config key(s) {unknown}; allowed keys: "
                             f"{list(cls.keys())}")
        kwargs = dict(data)
        if isinstance(kwargs.get("score_scale"), (list, tuple)):
            kwargs["score_scale"] = tuple(kwargs["score_scale"])
        cfg = cls(**kwargs)
        cfg.validate()
        if cfg.score_scale_file is not None:
            cfg = dataclasses.replace(cfg, score_scale=_load_scale_file(cfg.score_scale_file))
            cfg.validate()
        return cfg

    @classmethod
    def from_additional_config(cls, additional_config: Optional[Mapping[str, Any]]) -> "DashConfig":
        """From vLLM's whole additional_config dict (the ``"dash"`` entry, if any)."""
        if additional_config is None:
            return cls.from_mapping(None)
        if isinstance(additional_config, str):
            additional_config = json.loads(additional_config)
        return cls.from_mapping(additional_config.get("dash"))

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """The serving keys here; the method's knobs by building the layers' DashParams."""
        def bad(key, value):
            return ValueError(f"DASH config {key}={value!r} is invalid: must be "
                              f"{_DOC[key][0]}")

        si = self.stats_interval
        if not isinstance(si, int) or isinstance(si, bool) or si < 0:
            raise bad("stats_interval", si)
        scales = self.score_scale if isinstance(self.score_scale, tuple) else (self.score_scale,)
        if not scales or any(not is_number(s) or not math.isfinite(s) or s < 0 for s in scales):
            raise bad("score_scale", self.score_scale)
        if self.score_scale_file is not None and not isinstance(self.score_scale_file, str):
            raise bad("score_scale_file", self.score_scale_file)
        try:
            self._layer_params
        except ValueError as e:          # DashParams names the key and its allowed values
            raise ValueError(f"DASH config {e}") from None

    def check_num_layers(self, num_layers: int) -> None:
        """A per-layer score_scale must have one entry per attention layer."""
        if isinstance(self.score_scale, tuple) and len(self.score_scale) != num_layers:
            raise ValueError(f"DASH config score_scale has {len(self.score_scale)} entries but "
                             f"the model has {num_layers} attention layers")

    # ---------------------------------------------------------------- use
    @functools.cached_property
    def _layer_params(self) -> tuple:
        """One DashParams per score_scale entry (built once per config)."""
        scales = self.score_scale if isinstance(self.score_scale, tuple) else (self.score_scale,)
        knobs = {k: getattr(self, k) for k in DashParams.keys() if k != "score_scale"}
        knobs.update(alpha=_as_float(self.alpha), prior_weight=_as_float(self.prior_weight))
        return tuple(DashParams(score_scale=_as_float(s), **knobs) for s in scales)

    def params_for_layer(self, layer_index: int) -> DashParams:
        """The method's knobs for one attention layer (the same object on every call)."""
        per_layer = isinstance(self.score_scale, tuple)
        return self._layer_params[layer_index if per_layer else 0]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["score_scale"], tuple):
            d["score_scale"] = list(d["score_scale"])
        return d


def _as_float(v):
    """JSON ints (alpha 2, prior_weight 1) as floats; anything else unchanged (and
    rejected by DashParams with its rule)."""
    return float(v) if is_number(v) else v


def _load_scale_file(path: str) -> tuple:
    try:
        with open(os.path.expanduser(path)) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"DASH config score_scale_file={path!r} cannot be read ({e}); it must "
                         f"be {_DOC['score_scale_file'][0]}") from None
    scales = data.get("score_scale") if isinstance(data, dict) else None
    if not isinstance(scales, list) or not scales:
        raise ValueError(f"DASH config score_scale_file={path!r} must hold "
                         '{"score_scale": [one number per attention layer]}')
    return tuple(scales)


def config_help() -> str:
    """One line per key: name, default, allowed values, meaning."""
    defaults = DashConfig()
    lines = []
    for key in DashConfig.keys():
        allowed, text = _DOC[key]
        lines.append(f"{key} (default {getattr(defaults, key)!r}): {text}; {allowed}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=8)
def _engine_config(dash_json: str) -> DashConfig:
    return DashConfig.from_mapping(json.loads(dash_json))


def engine_config(additional_config: Optional[Mapping[str, Any]]) -> DashConfig:
    """The DashConfig of a vLLM ``additional_config``, parsed (and its files read) once per
    process and shared: the builder and every layer's Impl get the same object."""
    if isinstance(additional_config, str):
        additional_config = json.loads(additional_config)
    dash = None if additional_config is None else additional_config.get("dash")
    if dash is not None and not isinstance(dash, Mapping):
        return DashConfig.from_mapping(dash)             # raises the usual error
    return _engine_config(json.dumps(dash, sort_keys=True))
