"""Stage 2 of DASH decode on vLLM's paged KV cache (docs/design.md §3.4, §4.3).

Split-KV flash-decoding over a COMPACTED list of selected blocks, then a reduce kernel.

Inputs per (sequence s, KV head h), as written by stage 1 (``select.py``; the benchmarks'
every-block selection is benchmarks/dense_fill.py):

  block_ids [S_cap, Hk, max_blocks] int32  selected PHYSICAL block ids, ascending logical order;
                                           entry ``counts - 1`` is the current (last, possibly
                                           partial) block, every other listed block is full;
  log_prior [S_cap, Hk, max_blocks] fp32   log pi of each listed block (finite);
  counts    [S_cap, Hk]             int32  number of listed blocks (0: no output, zeros).

Math (per query head of the group, over the tokens i of the listed blocks):
  logit_i = scale * q . k_i + prior_weight * log_prior[c(i)];  out = softmax(logit) @ V,
which is :func:`reference.sparse_attention` given the same selection.

Kernels
  * ``_split_kernel``: grid (S, Hk, num_splits). Program (s, h, j) takes the contiguous chunk
    ``[j*chunk, min((j+1)*chunk, count))`` of the list, ``chunk = ceil(count / num_splits)``
    rounded up to whole tiles, so the number of splits actually used adapts to the count on
    the device (empty programs store lse = -inf and no output). Each iteration loads one tile
    of ``BPI`` listed blocks (``BPI * B >= 64`` tokens) of K and V ONCE for all G query heads
    of the group: ``tl.dot`` with the G heads padded to >= 16 rows, fp32 accumulation, online
    softmax in base 2. With one split it writes ``out`` directly (no reduce).
  * ``_reduce_kernel``: grid (S, Hq); combines the splits' normalised partial outputs with
    their log-sum-exps.

No host sync, no allocation when a :class:`DecodeWorkspace` is given, grids fixed by shapes
(capacities), so a call can be captured in a CUDA graph and replayed with new contents.
K/V loads are masked to the written slots, so stale or NaN contents of the current block's
tail (or of unlisted blocks) never reach the output. Physical block offsets are int64.

Measured (benchmarks/bench_kernels.py, CUDA graphs, bf16, D=128, B=64, random selections):
on an H100 SXM every-block-selected runs within ~1-3 % of torch SDPA cuDNN (e.g. 32/8 heads,
batch 8, 128K: 1407 us vs 1403 us, 91 % of HBM peak); at 12.5 % density 202 us (7x), batch 1
128K 44 us vs 192 us. Small grids are latency-bound (~10-20 us floor at batch 1).

Triton 3.6's interpreter computes ``tl.dot`` on bf16 operands from their raw uint16 storage;
under TRITON_INTERPRET=1 only, bf16 operands are widened to fp32 (after the same roundings).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import check_call, check_decode
from .params import DashParams

__all__ = [
    "DecodeWorkspace",
    "sparse_decode",
    "choose_num_splits",
    "MAX_SPLITS",
    "PROGRAMS_PER_SM",
]

#: Upper bound on the automatic number of splits.
MAX_SPLITS = 128
#: Automatic splits, bandwidth-bound grids: about this many split programs per SM ...
PROGRAMS_PER_SM = 8
#: ... latency-bound grids (few sequence x KV head pairs): one wave of this many per SM,
#: when that gives at least MIN_SINGLE_WAVE_SPLITS splits.
SINGLE_WAVE_PER_SM = 2
MIN_SINGLE_WAVE_SPLITS = 8
#: Automatic splitting keeps at least this many listed tokens (capacity) per split.
MIN_TOKENS_PER_SPLIT = 256
#: Tile height in tokens (several small blocks are packed into one tile).
_TILE_TOKENS = 64
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _mma(a, b, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    """a @ b with fp32 accumulation: "ieee" precision for fp32 caches, both operands widened
    to fp32 under the interpreter with bf16 (see the module doc), else the native dot."""
    if IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    elif DOT_F32:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, ids_ptr, lp_ptr, cnt_ptr, len_ptr,
    out_ptr, po_ptr, plse_ptr,
    stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_is, stride_ih, stride_ic,
    stride_ls, stride_lh, stride_lc,
    stride_cs, stride_ch,
    stride_os, stride_oh, stride_od,
    stride_por, stride_poh, stride_plr, stride_plh,
    qk_scale, prior_scale, max_blocks, num_splits,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    B: tl.constexpr, BPI: tl.constexpr, USE_PRIOR: tl.constexpr, IEEE: tl.constexpr,
    DOT_F32: tl.constexpr, DIRECT: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    s = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.program_id(2)
    N: tl.constexpr = BPI * B

    count = tl.load(cnt_ptr + s * stride_cs + h * stride_ch).to(tl.int32)
    count = tl.minimum(count, max_blocks)
    seq_len = tl.load(len_ptr + s).to(tl.int32)
    n_blocks = (seq_len + B - 1) // B
    last_fill = seq_len - (n_blocks - 1) * B            # valid tokens of the current block
    # contiguous chunk of the list, rounded up to whole tiles
    chunk = (count + num_splits - 1) // num_splits
    chunk = ((chunk + BPI - 1) // BPI) * BPI
    start = j * chunk
    end = tl.minimum(start + chunk, count)

    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    g_ok = g < G
    d_ok = d < D
    tok = tl.arange(0, N)
    slot = tok % B
    head = h * G + g                                      # query heads of the group

    q = tl.load(q_ptr + s * stride_qs + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)

    ids_row = ids_ptr + s.to(tl.int64) * stride_is + h * stride_ih
    lp_row = lp_ptr + s.to(tl.int64) * stride_ls + h * stride_lh
    k_head = k_ptr + h.to(tl.int64) * stride_kh
    v_head = v_ptr + h.to(tl.int64) * stride_vh

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)

    for i0 in tl.range(start, end, BPI, num_stages=NUM_STAGES):
        if BPI == 1:
            # one block per tile: uniform (scalar) id, prior and fill
            bid = tl.load(ids_row + i0 * stride_ic).to(tl.int64)
            fill = tl.where(i0 == count - 1, last_fill, B)
            t_ok = slot < fill
        else:
            e = i0 + tok // B                             # list entry of each token
            e_ok = e < end
            bid = tl.load(ids_row + e * stride_ic, mask=e_ok, other=0).to(tl.int64)
            fill = tl.where(e == count - 1, last_fill, B)
            t_ok = e_ok & (slot < fill)
        k_row = k_head + bid * stride_kb + slot * stride_kt
        v_row = v_head + bid * stride_vb + slot * stride_vt
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_row[:, None] + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        qk = _mma(q, tl.trans(k), IEEE, DOT_F32)
        sc = qk * qk_scale                                # [GP, N], base-2 logits
        if USE_PRIOR:
            if BPI == 1:
                lp = tl.load(lp_row + i0 * stride_lc)
                sc = sc + lp * prior_scale
            else:
                lp = tl.load(lp_row + e * stride_lc, mask=e_ok, other=0.0)
                sc = sc + (lp * prior_scale)[None, :]
        sc = tl.where(t_ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))            # finite: every tile has a valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_row[:, None] + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, IEEE, DOT_F32)
        m_i = m_new

    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    o = acc / l_safe[:, None]
    if DIRECT:
        tl.store(out_ptr + s * stride_os + head[:, None] * stride_oh + d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        row = (s * num_splits + j).to(tl.int64)             # partials row of (s, split j)
        lse = tl.where(l_ok, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(plse_ptr + row * stride_plr + head * stride_plh, lse, mask=g_ok)
        tl.store(po_ptr + row * stride_por + head[:, None] * stride_poh + d[None, :], o,
                 mask=(g_ok & l_ok)[:, None] & d_ok[None, :])


@triton.jit
def _reduce_kernel(
    po_ptr, plse_ptr, out_ptr,
    stride_por, stride_poh, stride_plr, stride_plh,
    stride_os, stride_oh, stride_od,
    num_splits,
    D: tl.constexpr, DP: tl.constexpr, SP: tl.constexpr, CH: tl.constexpr,
):
    s = tl.program_id(0)
    hq = tl.program_id(1)
    d = tl.arange(0, DP)
    d_ok = d < D
    base = (s * num_splits).to(tl.int64)
    jj = tl.arange(0, SP)
    lse = tl.load(plse_ptr + (base + jj) * stride_plr + hq * stride_plh, mask=jj < num_splits,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)              # every split empty
    den = tl.sum(tl.exp2(lse - m), 0)                     # empty splits weigh 0
    acc = tl.zeros([DP], tl.float32)
    for c in range(0, num_splits, CH):
        jc = c + tl.arange(0, CH)
        rows = base + jc
        lse_c = tl.load(plse_ptr + rows * stride_plr + hq * stride_plh, mask=jc < num_splits,
                        other=float("-inf"))
        used = lse_c > float("-inf")
        o = tl.load(po_ptr + rows[:, None] * stride_por + hq * stride_poh + d[None, :],
                    mask=used[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(tl.exp2(lse_c - m)[:, None] * o, 0)
    res = acc / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + s * stride_os + hq * stride_oh + d * stride_od,
             res.to(out_ptr.dtype.element_ty), mask=d_ok)


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------
class DecodeWorkspace:
    """Split-KV partials, sized once from capacities (allocate before CUDA-graph capture).

    partial_out fp32 [rows, num_q_heads, head_size]  normalised output of each split
    partial_lse fp32 [rows, num_q_heads]             its base-2 log-sum-exp
    with ``rows = max_num_seqs * max_splits``; split j of sequence s uses row
    ``s * num_splits + j``, so a call fits when ``num_seqs * num_splits <= rows``: small
    batches may use more than ``max_splits`` splits (the automatic choice does).
    """

    def __init__(self, max_num_seqs: int, num_q_heads: int, head_size: int,
                 max_splits: int = 16, device=None):
        if min(max_num_seqs, num_q_heads, head_size, max_splits) < 1:
            raise ValueError("DecodeWorkspace: every capacity must be >= 1, got "
                             f"max_num_seqs={max_num_seqs}, num_q_heads={num_q_heads}, "
                             f"head_size={head_size}, max_splits={max_splits}")
        self.max_num_seqs = int(max_num_seqs)
        self.num_q_heads = int(num_q_heads)
        self.head_size = int(head_size)
        self.max_splits = int(max_splits)
        self.rows = self.max_num_seqs * self.max_splits
        self.partial_out = torch.empty(self.rows, num_q_heads, head_size, dtype=torch.float32,
                                       device=device)
        self.partial_lse = torch.empty(self.rows, num_q_heads, dtype=torch.float32,
                                       device=device)

    @property
    def device(self) -> torch.device:
        return self.partial_out.device

    def nbytes(self) -> int:
        return (self.partial_out.numel() + self.partial_lse.numel()) * 4

    def splits_capacity(self, num_seqs: int) -> int:
        """Most splits a call with ``num_seqs`` sequences can use."""
        return self.rows // max(1, num_seqs)

    def check(self, num_seqs: int, num_q_heads: int, head_size: int, num_splits: int) -> None:
        if (num_seqs > self.max_num_seqs or num_q_heads != self.num_q_heads
                or head_size != self.head_size or num_seqs * num_splits > self.rows):
            raise ValueError(
                f"workspace (max_num_seqs={self.max_num_seqs}, num_q_heads={self.num_q_heads}, "
                f"head_size={self.head_size}, rows={self.rows}) does not fit "
                f"num_seqs={num_seqs}, num_q_heads={num_q_heads}, head_size={head_size}, "
                f"num_splits={num_splits} (needs num_seqs * num_splits <= rows)")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(*, num_seqs: int, num_kv_heads: int, max_blocks_per_seq: int,
                      block_size: int, device=None, max_splits: Optional[int] = None) -> int:
    """Splits per (sequence, KV head), from shapes/capacities only (never device data), so it
    is the same at CUDA-graph capture and replay.

    With P0 = num_seqs * num_kv_heads programs per split and N SMs:
      * few (sequence, KV head) pairs (latency-bound decode): one wave of ~2 programs per SM,
        ``floor(2N / P0)`` splits, used when that is >= 8;
      * otherwise (bandwidth-bound): ~8 programs per SM, ``max(1, floor(8N / P0))``;
    capped at MAX_SPLITS, at ``ceil(max_blocks_per_seq / (MIN_TOKENS_PER_SPLIT / B))`` (each
    split keeps that many tokens of capacity) and at ``max_splits`` (the workspace's room).
    On CPU (Triton interpreter) it returns at most 2.

    Measured on an H200 (bf16, D=128, B=64, uniform counts, CUDA graphs): grids of ~256
    programs were best at batch 1 (32/8 heads, 128K: 145 us at 32 splits vs 157 us at 128),
    grids of ~1024 at batch 8-32 (batch 32 x 8 KV heads: 91 % of HBM peak over every block
    with 4 or 16 splits, 76 % with 2); grids of ~512 programs were slow everywhere (about
    three programs are resident per SM, so ~1.3 waves leave a long tail).
    """
    device = torch.device(device) if device is not None else None
    programs = max(1, num_seqs * num_kv_heads)
    if device is not None and device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        sms = _sm_count(idx)
        ns = (SINGLE_WAVE_PER_SM * sms) // programs
        if ns < MIN_SINGLE_WAVE_SPLITS:
            ns = max(1, (PROGRAMS_PER_SM * sms) // programs)
        cap = MAX_SPLITS
    else:
        ns, cap = -(-2 // programs), 2
    per_split = max(1, MIN_TOKENS_PER_SPLIT // block_size)
    ns = min(ns, max(1, -(-max_blocks_per_seq // per_split)), cap)
    if max_splits is not None:
        ns = min(ns, max_splits)
    return max(1, int(ns))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def sparse_decode(*, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_ids: torch.Tensor, log_prior: torch.Tensor, counts: torch.Tensor,
                  seq_lens: torch.Tensor, out: torch.Tensor, params: DashParams,
                  block_size: int, scale: Optional[float] = None,
                  num_splits: Optional[int] = None,
                  workspace: Optional[DecodeWorkspace] = None,
                  num_warps: Optional[int] = None, num_stages: Optional[int] = None
                  ) -> torch.Tensor:
    """DASH stage 2 on a paged cache over compacted selections; writes and returns ``out``.

    q [S, Hq, D] (fp16/bf16/fp32); key_cache/value_cache indexed [block, slot, head, dim]
    through their strides (NHD cache, or a head-major cache's ``.transpose(1, 2)`` view);
    block_ids/log_prior [S_cap, Hk, max_blocks]; counts [S_cap, Hk]; seq_lens [>= S];
    out [S, Hq, D]. Of ``params`` (validated when built) only prior_weight is used.
    ``num_splits`` None: :func:`choose_num_splits` (capped by the workspace).
    ``num_warps``/``num_stages``: launch tuning (defaults by shape).
    """
    check_call(params, block_size, scale)
    S, Hq, D, B, Hk = check_decode(q, key_cache, value_cache, block_ids, log_prior, counts,
                                   seq_lens, out, block_size)
    prior_weight = params.prior_weight
    G = Hq // Hk
    if S == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    max_blocks = block_ids.shape[2]
    if num_splits is None:
        num_splits = choose_num_splits(
            num_seqs=S, num_kv_heads=Hk, max_blocks_per_seq=max_blocks, block_size=B,
            device=q.device,
            max_splits=workspace.splits_capacity(S) if workspace is not None else None)
    num_splits = int(num_splits)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    direct = num_splits == 1
    if direct:
        po, plse = out, out                          # unused
        spo = (0, 0)
        spl = (0, 0)
    else:
        if workspace is None:
            workspace = DecodeWorkspace(S, Hq, D, num_splits, device=q.device)
        workspace.check(S, Hq, D, num_splits)
        po, plse = workspace.partial_out, workspace.partial_lse
        spo = po.stride()[:2]
        spl = plse.stride()[:2]

    GP = max(16, _next_pow2(G))
    DP = max(16, _next_pow2(D))
    BPI = max(1, _TILE_TOKENS // B)
    ieee = key_cache.dtype == torch.float32
    # Triton 3.6's interpreter multiplies the raw uint16 storage of bf16 operands in tl.dot;
    # under the interpreter only, bf16 operands are widened to fp32 after the same roundings.
    dot_f32 = _interpreting() and key_cache.dtype == torch.bfloat16
    if num_warps is None:
        num_warps = 4 if BPI * B * DP <= 64 * 128 else 8
    if num_stages is None:
        num_stages = 3 if B >= 64 else 2          # H200 measurements, bf16, D=128
    use_prior = float(prior_weight) != 0.0

    _split_kernel[(S, Hk, num_splits)](
        q, key_cache, value_cache, block_ids, log_prior, counts, seq_lens,
        out, po, plse,
        *q.stride(), *key_cache.stride(), *value_cache.stride(),
        *block_ids.stride(), *log_prior.stride(), *counts.stride(), *out.stride(),
        *spo, *spl,
        scale * _LOG2E, float(prior_weight) * _LOG2E, max_blocks, num_splits,
        G=G, GP=GP, D=D, DP=DP, B=B, BPI=BPI, USE_PRIOR=use_prior, IEEE=ieee, DOT_F32=dot_f32,
        DIRECT=direct, NUM_STAGES=num_stages, num_warps=num_warps,
    )
    if not direct:
        _reduce_kernel[(S, Hq)](
            po, plse, out, *spo, *spl, *out.stride(), num_splits,
            D=D, DP=DP, SP=max(2, _next_pow2(num_splits)),
            CH=min(16, max(2, _next_pow2(num_splits))), num_warps=4,
        )
    return out
