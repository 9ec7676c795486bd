"""Capture a Hugging Face causal LM's post-RoPE queries and keys, per attention layer.

`vllm-dash distill` fits block summaries to the model's own dense attention, and the
attention-recall metric scores selections against it; both need, per attention layer, the
keys of every token (as the KV cache would hold them: after RoPE, before GQA expansion) and
the queries of a few sampled decode positions. A decode query at position p attends to the
tokens 0..p, which is exactly row p of a causal prefill, so one prefill forward per text
window gives all of them.

How: a custom attention function is registered with transformers' ``AttentionInterface``
(and the sdpa mask with ``AttentionMaskInterface``) under the name :data:`CAPTURE_IMPL`,
and the model is loaded with ``attn_implementation=CAPTURE_IMPL``. The function records
query/key of the active :class:`Recorder` and then computes the ordinary attention
(transformers' sdpa path), so the forward is unchanged. Any model whose attention layers
call the interface (Llama, Qwen, Mistral, ... in transformers 5) works; layers are numbered
in call order, which is model order. Only the sampled queries are kept (memory: the keys,
L * Hk * T * D values per window, dominate).

Device: "cpu" (fp32 weights) or "cuda" (bf16 weights; keys are kept as the model computes
them, i.e. in the cache dtype, and cast to fp32 where used).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["CAPTURE_IMPL", "Capture", "Recorder", "resolve_model", "load_model",
           "capture", "sample_positions", "dense_block_mass", "DEVICES"]

CAPTURE_IMPL = "vllm_dash_capture"
DEVICES = ("cpu", "cuda")


@dataclass
class Capture:
    """One window's capture. keys[l]: [Hk, T, D] (model dtype); queries[l]: [Hq, P, D] at
    ``positions`` [P] (ascending token indices); scales[l]: the layer's softmax scale."""
    keys: list = field(default_factory=list)
    queries: list = field(default_factory=list)
    scales: list = field(default_factory=list)
    positions: Optional[torch.Tensor] = None

    @property
    def num_layers(self) -> int:
        return len(self.keys)


class Recorder:
    """Collects one forward's queries (at ``positions``) and keys, layer by layer."""

    def __init__(self, positions: torch.Tensor):
        self.out = Capture(positions=positions)

    def record(self, module, query: torch.Tensor, key: torch.Tensor, scaling) -> None:
        # query [1, Hq, T, D], key [1, Hk, T, D] (post-RoPE, not repeated for GQA)
        pos = self.out.positions.to(query.device)
        self.out.queries.append(query[0].index_select(1, pos).detach().clone())
        self.out.keys.append(key[0].detach().clone())
        D = query.shape[-1]
        self.out.scales.append(float(scaling) if scaling is not None else D ** -0.5)


_ACTIVE: list = []          # the recorder of the forward in progress (at most one)


def _capture_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """The registered attention: record, then transformers' ordinary sdpa attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _ACTIVE:
        _ACTIVE[-1].record(module, query, key, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPL, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_IMPL, sdpa_mask)


def resolve_model(model) -> str:
    """A model folder: None or the embedded model's name means the default model
    (serving.models.default_model_dir(), converted once); otherwise an existing folder."""
    from vllm_dash.serving.models import DEFAULT_MODEL_NAME, default_model_dir

    if model is None or str(model) == DEFAULT_MODEL_NAME:
        return str(default_model_dir())
    path = os.path.expanduser(str(model))
    if not os.path.isdir(path):
        raise ValueError(f"model={model!r} is invalid: must be a Hugging Face model folder "
                         f"or {DEFAULT_MODEL_NAME!r} (the embedded default)")
    return path


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is invalid: must be one of {list(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' is invalid here: no CUDA device is visible "
                         "(use 'cpu')")
    return device


def load_model(model, device: str = "cpu"):
    """(model, tokenizer) with the capturing attention; eval mode, no gradients."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model)
    check_device(device)
    _register()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                              attn_implementation=CAPTURE_IMPL)
    lm.to(device).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    return lm, tok


def capture(lm, input_ids, positions) -> Capture:
    """One prefill of ``input_ids`` ([T] ints); queries kept at ``positions``."""
    device = next(lm.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    if pos.numel() == 0 or int(pos.min()) < 0 or int(pos.max()) >= ids.shape[1]:
        raise ValueError(f"positions must be in [0, {ids.shape[1] - 1}], got {pos.tolist()}")
    rec = Recorder(pos.sort().values)
    _ACTIVE.append(rec)
    try:
        with torch.inference_mode():
            try:               # the LM head on the last token only (no [T, vocab] logits)
                lm(input_ids=ids, use_cache=False, logits_to_keep=1)
            except TypeError:
                lm(input_ids=ids, use_cache=False)
    finally:
        _ACTIVE.remove(rec)
    if not rec.out.keys:
        raise RuntimeError("no attention layer called the capturing attention function: "
                           "this model does not use transformers' AttentionInterface")
    return rec.out


def sample_positions(length: int, count: int, generator: torch.Generator, *,
                     low: int) -> torch.Tensor:
    """``count`` distinct decode positions in [low, length - 1], ascending (all of them
    when there are fewer)."""
    low = max(0, min(int(low), length - 1))
    span = length - low
    if count >= span:
        return torch.arange(low, length)
    return (low + torch.randperm(span, generator=generator)[:count]).sort().values


def dense_block_mass(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *,
                     block_size: int, scale: float) -> torch.Tensor:
    """The dense attention mass per block of one window's decode queries: fp32
    [P, Hq, n], n = ceil(T / B). q [Hq, P, D] at ``positions`` (query p attends to keys
    0..p); k [Hk, T, D]. The values of kernels/recall.block_mass for the sequences
    k[:, :p + 1] (a test checks), computed without a copy of the keys per position."""
    Hq, P, D = q.shape
    Hk, T, _ = k.shape
    G = Hq // Hk
    logits = scale * torch.einsum("hgpd,htd->hgpt", q.float().view(Hk, G, P, D), k.float())
    future = torch.arange(T, device=q.device)[None, :] > positions.to(q.device)[:, None]
    a = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)     # [Hk, G, P, T]
    n = -(-T // block_size)
    a = torch.nn.functional.pad(a, (0, n * block_size - T))
    return a.view(Hq, P, n, block_size).sum(-1).transpose(0, 1)
