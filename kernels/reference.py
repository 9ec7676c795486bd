"""DASH reference semantics in plain torch: the spec in code (docs/design.md §3).

Everything the Triton kernels and the vLLM adapter compute is defined here first, readable
first and vectorised second. Every kernel test compares against these functions, and the
entmax here is checked against the independent `entmax` package.

Conventions (vLLM's):
  * decode query ``q`` [num_seqs, Hq, D]; the query is the last token of its sequence and
    its own K/V are already in the cache (context length ``L`` includes it);
  * query head ``h`` belongs to KV head ``h // G`` with ``G = Hq // Hk``;
  * contiguous K/V [num_seqs, Hk, L_max, D] with per-sequence lengths ``seq_lens``;
  * paged K/V caches [num_blocks, block_size, Hk, D] (vLLM's NHD block layout; a head-major
    cache [num_blocks, Hk, block_size, D] is passed as its ``.transpose(1, 2)`` view), a
    block table [num_seqs, max_blocks] of physical block ids, and ``seq_lens``;
  * logical block ``c`` of a sequence holds tokens ``[c*B, min((c+1)*B, L))``; the last
    one (``n - 1``, ``n = ceil(L / B)``) is the current, possibly partial, block.

The method, per sequence and KV head (G query heads):
  stage 1   u_hc = scale * (q_h . kbar_c)            (kbar_c: the block's summary; kinds
                                                     and their scores: reference_summaries)
            z_hc = score_scale * u_hc                 (score_norm "none")
                 = score_scale * (u_hc - mean_c u_h) / std_c u_h      ("standardize")
            p_h  = alpha-entmax(z_h) over the sequence's blocks
            pbar = mean over the G heads of p_h       (support = union of the heads')
            selected = {pbar > 0} | forced | floor,  forced = current, sink_blocks first,
                       local_blocks last; floor = the min_blocks best blocks of every head;
            optional max_blocks cap; sequences shorter than dense_below: everything, flat.
  stage 2   logit_i = scale * (q_h . k_i) + prior_weight * log(pi_c(i)) over the tokens of
            the selected blocks; softmax; out = sum_i a_i v_i
            pi_c = 1 for forced/floor blocks, pbar_c ("none") or pbar_c / max pbar ("max").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .checks import check_call, check_decode, check_heads, check_select, check_summary
from .params import DashParams
from .reference_summaries import (_num_blocks, _seq_lens_tensor, block_summaries,
                                  block_summaries_paged, summarize_blocks, summary_scores,
                                  write_kv_and_summaries)
from .reference_entmax import ENTMAX_N_ITER, ENTMAX_TOL, entmax, entmax_threshold

__all__ = [
    "DashParams",
    "ENTMAX_N_ITER",
    "ENTMAX_TOL",
    "STD_EPS",
    "entmax",
    "entmax_threshold",
    "block_summaries",
    "block_summaries_paged",
    "summarize_blocks",
    "summary_scores",
    "gather_paged",
    "Selection",
    "select_blocks",
    "sparse_attention",
    "dash_attention",
    "dash_attention_paged",
    # twins of the Triton entry points (same names and keyword arguments)
    "write_kv_and_summaries",
    "select_blocks_paged",
    "selection_to_compact",
    "sparse_decode",
]

#: Floor of the standard deviation in score_norm="standardize" (population std).
STD_EPS = 1e-6
#: Smallest prior before the log (a selected block's log-prior is finite).
TINY = torch.finfo(torch.float32).tiny


# --------------------------------------------------------------------------------------
# block summaries: reference_summaries.py (re-exported here)
# --------------------------------------------------------------------------------------
def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, seq_lens) -> torch.Tensor:
    """Paged cache [num_blocks, B, Hk, D] -> contiguous [num_seqs, Hk, n_max * B, D] in
    each sequence's logical order (slots past a sequence's end are zero)."""
    nb, B, Hk, D = cache.shape
    S = block_table.shape[0]
    lens = _seq_lens_tensor(seq_lens, S, block_table.shape[1] * B, cache.device)
    n_max = int(_num_blocks(lens.max(), B)) if S else 0
    ids = block_table[:, :n_max].long().clamp(0, nb - 1)
    out = cache[ids]                                   # [S, n_max, B, Hk, D]
    out = out.reshape(S, n_max * B, Hk, D).permute(0, 2, 1, 3)
    present = torch.arange(n_max * B, device=cache.device)[None, :] < lens[:, None]
    return torch.where(present[:, None, :, None], out, torch.zeros((), dtype=out.dtype))


# --------------------------------------------------------------------------------------
# stage 1: block selection
# --------------------------------------------------------------------------------------
@dataclass
class Selection:
    """Stage-1 result for a batch of decode queries (n_max = most blocks of any sequence).

    selected   bool  [S, Hk, n_max]  blocks stage 2 reads, per (sequence, KV head)
    prior      fp32  [S, Hk, n_max]  pi_c (1 for forced/floor blocks, 0 where unselected)
    probs      fp32  [S, Hq, n_max]  per-head entmax probabilities p_h
    mean_probs fp32  [S, Hk, n_max]  GQA mean pbar
    scores     fp32  [S, Hq, n_max]  z (after score_scale / score_norm; -inf past the end)
    num_blocks long  [S]             n = ceil(L / B)
    seq_lens   long  [S]
    dense      bool  [S]             sequence shorter than dense_below (attends densely)
    block_size int
    """
    selected: torch.Tensor
    prior: torch.Tensor
    probs: torch.Tensor
    mean_probs: torch.Tensor
    scores: torch.Tensor
    num_blocks: torch.Tensor
    seq_lens: torch.Tensor
    dense: torch.Tensor
    block_size: int

    @property
    def counts(self) -> torch.Tensor:
        """Selected blocks per (sequence, KV head): long [S, Hk]."""
        return self.selected.sum(-1)

    def block_ids(self, block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Selected block ids per (sequence, KV head), ascending, padded with -1:
        long [S, Hk, n_max]. Logical ids, or physical ids through ``block_table``."""
        n_max = self.selected.shape[-1]
        logical = torch.arange(n_max, device=self.selected.device).expand_as(self.selected)
        if block_table is not None:
            ids = block_table[:, :n_max].long()[:, None, :].expand_as(self.selected)
        else:
            ids = logical
        key = torch.where(self.selected, logical, n_max + logical)  # selected first, in order
        order = key.argsort(-1)
        out = torch.where(self.selected, ids, torch.full_like(ids, -1)).gather(-1, order)
        return out

    def selected_tokens(self) -> torch.Tensor:
        """Tokens in the selected blocks per (sequence, KV head): long [S, Hk]."""
        B = self.block_size
        n_max = self.selected.shape[-1]
        c = torch.arange(n_max, device=self.selected.device)
        tokens = (self.seq_lens[:, None] - c[None, :] * B).clamp(0, B)  # [S, n_max]
        return (self.selected * tokens[:, None, :]).sum(-1)

    def density(self) -> torch.Tensor:
        """Selected tokens / context length per (sequence, KV head): fp32 [S, Hk]."""
        return self.selected_tokens().float() / self.seq_lens[:, None].float()


