"""DashConfig: the DASH settings, parsed once from vLLM's
``--additional-config '{"dash": {...}}'`` and validated at startup.

Unknown keys and out-of-range values raise ``ValueError`` with the key and its allowed
values, so a bad setting stops the server before it serves anything. No vLLM import here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from vllm_dash.kernels.reference import PRIOR_NORMS, SCORE_NORMS, SELECTORS, validate_dash_args

__all__ = ["DashConfig", "SUPPORTED_BLOCK_SIZES", "config_help"]

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)

# key -> (allowed values in words, help). Kept beside the dataclass so that error messages,
# the README table and CLI help come from one place.
_DOC = {
    "alpha": ("a number in (1, 2]", "entmax alpha (1.5: entmax15, 2: sparsemax)"),
    "score_scale": ("a number >= 0, or a list with one number >= 0 per attention layer",
                    "sparsity knob: block scores are multiplied by it (0 = every block)"),
    "score_scale_file": ("a path to a JSON file {\"score_scale\": [one number per "
                         "attention layer]}",
                         "per-layer score_scale from a calibration run"),
    "prior_weight": ("a number in [0, 1]", "weight of log-prior in stage 2 (0 = flat)"),
    "sink_blocks": ("an integer >= 0", "first blocks of every sequence always attended"),
    "local_blocks": ("an integer >= 0", "last blocks (incl. the current one) always attended"),
    "min_blocks": ("an integer >= 0", "per-head floor: that many top-scoring blocks kept"),
    "max_blocks": ("null or an integer >= sink_blocks + max(local_blocks, 1)",
                   "hard cap on attended blocks per (sequence, KV head)"),
    "dense_below": ("an integer >= 0 (tokens)", "shorter sequences attend densely"),
    "stats_interval": ("an integer >= 0", "sample decode statistics (vllm_dash_* metrics) "
                       "every that many steps; 0 = off"),
    "score_norm": (f"one of {list(SCORE_NORMS)}", "standardize scores per head before entmax"),
    "prior_norm": (f"one of {list(PRIOR_NORMS)}", "normalise the prior by its max"),
    "selector": (f"one of {list(SELECTORS)}",
                 "entmax = DASH; topk = baseline: only forced blocks + min_blocks per head"),
}


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
        def bad(key, value):
            allowed, _ = _DOC[key]
            return ValueError(f"DASH config {key}={value!r} is invalid: must be {allowed}")

        for key in ("sink_blocks", "local_blocks", "min_blocks", "dense_below", "stats_interval"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(key, v)
        mb = self.max_blocks
        if mb is not None and (not isinstance(mb, int) or isinstance(mb, bool)
                               or mb < self.sink_blocks + max(self.local_blocks, 1)):
            raise bad("max_blocks", mb)
        for key, values in (("score_norm", SCORE_NORMS), ("prior_norm", PRIOR_NORMS),
                            ("selector", SELECTORS)):
            if getattr(self, key) not in values:
                raise bad(key, getattr(self, key))
        if not _is_number(self.alpha) or not (1.0 < self.alpha <= 2.0):
            raise bad("alpha", self.alpha)
        if not _is_number(self.prior_weight) or not (0.0 <= self.prior_weight <= 1.0):
            raise bad("prior_weight", self.prior_weight)
        scales = self.score_scale if isinstance(self.score_scale, tuple) else (self.score_scale,)
        if not scales or any(not _is_number(s) or not math.isfinite(s) or s < 0 for s in scales):
            raise bad("score_scale", self.score_scale)
        if self.score_scale_file is not None and not isinstance(self.score_scale_file, str):
            raise bad("score_scale_file", self.score_scale_file)
        # the same rules the kernels enforce (one source of truth)
        validate_dash_args(block_size=16, alpha=float(self.alpha), score_scale=float(scales[0]),
                           prior_weight=float(self.prior_weight), sink_blocks=self.sink_blocks,
                           local_blocks=self.local_blocks, max_blocks=self.max_blocks,
                           min_blocks=self.min_blocks, dense_below=self.dense_below,
                           score_norm=self.score_norm, prior_norm=self.prior_norm,
                           selector=self.selector)

    def check_num_layers(self, num_layers: int) -> None:
        """A per-layer score_scale must have one entry per attention layer."""
        if isinstance(self.score_scale, tuple) and len(self.score_scale) != num_layers:
            raise ValueError(f"DASH config score_scale has {len(self.score_scale)} entries but "
                             f"the model has {num_layers} attention layers")

    # ---------------------------------------------------------------- use
    def layer_score_scale(self, layer_index: int) -> float:
        if isinstance(self.score_scale, tuple):
            return float(self.score_scale[layer_index])
        return float(self.score_scale)

    def kernel_kwargs(self, layer_index: int = 0) -> dict:
        """Keyword arguments of the reference / kernel entry points for one layer."""
        return dict(alpha=float(self.alpha), score_scale=self.layer_score_scale(layer_index),
                    sink_blocks=self.sink_blocks, local_blocks=self.local_blocks,
                    max_blocks=self.max_blocks, min_blocks=self.min_blocks,
                    dense_below=self.dense_below, score_norm=self.score_norm,
                    prior_norm=self.prior_norm, selector=self.selector)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["score_scale"], tuple):
            d["score_scale"] = list(d["score_scale"])
        return d


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
