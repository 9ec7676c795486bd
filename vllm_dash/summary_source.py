"""Where attn_pool's pooling vectors come from, and the engine's resolved summary settings.

Two sources, both read once per process, both checked against the model at engine start:

* ``summary_file`` (written by ``vllm-dash distill``): safetensors, tensor ``pool`` fp32
  [L, Hk, D] (L = the model's attention layers in model order, Hk = its KV heads, D = head
  size), optional ``score_scale`` fp32 [L, Hk]. The score scale is shape-checked and then
  ignored: a per-(layer, KV head) scale is not implemented in the kernels, and under the
  default score_norm "standardize" a positive per-head scale cancels out anyway.
* the checkpoint itself: official DashAttention checkpoints ship one tensor per layer,
  ``model.layers.{i}.self_attn.indexer_q`` [Hk * D] (bf16), the same pooling query as a
  ``pool`` row. They are read from the model folder's ``*.safetensors`` (through
  ``model.safetensors.index.json`` when there is one). vLLM's weight loader would reject
  them as unknown parameters; compat.install_checkpoint_filter drops them from its stream.

A shape mismatch is a one-line ValueError naming the file, the tensor and both shapes.
:func:`engine_summaries` resolves ``summary="auto"`` (config.DashConfig.resolve_summary)
and returns the pooling vectors as fp32 CPU [L, Hk, D] (None unless the resolved kind is
attn_pool); the backend moves each layer's rows to the layer's device. No vLLM import here.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from vllm_dash.config import DashConfig

__all__ = ["FORMAT", "ModelShape", "EngineSummaries", "is_checkpoint_pool_name",
           "checkpoint_pool_names", "read_checkpoint_pool", "read_summary_file",
           "checked_file_pool", "engine_summaries"]

logger = logging.getLogger("vllm.vllm_dash")

#: The ``format`` metadata value of a summary file (checked when present).
FORMAT = "vllm-dash-summaries/1"
_CHECKPOINT_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.indexer_q$")


@dataclass(frozen=True)
class ModelShape:
    """What the pooling vectors must fit: attention layers, total KV heads, head size."""
    num_layers: int
    num_kv_heads: int
    head_size: int


@dataclass(frozen=True, eq=False)
class EngineSummaries:
    """An engine's summary settings after resolution: ``config.summary`` is a concrete kind;
    ``pool`` fp32 CPU [L, Hk, D] for attn_pool (else None); ``source`` says where it came
    from (for logs and errors)."""
    config: DashConfig
    pool: Optional[torch.Tensor] = None
    source: Optional[str] = None
    _on_device: dict = field(default_factory=dict, repr=False)

    def layer_pool(self, layer: int, first_head: int, num_heads: int,
                   device) -> Optional[torch.Tensor]:
        """One layer's pooling vectors, heads [first_head, first_head + num_heads) (this
        tensor-parallel rank's), fp32 [num_heads, D] on ``device``; None without vectors.
        Copied once per (layer, heads, device): the builder asks for every layer at start-up,
        so no host-to-device copy happens inside a forward (or a CUDA-graph capture)."""
        if self.pool is None:
            return None
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (layer, first_head, num_heads, str(device))
        if key not in self._on_device:
            rows = self.pool[layer, first_head:first_head + num_heads]
            self._on_device[key] = rows.to(device=device, dtype=torch.float32).contiguous()
        return self._on_device[key]


def _shape_error(path, tensor: str, got, want) -> ValueError:
    return ValueError(f"DASH pooling vectors in {path}: tensor {tensor!r} has shape "
                      f"{list(got)} but the model needs {list(want)}")


# ------------------------------------------------------------------ summary_file
@functools.lru_cache(maxsize=4)
def read_summary_file(path: str) -> tuple:
    """(pool, score_scale or None, metadata) of a summary file, read once per process.
    Shapes are not checked here (see :func:`checked_file_pool`)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(os.path.expanduser(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if "pool" not in names:
                raise ValueError(f"DASH summary_file {path!r} has no tensor 'pool' (tensors: "
                                 f"{sorted(names)}); it must hold pool: fp32 [layers, KV "
                                 f"heads, head_size]")
            pool = f.get_tensor("pool")
            scale = f.get_tensor("score_scale") if "score_scale" in names else None
    except (OSError, RuntimeError, SafetensorError) as e:     # missing, not safetensors
        msg = str(e).replace("\n", " ")
        raise ValueError(f"DASH summary_file {path!r} cannot be read as safetensors "
                         f"({msg})") from None
    fmt = meta.get("format")
    if fmt is not None and fmt != FORMAT:
        raise ValueError(f"DASH summary_file {path!r} has format {fmt!r}; this version reads "
                         f"{FORMAT!r}")
    return pool, scale, meta


def checked_file_pool(path: str, shape: Optional[ModelShape]) -> torch.Tensor:
    """A summary file's ``pool`` as fp32 [L, Hk, D], checked against ``shape`` (None: the
    model is unknown, only its rank is checked) and for finite values: the one reader the
    engine and the eval tools share."""
    pool, scale, _ = read_summary_file(path)
    if shape is not None:
        want = (shape.num_layers, shape.num_kv_heads, shape.head_size)
        if tuple(pool.shape) != want:
            raise _shape_error(path, "pool", pool.shape, want)
        if scale is not None and tuple(scale.shape) != want[:2]:
            raise _shape_error(path, "score_scale", scale.shape, want[:2])
    if pool.dim() != 3:
        raise _shape_error(path, "pool", pool.shape, ("layers", "kv_heads", "head_size"))
    if scale is not None:
        logger.info("DASH summary_file %s: score_scale is ignored (per-(layer, KV head) "
                    "stage-1 scales are not implemented; under score_norm 'standardize' a "
                    "positive per-head scale cancels anyway)", path)
    return _finite(pool.float(), path, "pool")


def _finite(t: torch.Tensor, path, name: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise ValueError(f"DASH pooling vectors in {path}: tensor {name!r} has non-finite "
                         f"values")
    return t.contiguous()


# ------------------------------------------------------------------ checkpoint
def is_checkpoint_pool_name(name: str) -> bool:
    """Whether a checkpoint tensor name is a DashAttention pooling vector (indexer_q)."""
    return _CHECKPOINT_NAME.search(name) is not None


def _safetensors_names(folder: pathlib.Path) -> dict:
    """tensor name -> file name of a model folder's safetensors weights."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open
    names = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.update((n, file.name) for n in f.keys())
    return names


def checkpoint_pool_names(model_dir) -> dict:
    """layer index -> (file, tensor name) of the indexer_q tensors a model folder ships
    (empty when none, or when ``model_dir`` is not a local folder)."""
    if model_dir is None or not os.path.isdir(model_dir):
        return {}
    out = {}
    for name, file in _safetensors_names(pathlib.Path(model_dir)).items():
        m = _CHECKPOINT_NAME.search(name)
        if m:
            out[int(m.group(1))] = (file, name)
    return out


def read_checkpoint_pool(model_dir, shape: ModelShape) -> torch.Tensor:
    """The checkpoint's indexer_q tensors as fp32 [L, Hk, D], checked against ``shape``."""
    from safetensors import safe_open
    names = checkpoint_pool_names(model_dir)
    missing = sorted(set(range(shape.num_layers)) - set(names))
    if missing or len(names) != shape.num_layers:
        raise ValueError(f"DASH pooling vectors in {model_dir}: the checkpoint ships "
                         f"self_attn.indexer_q for layers {sorted(names)} but the model has "
                         f"layers 0..{shape.num_layers - 1}")
    rows = []
    for i in range(shape.num_layers):
        file, name = names[i]
        path = os.path.join(model_dir, file)
        with safe_open(path, framework="pt") as f:
            t = f.get_tensor(name)
        want = (shape.num_kv_heads * shape.head_size,)
        if tuple(t.shape) not in (want, (shape.num_kv_heads, shape.head_size)):
            raise _shape_error(path, name, t.shape, want)
        rows.append(_finite(t.float().reshape(shape.num_kv_heads, shape.head_size), path,
                            name))
    return torch.stack(rows)


# ------------------------------------------------------------------ resolution
@functools.lru_cache(maxsize=8)
def engine_summaries(config: DashConfig, model_dir: Optional[str],
                     shape: Optional[ModelShape]) -> EngineSummaries:
    """Resolve ``config.summary`` for a model and load its pooling vectors, once per process
    (the page padding, the builder and every layer's Impl share the result).

    summary_file wins; else, for "auto"/"attn_pool", the checkpoint's indexer_q tensors;
    "mean"/"minmax" read nothing. ``shape`` None (model unknown) skips the shape checks."""
    pool, source = None, None
    if config.summary_file is not None:
        pool, source = checked_file_pool(config.summary_file, shape), config.summary_file
    elif config.summary in ("auto", "attn_pool") and shape is not None \
            and checkpoint_pool_names(model_dir):
        pool, source = read_checkpoint_pool(model_dir, shape), f"{model_dir} (indexer_q)"
    resolved = config.resolve_summary(pool is not None)
    if resolved.summary != "attn_pool":
        pool, source = None, None
    logger.info("DASH summaries: %s (configured %r)%s", resolved.summary, config.summary,
                f"; pooling vectors from {source}" if source else "")
    return EngineSummaries(config=resolved, pool=pool, source=source)