def select_blocks(q: torch.Tensor, summaries: torch.Tensor, seq_lens, *, params: DashParams,
                  block_size: int, scale: Optional[float] = None) -> Selection:
    """Stage 1 for decode queries q [S, Hq, D] against per-sequence block summaries
    [S, Hk, n_max, Ds] (logical order; Ds = summary_dim(params.summary, D)). See the module
    docstring for the rules.

    Details fixed here:
      * standardize uses the population std over the sequence's blocks, floored at STD_EPS;
      * local_blocks counts the last blocks including the current one;
      * the floor (min_blocks) takes each head's highest z (ties: lower block id);
      * the cap (max_blocks) keeps forced blocks first, then the largest pbar, then the
        largest mean score of the group (floor blocks that entmax did not pick);
      * selector "topk": no entmax (p and pbar are zero, so nothing beyond the floor): the
        selection is the forced blocks plus the floor (min_blocks >= 1 is the k).
    """
    check_call(params, block_size, scale)
    S, Hq, D = q.shape
    Hk, n_max = summaries.shape[1], summaries.shape[2]
    G = check_heads(Hq, Hk)
    ds = check_summary(params.summary, None, Hk, D, need_pool=False)
    if summaries.dim() != 4 or summaries.shape[0] != S or summaries.shape[3] != ds:
        raise ValueError(f"summaries must be [S={S}, Hk, n_max, {ds}] for "
                         f"summary={params.summary!r} (D={D}), got {tuple(summaries.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    lens = _seq_lens_tensor(seq_lens, S, n_max * block_size, q.device)
    n = _num_blocks(lens, block_size)
    c = torch.arange(n_max, device=q.device)
    valid = c[None, :] < n[:, None]                                    # [S, n_max]

    z = _block_scores(q, summaries, valid, n, params, scale)           # [S, Hq, n_max]
    if params.selector == "topk":               # no entmax support: floor + forced only
        p = torch.zeros_like(z)
    else:
        p = entmax(z, alpha=params.alpha, dim=-1)                      # [S, Hq, n_max]
    pbar = p.view(S, Hk, G, n_max).mean(2)                             # [S, Hk, n_max]

    forced = (c[None, :] == (n - 1)[:, None])                          # current block
    forced |= c[None, :] < params.sink_blocks
    forced |= c[None, :] >= (n - params.local_blocks)[:, None]
    forced = (forced & valid)[:, None, :].expand(S, Hk, n_max).clone()
    floor = _floor(z, valid, Hk, params.min_blocks)
    selected = (pbar > 0) | forced | floor
    forced_or_floor = forced | floor
    if params.max_blocks is not None:
        keep = _cap(z, pbar, forced, selected, valid, params.max_blocks)
        selected &= keep
        forced_or_floor &= selected
    selected &= valid[:, None, :]

    if params.prior_norm == "max":
        pmax = pbar.amax(-1, keepdim=True).clamp_min(torch.finfo(pbar.dtype).tiny)
        prior = pbar / pmax
    else:
        prior = pbar.clone()
    prior = torch.where(forced_or_floor, torch.ones_like(prior), prior)
    # dense_below: the whole sequence, flat prior
    dense = lens < params.dense_below
    selected = torch.where(dense[:, None, None], valid[:, None, :].expand_as(selected), selected)
    prior = torch.where(dense[:, None, None] & valid[:, None, :], torch.ones_like(prior), prior)
    prior = torch.where(selected, prior, torch.zeros_like(prior))
    return Selection(selected=selected, prior=prior, probs=p.float(), mean_probs=pbar.float(),
                     scores=z, num_blocks=n, seq_lens=lens, dense=dense,
                     block_size=block_size)


def _block_scores(q, summaries, valid, n, params: DashParams, scale: float) -> torch.Tensor:
    """z [S, Hq, n_max]: u_hc (params.summary's score, reference_summaries.summary_scores),
    then score_norm and score_scale; -inf past each sequence's blocks."""
    u = summary_scores(q, summaries, params.summary, scale)
    if params.score_norm == "standardize":
        w = valid[:, None, :].float()
        mean = (u * w).sum(-1, keepdim=True) / n[:, None, None]
        var = (((u - mean) * w) ** 2).sum(-1, keepdim=True) / n[:, None, None]
        z = params.score_scale * (u - mean) / var.sqrt().clamp_min(STD_EPS)
    else:
        z = params.score_scale * u
    return z.masked_fill(~valid[:, None, :], float("-inf"))


def _floor(z, valid, Hk: int, min_blocks: int) -> torch.Tensor:
    """Each head's min_blocks highest z (ties: lower block id), union over the GQA group:
    bool [S, Hk, n_max]."""
    S, Hq, n_max = z.shape
    if min_blocks <= 0:
        return torch.zeros(S, Hk, n_max, dtype=torch.bool, device=z.device)
    kk = min(min_blocks, n_max)
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices
    floor_h = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, order[..., :kk], True)
    floor_h &= valid[:, None, :]
    return floor_h.view(S, Hk, Hq // Hk, n_max).any(2)


def _cap(z, pbar, forced, selected, valid, max_blocks: int) -> torch.Tensor:
    """The max_blocks blocks kept per (sequence, KV head): forced first, then pbar, then the
    group's mean score (two stable sorts); bool [S, Hk, n_max]."""
    S, Hk, n_max = pbar.shape
    group_score = torch.where(valid[:, None, :], z, torch.zeros_like(z))
    group_score = group_score.view(S, Hk, -1, n_max).mean(2)
    order = torch.sort(group_score, dim=-1, descending=True, stable=True).indices
    primary = (forced.float() * 2.0 + pbar).masked_fill(~selected, -1.0)
    order = order.gather(-1, torch.sort(primary.gather(-1, order), dim=-1,
                                        descending=True, stable=True).indices)
    return torch.zeros_like(selected).scatter_(-1, order[..., :max_blocks], True)


# --------------------------------------------------------------------------------------
# stage 2: softmax over the selected tokens with the log-prior
# --------------------------------------------------------------------------------------
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Selection,
                     *, params: DashParams, scale: Optional[float] = None) -> torch.Tensor:
    """Stage 2 on a contiguous cache: q [S, Hq, D], k/v [S, Hk, L_max, D] -> [S, Hq, D]
    (q's dtype; computed in fp32). Of ``params`` only prior_weight is used here."""
    check_call(params, selection.block_size, scale)
    prior_weight = params.prior_weight
    S, Hq, D = q.shape
    Hk, L = k.shape[1], k.shape[2]
    G = check_heads(Hq, Hk)
    B = selection.block_size
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    n_max = selection.selected.shape[-1]
    pos = torch.arange(L, device=q.device)
    blk = (pos // B).clamp_max(n_max - 1)
    present = pos[None, :] < selection.seq_lens[:, None]                     # [S, L]
    tok_sel = selection.selected[:, :, blk] & present[:, None, :]            # [S, Hk, L]
    tok_prior = selection.prior[:, :, blk]
    log_prior = torch.where(tok_sel, tok_prior.clamp_min(TINY).log(),
                            torch.zeros_like(tok_prior))
    # unselected / absent slots are zeroed (not multiplied: they may hold NaN)
    kf = torch.where(tok_sel[..., None], k.float(), 0.0).repeat_interleave(G, dim=1)
    vf = torch.where(tok_sel[..., None], v.float(), 0.0).repeat_interleave(G, dim=1)
    logits = scale * torch.einsum("shd,shld->shl", q.float(), kf)
    logits = logits + prior_weight * log_prior.repeat_interleave(G, dim=1)
    logits = logits.masked_fill(~tok_sel.repeat_interleave(G, dim=1), float("-inf"))
    a = torch.softmax(logits, dim=-1)
    return torch.einsum("shl,shld->shd", a, vf).to(q.dtype)


# --------------------------------------------------------------------------------------
# whole decode step
# --------------------------------------------------------------------------------------
def _info(sel: Selection, block_table: Optional[torch.Tensor] = None) -> dict:
    return {
        "selection": sel,
        "block_ids": sel.block_ids(block_table),      # [S, Hk, n_max], -1 padded
        "counts": sel.counts,                         # [S, Hk]
        "num_blocks": sel.num_blocks,                 # [S]
        "selected_tokens": sel.selected_tokens(),     # [S, Hk]
        "density": sel.density(),                     # [S, Hk]
        "prior": sel.prior,                           # [S, Hk, n_max]
    }


def dash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, params: DashParams,
                   block_size: int, scale: Optional[float] = None, seq_lens=None,
                   pool: Optional[torch.Tensor] = None):
    """One DASH decode step on a contiguous cache.

    q [S, Hq, D]; k, v [S, Hk, L_max, D]; ``seq_lens`` [S] per-sequence context lengths
    (default: all L_max). Returns ``(out [S, Hq, D], info)``; info holds the
    :class:`Selection` and, per (sequence, KV head), ``block_ids`` (logical, ascending, -1
    padded), ``counts``, ``selected_tokens`` and ``density`` (selected tokens / context).
    The summaries are of kind ``params.summary``; ``pool`` fp32 [Hk, D]: the pooling
    vectors "attn_pool" needs (and no other kind accepts).
    """
    check_call(params, block_size, scale)
    _check_shapes(q, k, v)
    lens = _seq_lens_tensor(seq_lens, q.shape[0], k.shape[2], q.device)
    kbar = block_summaries(k, block_size, lens, summary=params.summary, pool=pool)
    sel = select_blocks(q, kbar, lens, params=params, block_size=block_size, scale=scale)
    out = sparse_attention(q, k, v, sel, params=params, scale=scale)
    return out, _info(sel)


