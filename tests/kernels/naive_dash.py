"""An independent, loop-per-sequence DashAttention decode step for cross-checking the
vectorised reference. Written from the method's description (docs/design.md) alone: loops
over sequences, KV heads and blocks, the `entmax` package for the probabilities, float64
throughout."""
import math

import pytest
import torch


def _entmax(z: torch.Tensor, alpha: float) -> torch.Tensor:
    oracle = pytest.importorskip("entmax")      # the tests' extra (pyproject [test])
    if alpha == 1.5:
        return oracle.entmax15(z, dim=-1)
    if alpha == 2.0:
        return oracle.sparsemax(z, dim=-1)
    return oracle.entmax_bisect(z, alpha=alpha, dim=-1, n_iter=200)


def naive_dash_decode(q, k, v, seq_lens, *, params, block_size, scale=None):
    """q [S, Hq, D], k/v [S, Hk, L, D], params a DashParams -> (out [S, Hq, D] float64,
    selected: list per sequence of list per KV head of sorted logical block ids)."""
    alpha, score_scale, score_norm = params.alpha, params.score_scale, params.score_norm
    prior_weight, prior_norm = params.prior_weight, params.prior_norm
    sink_blocks, local_blocks = params.sink_blocks, params.local_blocks
    min_blocks, max_blocks, dense_below = params.min_blocks, params.max_blocks, params.dense_below
    S, Hq, D = q.shape
    Hk = k.shape[1]
    G = Hq // Hk
    s0 = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(S, Hq, D, dtype=torch.float64)
    chosen = []
    for s in range(S):
        L = int(seq_lens[s])
        n = -(-L // block_size)
        blocks = [(c * block_size, min((c + 1) * block_size, L)) for c in range(n)]
        per_head = []
        for kv in range(Hk):
            kk = k[s, kv, :L].double()
            vv = v[s, kv, :L].double()
            kbar = torch.stack([kk[a:b].mean(0) for a, b in blocks])         # [n, D]
            heads = range(kv * G, (kv + 1) * G)
            zs = []
            for h in heads:
                u = s0 * (kbar @ q[s, h].double())
                if score_norm == "standardize":
                    std = max(u.std(unbiased=False).item(), 1e-6)
                    z = score_scale * (u - u.mean()) / std
                else:
                    z = score_scale * u
                zs.append(z)
            z = torch.stack(zs)                                               # [G, n]
            p = _entmax(z, alpha)
            pbar = p.mean(0)
            forced = {n - 1} | set(range(min(sink_blocks, n))) | \
                set(range(max(n - local_blocks, 0), n))
            floor = set()
            for g in range(G):
                ranked = sorted(range(n), key=lambda c: (-z[g, c].item(), c))
                floor |= set(ranked[:min_blocks])
            sel = {c for c in range(n) if pbar[c] > 0} | forced | floor
            if max_blocks is not None and len(sel) > max_blocks:
                gmean = z.mean(0)
                ranked = sorted(sel, key=lambda c: (c not in forced, -pbar[c].item(),
                                                    -gmean[c].item(), c))
                sel = set(ranked[:max_blocks])
            pmax = pbar.max().item()
            prior = {}
            for c in sel:
                if c in forced or c in floor:
                    prior[c] = 1.0
                elif prior_norm == "max":
                    prior[c] = pbar[c].item() / pmax
                else:
                    prior[c] = pbar[c].item()
            if L < dense_below:
                sel = set(range(n))
                prior = {c: 1.0 for c in sel}
            per_head.append(sorted(sel))
            for h in heads:
                logits, vals = [], []
                for c in sorted(sel):
                    a, b = blocks[c]
                    logits.append(s0 * (kk[a:b] @ q[s, h].double())
                                  + prior_weight * math.log(prior[c]))
                    vals.append(vv[a:b])
                w = torch.softmax(torch.cat(logits), 0)
                out[s, h] = w @ torch.cat(vals)
        chosen.append(per_head)
    return out, chosen
