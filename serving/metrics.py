"""DASH statistics on vLLM's Prometheus /metrics (names prefixed ``vllm_dash_``).

Loaded in every vLLM process through its own ``vllm.general_plugins`` entry point
(``dash_metrics = vllm_dash.serving.metrics:register``). In the first process (the API
server) it chooses the statistics file (``$VLLM_DASH_STATS_FILE``, inherited by the engine
and worker processes, which write samples to it: vllm_dash.stats) and registers a collector
in prometheus_client's default registry that reads the file at scrape time. Statistics are
sampled every ``stats_interval`` decode steps (DASH config; default 16, 0 turns them off).

Metrics (all gauges describe the latest sample; layers are attention-layer indices):
  vllm_dash_decode_density{layer}            selected tokens / context tokens
  vllm_dash_decode_density_mean              mean of the above over layers
  vllm_dash_selected_blocks_per_head{layer}  selected blocks per (sequence, KV head)
  vllm_dash_sample_num_seqs                  decode sequences in the sample
  vllm_dash_sample_context_tokens_mean       their mean context length
  vllm_dash_stats_age_seconds                time since the sample was taken
  vllm_dash_stats_samples_total              samples taken (counter)
  vllm_dash_selected_tokens_total            selected tokens, all sampled steps, layers and KV heads (counter)
  vllm_dash_context_tokens_total             context tokens, same scope (counter)
Not exported with several API servers (PROMETHEUS_MULTIPROC_DIR): vLLM then serves a
multiprocess registry that custom collectors do not reach.
"""
from __future__ import annotations

import atexit
import json
import os
import tempfile
import time

STATS_FILE_ENV = "VLLM_DASH_STATS_FILE"   # same name as vllm_dash.stats.STATS_FILE_ENV
METRIC_NAMES = (
    "vllm_dash_decode_density", "vllm_dash_decode_density_mean",
    "vllm_dash_selected_blocks_per_head", "vllm_dash_sample_num_seqs",
    "vllm_dash_sample_context_tokens_mean", "vllm_dash_stats_age_seconds",
    "vllm_dash_stats_samples", "vllm_dash_selected_tokens", "vllm_dash_context_tokens",
)

_registered = False


def read_stats(path: str | None = None) -> dict | None:
    path = path or os.environ.get(STATS_FILE_ENV)
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class DashCollector:
    """prometheus_client collector over the statistics file."""

    def __init__(self, path: str | None = None):
        self.path = path

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        data = read_stats(self.path)
        if not data:
            return
        for name, text, key in _PER_LAYER:
            g = GaugeMetricFamily(name, text, labels=["layer"])
            for i, value in enumerate(data.get(key) or []):
                g.add_metric([str(i)], value)
            yield g
        dens = data.get("density") or []
        if dens:
            yield GaugeMetricFamily("vllm_dash_decode_density_mean",
                                    "DASH: decode density averaged over layers (latest sample)",
                                    value=sum(dens) / len(dens))
        yield GaugeMetricFamily("vllm_dash_stats_age_seconds",
                                "DASH: seconds since the latest sample",
                                value=max(0.0, time.time() - data.get("time", time.time())))
        for kind, name, text, key in _SCALARS:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(name, text, value=data.get(key, 0))


_PER_LAYER = (
    ("vllm_dash_decode_density",
     "DASH: selected tokens / context tokens of decode steps (latest sample)", "density"),
    ("vllm_dash_selected_blocks_per_head",
     "DASH: selected blocks per (sequence, KV head) (latest sample)", "selected_blocks_per_head"),
)
_SCALARS = (
    ("gauge", "vllm_dash_sample_num_seqs", "DASH: decode sequences in the latest sample",
     "num_seqs"),
    ("gauge", "vllm_dash_sample_context_tokens_mean",
     "DASH: mean context length in the latest sample", "context_tokens_mean"),
    ("counter", "vllm_dash_stats_samples", "DASH: statistics samples taken", "samples"),
    ("counter", "vllm_dash_selected_tokens",
     "DASH: selected tokens over sampled steps, layers, KV heads", "selected_tokens_total"),
    ("counter", "vllm_dash_context_tokens",
     "DASH: context tokens over sampled steps, layers, KV heads", "context_tokens_total"),
)


def register() -> None:
    """vLLM general plugin (every process; idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    if not os.environ.get(STATS_FILE_ENV):
        fd, path = tempfile.mkstemp(prefix="vllm-dash-stats-", suffix=".json")
        os.close(fd)
        os.unlink(path)                 # written by the workers when they have a sample
        os.environ[STATS_FILE_ENV] = path
        atexit.register(_remove, path)
    try:
        from prometheus_client import REGISTRY
        REGISTRY.register(DashCollector())
    except Exception:                   # no prometheus_client / already registered
        pass


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