def dash_attention_paged(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_table: torch.Tensor, seq_lens, *, params: DashParams,
                         summaries: Optional[torch.Tensor] = None,
                         scale: Optional[float] = None, block_size: Optional[int] = None,
                         pool: Optional[torch.Tensor] = None):
    """One DASH decode step on vLLM's paged layout.

    q [S, Hq, D]; key_cache/value_cache [num_blocks, B, Hk, D]; block_table [S, max_blocks]
    (physical ids; entries past a sequence's blocks are ignored); seq_lens [S].
    ``summaries`` [num_blocks, Hk, Ds] are the maintained block summaries of kind
    ``params.summary`` (computed from the cache when omitted, with ``pool`` for
    "attn_pool"). Same result and info as :func:`dash_attention`, with ``block_ids``
    physical. ``block_size``, when given, must match the cache's.
    """
    B = key_cache.shape[1]
    if block_size is not None and block_size != B:
        raise ValueError(f"block_size ({block_size}) does not match the cache's block "
                         f"dimension ({B})")
    check_call(params, B, scale)
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} differs from "
                         f"key_cache shape {tuple(key_cache.shape)}")
    if q.dim() != 3 or key_cache.dim() != 4 or q.shape[-1] != key_cache.shape[-1]:
        raise ValueError(f"q must be [S, Hq, D] and the caches [num_blocks, B, Hk, D] with the "
                         f"same D, got q {tuple(q.shape)}, key_cache {tuple(key_cache.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table must be [num_seqs={q.shape[0]}, max_blocks], got "
                         f"{tuple(block_table.shape)}")
    check_heads(q.shape[1], key_cache.shape[2])
    check_summary(params.summary, pool, key_cache.shape[2], key_cache.shape[3],
                  need_pool=summaries is None)
    lens = _seq_lens_tensor(seq_lens, q.shape[0], block_table.shape[1] * B, q.device)
    if summaries is None:
        summaries = block_summaries_paged(key_cache, block_table, lens,
                                          summary=params.summary, pool=pool)
    k = gather_paged(key_cache, block_table, lens)
    v = gather_paged(value_cache, block_table, lens)
    n_max = k.shape[2] // B
    ids = block_table[:, :n_max].long().clamp(0, summaries.shape[0] - 1)
    kbar = summaries[ids].permute(0, 2, 1, 3)                # [S, Hk, n_max, Ds]
    sel = select_blocks(q, kbar, lens, params=params, block_size=B, scale=scale)
    out = sparse_attention(q, k, v, sel, params=params, scale=scale)
    return out, _info(sel, block_table)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [num_seqs, Hq, D], got shape {tuple(q.shape)}")
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [num_seqs, Hk, L, D], got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} "
                         f"(num_seqs and D must agree)")
    check_heads(q.shape[1], k.shape[1])


