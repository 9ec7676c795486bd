"""K1 of stage 1 (kernels/select.py): the block scores of every summary kind, one launch.

For the G query heads of a KV head and CHUNK blocks at a time (physical ids through the
block table), the score u of :func:`reference_summaries.summary_scores`:
  mean, attn_pool   u = scale * q_h . kbar_c                        one ``tl.dot``
  minmax            u = scale * sum_d max(q_d min_d, q_d max_d)
                      = scale * (q . (min + max) / 2 + |q| . (max - min) / 2)
                    (max(a, b) = (a + b) / 2 + |a - b| / 2 with a - b = q_d (min_d - max_d)
                    and max_d >= min_d), two ``tl.dot`` calls on the same tiles.
The G rows are padded to 16 for the dot; fp32 inputs with "tf32x3" precision (three TF32
tensor-core products, fp32-level accuracy: measured |dz|/max|z| ~5e-7 on an H200 for mean).
The kind is a constexpr: the mean / attn_pool path compiles to the same code as before
minmax existed. Scores go to the workspace [S, Hq, n_max] (K2 turns them into z in place).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["SCORE_CHUNK", "launch_scores"]

SCORE_CHUNK = 64            # blocks per K1 iteration (the dot tile is [D, CHUNK] fp32)
_K1_PROGRAMS_PER_SM = 8     # K1 grid size: see _score_programs


@triton.jit
def _active(lens_ptr, s, block_size, dense_below):
    """(number of blocks, whether stage 1 runs) of sequence s: every stage-1 kernel's test
    (a length <= 0 is a padding row; a sequence below dense_below attends densely)."""
    L = tl.maximum(tl.load(lens_ptr + s).to(tl.int32), 0)
    n = (L + block_size - 1) // block_size
    return n, (L >= dense_below) & (n > 0)


@triton.jit
def _scores_kernel(
    q_ptr, summ_ptr, bt_ptr, lens_ptr, u_ptr,
    stride_qs, stride_qh, stride_qd, stride_sb, stride_sh, stride_sd, stride_bts, stride_btb,
    stride_us, stride_uh,
    scale, block_size, dense_below, nprog,
    G: tl.constexpr, G_DOT: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
    CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr, MINMAX: tl.constexpr,
):
    # program j of a (sequence, KV head) scores chunks j, j + nprog, ...
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    first = tl.program_id(2) * CHUNK
    n, active = _active(lens_ptr, s, block_size, dense_below)
    if active & (first < n):
        gd = tl.arange(0, G_DOT)
        d = tl.arange(0, D_P2)
        qv = tl.load(q_ptr + s.to(tl.int64) * stride_qs + (kvh * G + gd)[:, None] * stride_qh
                     + d[None, :] * stride_qd,
                     mask=(gd < G)[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        if MINMAX:
            q_abs = tl.abs(qv)
        for start in range(first, n, nprog * CHUNK):
            c = start + tl.arange(0, CHUNK)
            cm = c < n
            pid = tl.load(bt_ptr + s.to(tl.int64) * stride_bts + c * stride_btb, mask=cm,
                          other=0).to(tl.int64)
            tile = summ_ptr + pid[None, :] * stride_sb + kvh * stride_sh
            tmask = cm[None, :] & (d < D)[:, None]
            kT = tl.load(tile + d[:, None] * stride_sd, mask=tmask,
                         other=0.0).to(tl.float32)                     # [D, CHUNK]
            if MINMAX:          # kT holds the minima; the maxima follow D floats later
                hiT = tl.load(tile + (D + d)[:, None] * stride_sd, mask=tmask,
                              other=0.0).to(tl.float32)
                u = (tl.dot(qv, (kT + hiT) * 0.5, input_precision=DOT_PRECISION)
                     + tl.dot(q_abs, (hiT - kT) * 0.5, input_precision=DOT_PRECISION)) * scale
            else:
                u = tl.dot(qv, kT, input_precision=DOT_PRECISION) * scale   # [G_DOT, CHUNK]
            tl.store(u_ptr + s.to(tl.int64) * stride_us + (kvh * G + gd)[:, None] * stride_uh
                     + c[None, :], u, mask=(gd < G)[:, None] & cm[None, :])


def _score_programs(chunks: int, pairs: int, device) -> int:
    """K1 programs per (sequence, KV head), from shapes only (fixed under CUDA graphs):
    about ``_K1_PROGRAMS_PER_SM`` programs per SM in all, each looping over every
    ``nprog``-th chunk. A grid of one program per chunk of the capacity (thousands of
    programs at batch 8 with a 128K capacity) costs microseconds per layer even when every
    program exits at once (sequences below dense_below). On CPU (the interpreter): at most
    2, so the tests run the loop."""
    if device.type != "cuda":
        return max(1, min(chunks, 2))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(chunks, -(-_K1_PROGRAMS_PER_SM * sms // max(1, pairs))))


def launch_scores(q, summaries, block_table, seq_lens, u, *, scale: float, block_size: int,
                  dense_below: int, chunk: int, minmax: bool) -> None:
    """K1 into the workspace rows ``u`` [>=S, Hq, >=n_max] (shapes checked by the caller,
    select.select_blocks_paged)."""
    S, Hq, D = q.shape
    Hk = summaries.shape[1]
    G = Hq // Hk
    nprog = _score_programs(triton.cdiv(block_table.shape[1], chunk), S * Hk, q.device)
    _scores_kernel[(S, Hk, nprog)](
        q, summaries, block_table, seq_lens, u,
        *q.stride(), *summaries.stride(), *block_table.stride(), u.stride(0), u.stride(1),
        scale, block_size, dense_below, nprog,
        G=G, G_DOT=max(16, triton.next_power_of_2(G)), D=D,
        D_P2=max(16, triton.next_power_of_2(D)), CHUNK=chunk, DOT_PRECISION="tf32x3",
        MINMAX=minmax, num_warps=4,
    )
