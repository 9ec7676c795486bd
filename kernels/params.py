"""DashParams: the method's knobs, one frozen value validated in one place.

Every reference function, kernel wrapper and test oracle takes ``params: DashParams``; the
kernels themselves check tensor shapes only. The serving side (vllm_dash.config.DashConfig)
builds one DashParams per attention layer, once per process, and hands it out with
``params_for_layer(i)``. Adding a knob: a field here, its rule in ``RULES`` (the allowed
values, used by every error message, the CLI help and the README table), and the code that
reads it.

The field defaults are the method's neutral form (one global score scale of 1, full prior,
no forced blocks, no floor); the serving defaults chosen from the accuracy record live in
DashConfig. No vLLM import here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["DashParams", "RULES", "SCORE_NORMS", "PRIOR_NORMS", "SELECTORS", "SUMMARY_KINDS",
           "is_number", "summary_dim"]

SCORE_NORMS = ("none", "standardize")
PRIOR_NORMS = ("none", "max")
#: "entmax": DASH (entmax support, plus forced and floor blocks). "topk": the baseline that
#: keeps only the forced blocks and each head's min_blocks highest scores (union over the
#: GQA group), all with prior 1 (Quest / InfLLM-v2 style top-k on the same summaries).
SELECTORS = ("entmax", "topk")
#: What a block's summary holds and how stage 1 scores it (reference_summaries.py):
#: "mean": the mean key, u = scale * q . kbar; "minmax": per-channel min and max of the keys
#: (Quest), u = scale * sum_d max(q_d min_d, q_d max_d), an upper bound of the block's best
#: logit (twice the bytes); "attn_pool": the keys pooled by softmax(pool_h . k / sqrt(D)) with
#: a learned per-(layer, KV head) vector pool_h (DashAttention's indexer_q), scored like mean.
SUMMARY_KINDS = ("mean", "minmax", "attn_pool")

#: key -> the allowed values, in words: the one source for error messages and help.
RULES = {
    "alpha": "a number in (1, 2] (1 would be softmax, which has no sparse support; "
             "2 is sparsemax)",
    "score_scale": "a finite number >= 0",
    "score_norm": f"one of {list(SCORE_NORMS)}",
    "prior_weight": "a number in [0, 1]",
    "prior_norm": f"one of {list(PRIOR_NORMS)}",
    "sink_blocks": "an integer >= 0",
    "local_blocks": "an integer >= 0",
    "min_blocks": "an integer >= 0 (>= 1 with selector 'topk': it is the k)",
    "max_blocks": "null or an integer >= sink_blocks + max(local_blocks, 1)",
    "dense_below": "an integer >= 0 (tokens)",
    "selector": f"one of {list(SELECTORS)}",
    "summary": f"one of {list(SUMMARY_KINDS)}",
}


def summary_dim(summary: str, head_size: int) -> int:
    """Last dimension of a block summary of this kind: 2 * D for "minmax" (min, then max),
    D otherwise."""
    if summary not in SUMMARY_KINDS:
        raise ValueError(f"summary={summary!r} is invalid: must be {RULES['summary']}")
    return 2 * head_size if summary == "minmax" else head_size


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A real number (bools are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class DashParams:
    """The knobs of DASH's selection (stage 1) and prior (stage 2); see reference.py."""
    alpha: float = 1.5
    score_scale: float = 1.0
    score_norm: str = "none"
    prior_weight: float = 1.0
    prior_norm: str = "none"
    sink_blocks: int = 0
    local_blocks: int = 0
    min_blocks: int = 0
    max_blocks: Optional[int] = None
    dense_below: int = 0
    selector: str = "entmax"
    summary: str = "mean"

    def __post_init__(self):
        self.validate()          # every DashParams that exists is valid

    @classmethod
    def keys(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> "DashParams":
        """A (validated) copy with some knobs changed."""
        return dataclasses.replace(self, **changes)

    def bad_key(self) -> Optional[str]:
        """The first key whose value breaks its rule, or None."""
        a = self.alpha
        if not is_number(a) or not (1.0 < a <= 2.0):
            return "alpha"
        s = self.score_scale
        if not is_number(s) or not math.isfinite(s) or s < 0:
            return "score_scale"
        w = self.prior_weight
        if not is_number(w) or not (0.0 <= w <= 1.0):
            return "prior_weight"
        for key in ("sink_blocks", "local_blocks", "min_blocks", "dense_below"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 0:
                return key
        mb = self.max_blocks
        if mb is not None and (not _is_int(mb)
                               or mb < self.sink_blocks + max(self.local_blocks, 1)):
            return "max_blocks"
        for key, values in (("score_norm", SCORE_NORMS), ("prior_norm", PRIOR_NORMS),
                            ("selector", SELECTORS), ("summary", SUMMARY_KINDS)):
            if getattr(self, key) not in values:
                return key
        if self.selector == "topk" and self.min_blocks < 1:
            return "min_blocks"
        return None

    def validate(self) -> "DashParams":
        """Raise ValueError naming the first bad key, its value and the allowed values;
        return self. Runs when the value is built, so holders never need to call it."""
        key = self.bad_key()
        if key is not None:
            raise ValueError(f"{key}={getattr(self, key)!r} is invalid: must be {RULES[key]}")
        return self
