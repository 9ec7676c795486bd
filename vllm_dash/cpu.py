"""CPU execution path of the DASH backend: the torch reference ops on vLLM's CPU tensors.

Used when vLLM runs on its CPU platform (the compat shim makes an explicit CUSTOM selection
reach this backend there). Values in, tensors out: the functions take the layer's DashParams,
its softmax scale, the step's metadata and the tensors, never the Impl. Host loops are fine
here: this path is for development, CI and small CPU deployments, and it is the same math
the GPU kernels are tested against.
"""
from __future__ import annotations

import torch

from vllm_dash.kernels import reference
from vllm_dash.kernels.params import DashParams


def write_kv_and_summaries(key, value, key_cache, value_cache, summaries, slot_mapping, *,
                           summary: str = "mean", pool=None) -> None:
    """K/V into the cache and the touched blocks' summaries of kind ``summary`` (attn_pool:
    ``pool`` fp32 [Hk, D], the layer's pooling vectors)."""
    reference.write_kv_and_summaries(key=key, value=value, key_cache=key_cache,
                                     value_cache=value_cache, summaries=summaries,
                                     slot_mapping=slot_mapping, summary=summary, pool=pool)


def decode(md, q, key_cache, value_cache, summaries, out, *, params: DashParams,
           scale: float) -> torch.Tensor:
    """DASH decode for the first ``md.num_decodes`` requests (one query token each); writes
    ``out`` and returns the selected blocks per (sequence, KV head) (for the statistics)."""
    S = md.num_decodes
    res, info = reference.dash_attention_paged(
        q, key_cache, value_cache, md.block_table[:S], md.seq_lens[:S], summaries=summaries,
        params=params, scale=scale)
    out.copy_(res)
    return info["counts"]


def prefill(md, query, key_cache, value_cache, output, *, scale: float) -> None:
    """Dense causal attention for the prefill / chunked-prefill requests of the batch.

    query [T, Hq, D]; key_cache/value_cache [num_blocks, B, Hk, D] views."""
    _, B, Hk, _ = key_cache.shape
    G = query.shape[1] // Hk
    qsl = md.query_start_loc.tolist()
    seq_lens = md.seq_lens.tolist()
    for r in range(md.num_decodes, md.num_decodes + md.num_prefills):
        a, b = qsl[r], qsl[r + 1]
        q_len, L = b - a, seq_lens[r]
        if q_len == 0:
            continue
        n = -(-L // B)
        ids = md.block_table[r, :n].long()
        k = key_cache[ids].reshape(n * B, Hk, -1)[:L]                      # [L, Hk, D]
        v = value_cache[ids].reshape(n * B, Hk, -1)[:L]
        q = query[a:b].transpose(0, 1).float()                             # [Hq, q_len, D]
        k = k.transpose(0, 1).float().repeat_interleave(G, 0)              # [Hq, L, D]
        v = v.transpose(0, 1).float().repeat_interleave(G, 0)
        # query i sits at position L - q_len + i and sees keys 0 .. that position
        pos_q = torch.arange(L - q_len, L)[:, None]
        mask = torch.arange(L)[None, :] <= pos_q
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                             scale=scale)
        output[a:b] = o.transpose(0, 1).to(output.dtype)