# --------------------------------------------------------------------------------------
# twins of the Triton entry points: same names and keyword arguments (outputs returned
# where the kernel writes preallocated buffers); every kernel test compares against them
# --------------------------------------------------------------------------------------
def selection_to_compact(sel: Selection, block_table: torch.Tensor):
    """A :class:`Selection` -> the selection kernel's compacted format.

    Returns ``(block_ids int32 [S, Hk, n_max], log_prior fp32 [S, Hk, n_max],
    counts int32 [S, Hk])``: physical ids of the selected blocks in ascending logical order,
    log(pi) of each, and the count; entries past the count are -1 / 0.
    """
    n_max = sel.selected.shape[-1]
    logical = torch.arange(n_max, device=sel.selected.device).expand_as(sel.selected)
    order = torch.where(sel.selected, logical, n_max + logical).argsort(-1)
    sel_sorted = sel.selected.gather(-1, order)
    phys = block_table[:, :n_max].long()[:, None, :].expand_as(sel.selected).gather(-1, order)
    prior = sel.prior.gather(-1, order)
    ids = torch.where(sel_sorted, phys, torch.full_like(phys, -1)).to(torch.int32)
    logp = torch.where(sel_sorted, prior.clamp_min(TINY).log(), torch.zeros_like(prior))
    return ids, logp.float(), sel.counts.to(torch.int32)


