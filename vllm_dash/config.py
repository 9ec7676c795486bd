"""DashConfig: the DASH settings of a serving process, parsed from vLLM's
``--additional-config '{"dash": {...}}'`` and validated at startup.

The method's knobs are those of :class:`vllm_dash.kernels.params.DashParams` (with the
serving defaults chosen from the accuracy record); DashConfig adds the serving concerns:
unknown keys, help text, a per-layer score_scale, score_scale_file, stats_interval, and the
engine-level summary settings (``summary`` may be "auto"; ``summary_file``). It hands out one
validated DashParams per attention layer (:meth:`DashConfig.params_for_layer`), built once.
:func:`engine_config` parses a vLLM config's DASH settings once per process (a
score_scale_file is read once, not once per layer).

``summary="auto"`` is resolved at engine start, where the model is known
(vllm_dash.summary_source.engine_summaries, called through compat.engine_summaries by the
page padding, the builder and every layer's Impl): :meth:`DashConfig.resolve_summary` turns it
into "attn_pool" when pooling vectors exist (summary_file, or the checkpoint's indexer_q) and
into :data:`TRAINING_FREE_SUMMARY` otherwise. An unresolved "auto" config (no model known, e.g.
in tests or the recall harness without vectors) builds its DashParams with
TRAINING_FREE_SUMMARY, which is what "auto" means when no vectors are given.

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

from vllm_dash.kernels.params import RULES, SUMMARY_KINDS, DashParams, is_number
from vllm_dash.layout import SUPPORTED_BLOCK_SIZES

__all__ = ["DashConfig", "SUPPORTED_BLOCK_SIZES", "SUMMARY_CHOICES", "TRAINING_FREE_SUMMARY",
           "config_help", "engine_config"]

#: The summary kind "auto" becomes when no pooling vectors are available: the training-free
#: default, chosen by the summary-kind step of `vllm-dash eval-report` (eval/targets.py) from
#: benchmarks/results/accuracy-smollm2-135m-instruct-learned.json: the shipped settings on
#: Quest's min/max summaries Pareto-dominate them on mean summaries (more accurate at lower
#: measured density at 2K, 4K and 8K; confirmed on another seed: ...-learned-confirm.json).
TRAINING_FREE_SUMMARY = "minmax"
#: Allowed values of the ``summary`` key.
SUMMARY_CHOICES = ("auto",) + tuple(SUMMARY_KINDS)

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
    "summary": "block summary kind (engine-level: fixes the KV page size): mean key; minmax = "
               "Quest's per-channel bounds (twice the bytes); attn_pool = keys pooled by "
               "learned per-(layer, KV head) vectors; auto = attn_pool when summary_file is "
               f"given or the checkpoint ships indexer_q, else {TRAINING_FREE_SUMMARY}",
    "summary_file": "pooling vectors for attn_pool (`vllm-dash distill` output); its "
                    "score_scale tensor, if any, is checked and ignored",
}
_ALLOWED = {
    **RULES,
    "score_scale": RULES["score_scale"] + ", or a list with one such number per attention "
                   "layer",
    "score_scale_file": 'a path to a JSON file {"score_scale": [one number per attention '
                        'layer]}',
    "stats_interval": "an integer >= 0",
    "summary": f"one of {list(SUMMARY_CHOICES)}",
    "summary_file": "null or a path to a safetensors file with tensor pool: fp32 [layers, KV "
                    "heads, head_size] (only with summary auto or attn_pool)",
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
    summary: str = "auto"
    summary_file: Optional[str] = None

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
        self._validate_summary(bad)
        try:
            self._layer_params
        except ValueError as e:          # DashParams names the key and its allowed values
            raise ValueError(f"DASH config {e}") from None

    def _validate_summary(self, bad) -> None:
        if not isinstance(self.summary, str) or self.summary not in SUMMARY_CHOICES:
            raise bad("summary", self.summary)
        path = self.summary_file
        if path is None:
            return
        if not isinstance(path, str) or not path:
            raise bad("summary_file", path)
        if self.summary not in ("auto", "attn_pool"):
            raise ValueError(f"DASH config summary_file={path!r} is invalid with summary="
                             f"{self.summary!r}: must be null unless summary is 'auto' or "
                             f"'attn_pool'")
        if not os.path.isfile(os.path.expanduser(path)):
            raise ValueError(f"DASH config summary_file={path!r} is not a file: must be "
                             f"{_DOC['summary_file'][0]}")

    def resolve_summary(self, has_pool: bool) -> "DashConfig":
        """This config with a concrete summary kind: "auto" -> "attn_pool" when pooling
        vectors are available (``has_pool``), else TRAINING_FREE_SUMMARY. "attn_pool" without
        vectors is an error. Called at engine start (summary_source.engine_summaries)."""
        kind = self.summary
        if kind == "auto":
            kind = "attn_pool" if has_pool else TRAINING_FREE_SUMMARY
        elif kind == "attn_pool" and not has_pool:
            raise ValueError("DASH config summary='attn_pool' needs pooling vectors: give "
                             "summary_file, or serve a checkpoint that ships "
                             "model.layers.{i}.self_attn.indexer_q")
        return self if kind == self.summary else dataclasses.replace(self, summary=kind)

    def runtime_change(self, new: "DashConfig", *, has_pool: bool) -> "DashConfig":
        """``new`` resolved, to replace this (resolved) engine config in a running engine;
        ValueError if it would change an engine-level setting: the summary kind it resolves
        to, or summary_file."""
        resolved = new.resolve_summary(has_pool)
        if resolved.summary != self.summary or new.summary_file != self.summary_file:
            raise ValueError(
                f"DASH config summary={new.summary!r} (-> {resolved.summary!r}), summary_file="
                f"{new.summary_file!r} cannot replace the engine's summary={self.summary!r}, "
                f"summary_file={self.summary_file!r}: the summary kind is an engine setting "
                f"(KV page size, cache contents); start a new engine to change it")
        return resolved

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
        knobs.update(alpha=_as_float(self.alpha), prior_weight=_as_float(self.prior_weight),
                     summary=self.summary_kind)
        return tuple(DashParams(score_scale=_as_float(s), **knobs) for s in scales)

    @property
    def summary_kind(self) -> str:
        """The concrete summary kind of the layers' DashParams ("auto" unresolved: the
        training-free default)."""
        return TRAINING_FREE_SUMMARY if self.summary == "auto" else self.summary

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
