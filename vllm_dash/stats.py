"""DASH decode statistics without a host sync in the decode step.

Per decode step and layer, the step's per-(sequence, KV head) selected-block counts land in a
buffer allocated once: on GPU the selection kernel writes them there as a second output, on
CPU the impl copies them (captured in CUDA graphs like the rest of the step). Every
``stats_interval`` steps the builder (host side, between steps) enqueues an asynchronous
copy of those buffers to pinned host memory with an event, and turns the previous sample into
numbers once its event has completed — no synchronisation.

Samples are summed in this process (:meth:`DashStats.snapshot`, used by offline runs and
tests) and written atomically as JSON to ``$VLLM_DASH_STATS_FILE`` (set by ``register()`` in
the API-server process, inherited by the engine and worker processes), which the Prometheus
collector of :mod:`vllm_dash.serving.metrics` reads at scrape time.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Optional

import torch

STATS_FILE_ENV = "VLLM_DASH_STATS_FILE"


class DashStats:
    def __init__(self):
        self.counts: Optional[torch.Tensor] = None      # int32 [layers, max_seqs, Hk]
        self.lens: Optional[torch.Tensor] = None        # int32 [max_seqs]
        self.block_size = 0
        self._pending = None
        self.reset()

    # ----------------------------------------------------------------- device side
    def allocate(self, *, num_layers: int, max_num_seqs: int, num_kv_heads: int,
                 block_size: int, device) -> None:
        """Buffers, once per process (before CUDA-graph capture)."""
        if self.counts is not None and self.counts.shape == (num_layers, max_num_seqs,
                                                             num_kv_heads):
            return
        self.counts = torch.zeros(num_layers, max_num_seqs, num_kv_heads, dtype=torch.int32,
                                  device=device)
        self.lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.block_size = block_size
        pin = torch.device(device).type == "cuda"
        self._host_counts = torch.zeros(self.counts.shape, dtype=torch.int32, pin_memory=pin)
        self._host_lens = torch.zeros(self.lens.shape, dtype=torch.int32, pin_memory=pin)

    def record(self, layer_idx: int, counts: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """In the step (one copy per layer; layer 0 also copies the lengths)."""
        S = counts.shape[0]
        self.counts[layer_idx, :S].copy_(counts[:S], non_blocking=True)
        self.record_lens(layer_idx, seq_lens[:S])

    def counts_out(self, layer_idx: int) -> Optional[torch.Tensor]:
        """The layer's row of the counts buffer, int32 [max_seqs, Hk], for a kernel that
        writes the counts there itself (then only :meth:`record_lens` is called); None
        before :meth:`allocate`."""
        return None if self.counts is None else self.counts[layer_idx]

    def record_lens(self, layer_idx: int, seq_lens: torch.Tensor) -> None:
        """In the step, layer 0 only: copy the step's context lengths."""
        if layer_idx == 0:
            S = seq_lens.shape[0]
            self.lens[:S].copy_(seq_lens[:S], non_blocking=True)

    # ----------------------------------------------------------------- host side
    def sample(self, num_decodes: int) -> None:
        """Between steps: finish the previous sample if its copy is done, start a new one
        of the last completed step (``num_decodes`` sequences)."""
        if self.counts is None:
            return
        if self.counts.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        self._finish(block=False)
        if self._discard:                  # the step before a reset() belongs to the old run
            self._discard = False
            return
        if self._pending is not None or num_decodes <= 0:
            return
        S = num_decodes
        self._host_counts[:, :S].copy_(self.counts[:, :S], non_blocking=True)
        self._host_lens[:S].copy_(self.lens[:S], non_blocking=True)
        event = None
        if self.counts.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending = (S, event)

    def _finish(self, block: bool) -> None:
        if self._pending is None:
            return
        S, event = self._pending
        if event is not None:
            if block:
                event.synchronize()
            elif not event.query():
                return
        self._pending = None
        counts = self._host_counts[:, :S].double()                 # [L, S, Hk]
        lens = self._host_lens[:S].double()
        valid = lens > 0
        if not bool(valid.any()):
            return
        counts, lens = counts[:, valid], lens[valid]
        B = self.block_size
        n = torch.ceil(lens / B)
        # the current (partial) block is always selected: subtract its empty slots
        sel = (counts * B - (n * B - lens)[None, :, None]).sum((1, 2))   # [L]
        ctx = float(lens.sum()) * counts.shape[2]
        rows = counts.shape[1] * counts.shape[2]
        sel = sel.tolist()                         # host accumulation in plain floats
        blocks = counts.sum((1, 2)).tolist()
        if len(self.sum_selected) != len(sel):
            self.sum_selected = [0.0] * len(sel)
            self.sum_blocks = [0.0] * len(sel)
        self.samples += 1
        self.last = {"time": time.time(), "num_seqs": int(lens.numel()),
                     "context_tokens_mean": float(lens.mean()),
                     "density": [x / ctx for x in sel],
                     "selected_blocks_per_head": [b / rows for b in blocks]}
        self.sum_selected = [a + b for a, b in zip(self.sum_selected, sel)]
        self.sum_context += ctx
        self.sum_blocks = [a + b for a, b in zip(self.sum_blocks, blocks)]
        self._write()

    def _write(self) -> None:
        path = os.environ.get(STATS_FILE_ENV)
        if not path:
            return
        data = dict(self.last, samples=self.samples,
                    selected_tokens_total=sum(self.sum_selected),
                    context_tokens_total=float(self.sum_context) * len(self.last["density"]),
                    selected_blocks_total=sum(self.sum_blocks))
        try:
            d = os.path.dirname(path) or "."
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".vllm-dash-stats-")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError:
            pass                       # statistics never break serving

    def reset(self) -> None:
        """Start over (e.g. between the runs of an evaluation): drop the totals, a pending
        copy and the not yet sampled last step of the previous run."""
        self._pending = None
        self._discard = self.counts is not None
        self.samples = 0
        self.last = None
        self.sum_selected: list = []
        self.sum_context = 0.0
        self.sum_blocks: list = []

    def snapshot(self) -> dict:
        """Per layer: density and selected blocks per (sequence, KV head) over all samples
        of this process (waits for the last pending sample)."""
        self._finish(block=True)
        out = {}
        if self.samples == 0:
            return out
        for layer in range(len(self.sum_selected)):
            out[layer] = {"density": self.sum_selected[layer] / self.sum_context,
                          "selected_tokens": self.sum_selected[layer],
                          "context_tokens": self.sum_context,
                          "selected_blocks": self.sum_blocks[layer]}
        return out


#: this process's statistics (filled when the DASH config's stats_interval > 0)
STATS = DashStats()