def select_blocks_paged(*, q: torch.Tensor, summaries: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, params: DashParams, block_size: int,
                        scale: Optional[float] = None):
    """Twin of :func:`select.select_blocks_paged`: gather the sequences' summaries through
    the block table, run :func:`select_blocks`, compact. Returns
    ``(block_ids, log_prior, counts, selection)`` (see :func:`selection_to_compact`)."""
    check_call(params, block_size, scale)
    S = check_select(q, summaries, block_table, seq_lens, params.summary)[0]
    lens = seq_lens[:S].long()
    n_max = int(((lens.max() + block_size - 1) // block_size).item()) if S else 0
    ids = block_table[:S, :n_max].long().clamp(0, summaries.shape[0] - 1)
    kbar = summaries[ids].permute(0, 2, 1, 3)                  # [S, Hk, n_max, Ds]
    sel = select_blocks(q, kbar, lens, params=params, block_size=block_size, scale=scale)
    return (*selection_to_compact(sel, block_table[:S]), sel)


def sparse_decode(*, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_ids: torch.Tensor, log_prior: torch.Tensor, counts: torch.Tensor,
                  seq_lens: torch.Tensor, out: torch.Tensor, params: DashParams,
                  block_size: int, scale: Optional[float] = None, **_launch) -> torch.Tensor:
    """Twin of :func:`decode.sparse_decode` (same arguments and result; the launch settings
    num_splits/workspace/num_warps/num_stages are accepted and ignored): gather the listed
    blocks of each (sequence, KV head), drop the current block's unwritten slots, and run
    plain softmax attention in fp32. Host-syncing; for tests and the CPU path only."""
    check_call(params, block_size, scale)
    S, Hq, D, B, Hk = check_decode(q, key_cache, value_cache, block_ids, log_prior, counts,
                                   seq_lens, out, block_size)
    G = Hq // Hk
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    prior_weight = params.prior_weight
    cnt = counts[:S].long().clamp(max=block_ids.shape[2]).cpu()
    lens = seq_lens[:S].long().cpu()
    for s in range(S):
        L = int(lens[s])
        last_fill = L - (-(-L // B) - 1) * B
        for h in range(Hk):
            n = int(cnt[s, h])
            qh = q[s, h * G:(h + 1) * G].float()                       # [G, D]
            if n == 0:
                out[s, h * G:(h + 1) * G] = 0
                continue
            ids = block_ids[s, h, :n].long()
            k = key_cache[ids, :, h, :].float().reshape(n * B, D)       # [n*B, D]
            v = value_cache[ids, :, h, :].float().reshape(n * B, D)
            keep = torch.ones(n, B, dtype=torch.bool, device=q.device)
            keep[n - 1, last_fill:] = False
            keep = keep.reshape(-1)
            k, v = k[keep], v[keep]
            tok_lp = log_prior[s, h, :n].float().repeat_interleave(B)[keep]
            logits = scale * (qh @ k.T)
            if prior_weight != 0.0:
                logits = logits + prior_weight * tok_lp[None, :]
            a = torch.softmax(logits, dim=-1)
            out[s, h * G:(h + 1) * G] = (a @ v).to(out.dtype)
    return out
