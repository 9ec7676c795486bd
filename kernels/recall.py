"""Attention recall: how much of the dense softmax mass a block selection keeps.

For a decode query q_h of a sequence with context length L, the dense attention is
a_i = softmax_i(scale * q_h . k_i) over the L tokens. The mass of logical block c is
m_hc = sum of a_i over the tokens of block c. A selection (per sequence and KV head, shared
by the G query heads of the group) keeps the blocks S; its recall for head h is

    recall_h = sum_{c in S} m_hc                        (1 = nothing of the mass lost)

and the oracle at the same budget keeps, per (sequence, KV head), the |S| blocks with the
largest group-mean mass mbar_c = mean_h m_hc (GQA: one block list per KV head), so

    oracle_h = sum_{c in top-|S| of mbar} m_hc.

Recall ranks selectors on any model and at any length without a task the model can solve;
the oracle is the ceiling of a per-KV-head block selection with that many blocks. The block
mass is also the target that learned summaries are fitted to. Plain torch, fp32, no vLLM.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .checks import check_heads
from .reference import Selection

__all__ = ["block_mass", "attention_recall"]


def block_mass(q: torch.Tensor, k: torch.Tensor, seq_lens, *, block_size: int,
               scale: Optional[float] = None) -> torch.Tensor:
    """Dense attention mass per logical block: fp32 [S, Hq, n_max], n_max = ceil(L_max / B).

    q [S, Hq, D]; k [S, Hk, L_max, D] (contiguous, as reference.dash_attention takes it);
    ``seq_lens`` [S]. Each (sequence, head) row sums to 1 over the sequence's blocks; blocks
    past a sequence's end are 0. Slots past the end may hold anything (NaN included).
    """
    S, Hq, D = q.shape
    Hk, L = k.shape[1], k.shape[2]
    G = check_heads(Hq, Hk)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    lens = torch.as_tensor(seq_lens, device=q.device).long().reshape(S)
    present = torch.arange(L, device=q.device)[None, :] < lens[:, None]          # [S, L]
    kf = torch.where(present[:, None, :, None], k.float(), 0.0).repeat_interleave(G, dim=1)
    logits = scale * torch.einsum("shd,shld->shl", q.float(), kf)
    a = torch.softmax(logits.masked_fill(~present[:, None, :], float("-inf")), dim=-1)
    n_max = -(-L // block_size)
    a = torch.nn.functional.pad(a, (0, n_max * block_size - L))
    return a.view(S, Hq, n_max, block_size).sum(-1)


def attention_recall(mass: torch.Tensor, selection: Selection) -> dict:
    """Recall of a selection and of the oracle at the same per-(sequence, KV head) budget.

    ``mass`` [S, Hq, n_max] from :func:`block_mass`; ``selection`` a reference
    :class:`Selection` over the same sequences (its ``selected`` is [S, Hk, n_max]).
    Returns fp32 tensors: ``recall`` and ``oracle`` [S, Hq], ``blocks`` [S, Hk] (the budget).
    """
    S, Hq, n_max = mass.shape
    sel = selection.selected
    if sel.shape[0] != S or sel.shape[2] != n_max:
        raise ValueError(f"selection {tuple(sel.shape)} does not match mass {tuple(mass.shape)}")
    Hk = sel.shape[1]
    G = check_heads(Hq, Hk)
    keep = sel.repeat_interleave(G, dim=1)                                    # [S, Hq, n_max]
    recall = (mass * keep).sum(-1)
    blocks = sel.sum(-1)                                                      # [S, Hk]
    mbar = mass.view(S, Hk, G, n_max).mean(2)
    order = torch.sort(mbar, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(
        n_max, device=mass.device).expand_as(order))
    best = (rank < blocks[..., None]).repeat_interleave(G, dim=1)
    oracle = (mass * best).sum(-1)
    return {"recall": recall.float(), "oracle": oracle.float(), "blocks": blocks}
