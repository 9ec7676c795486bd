"""CPU execution path of the DASH backend: the torch reference ops on vLLM's CPU tensors.

Used when vLLM runs on its CPU platform (the compat shim makes an explicit CUSTOM selection
reach this backend there). Host loops are fine here: this path is for development, CI and
small CPU deployments, and it is the same math the GPU kernels are tested against.
"""
from __future__ import annotations

import torch

from vllm_dash.kernels import reference
from vllm_dash.kernels.summaries import write_kv_and_summaries_torch


def write_kv_and_summaries(key, value, key_cache, value_cache, summaries, slot_mapping) -> None:
    write_kv_and_summaries_torch(key=key, value=value, key_cache=key_cache,
                                 value_cache=value_cache, summaries=summaries,
                                 slot_mapping=slot_mapping)


def decode(impl, md, q, key_cache, value_cache, summaries, out, layer_idx: int) -> dict:
    """DASH decode for the first ``md.num_decodes`` requests (one query token each)."""
    S = md.num_decodes
    cfg = impl.config
    res, info = reference.dash_attention_paged(
        q, key_cache, value_cache, md.block_table[:S], md.seq_lens[:S], summaries=summaries,
        prior_weight=float(cfg.prior_weight), scale=impl.scale, **cfg.kernel_kwargs(layer_idx))
    out.copy_(res)
    return info


def prefill(impl, md, query, key_cache, value_cache, output) -> None:
    """Dense causal attention for the prefill / chunked-prefill requests of the batch."""
    B = key_cache.shape[1]
    G = impl.num_heads // impl.num_kv_heads
    qsl = md.query_start_loc.tolist()
    seq_lens = md.seq_lens.tolist()
    for r in range(md.num_decodes, md.num_decodes + md.num_prefills):
        a, b = qsl[r], qsl[r + 1]
        q_len, L = b - a, seq_lens[r]
        if q_len == 0:
            continue
        n = -(-L // B)
        ids = md.block_table[r, :n].long()
        k = key_cache[ids].reshape(n * B, impl.num_kv_heads, -1)[:L]     # [L, Hk, D]
        v = value_cache[ids].reshape(n * B, impl.num_kv_heads, -1)[:L]
        q = query[a:b].transpose(0, 1).float()                             # [Hq, q_len, D]
        k = k.transpose(0, 1).float().repeat_interleave(G, 0)              # [Hq, L, D]
        v = v.transpose(0, 1).float().repeat_interleave(G, 0)
        # query i sits at position L - q_len + i and sees keys 0 .. that position
        pos_q = torch.arange(L - q_len, L)[:, None]
        mask = torch.arange(L)[None, :] <= pos_q
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                             scale=impl.scale)
        output[a:b] = o.transpose(0, 1).to(output.dtype)
