"""kernels/summaries.py (fused cache write + block summaries) vs its twin
reference.write_kv_and_summaries and reference.block_summaries_paged, on the CPU under the
Triton interpreter (small shapes) and on a GPU (the same small cases, plus real shapes: D=128,
8 KV heads, 32K contexts, fp16/bf16, and CUDA-graph capture and replay), for every summary
kind (mean, minmax, attn_pool; the kinds' own properties: test_summary_kinds.py).

Scenarios follow vLLM's use: prefill of ragged sequences (several blocks per sequence, the
last one partial), chunked prefill, decode steps appending one token per sequence, padding
slots (-1), prefix-shared full blocks (never in slot_mapping), and reuse of a freed block
from offset 0.
"""
import math

import pytest
import torch

from kernel_helpers import DEVICES, INTERPRETER_WARNINGS, generator, on_devices
from vllm_dash.kernels import reference as ref
from vllm_dash.kernels.params import SUMMARY_KINDS, summary_dim
from vllm_dash.kernels.summaries import write_kv_and_summaries

pytestmark = INTERPRETER_WARNINGS
KINDS = list(SUMMARY_KINDS)


def make_pool(summary, Hk, D, g, device):
    """Pooling vectors for attn_pool (scaled so the softmax is far from uniform), else None."""
    if summary != "attn_pool":
        return None
    return torch.randn(Hk, D, generator=g, device=device) * 2.0


class PagedState:
    """A paged cache + summaries pair, written by the kernel and by the torch twin side by
    side; ``tables``/``lens`` track what each sequence holds (for block_summaries_paged)."""

    def __init__(self, num_blocks, B, Hk, D, dtype, head_major=False, seed=0, device="cpu",
                 summary="mean"):
        g = generator(device, seed)
        self.B, self.Hk, self.D, self.dtype, self.device = B, Hk, D, dtype, device
        self.kind = dict(summary=summary, pool=make_pool(summary, Hk, D, g, device))
        # stale garbage everywhere: nothing may read a slot that was not written
        shape = (num_blocks, Hk, B, D) if head_major else (num_blocks, B, Hk, D)
        base = [torch.randn(shape, generator=g, device=device).to(dtype) * 7 + 3
                for _ in range(2)]
        if head_major:
            base = [b.transpose(1, 2) for b in base]          # [num_blocks, B, Hk, D] views
        self.kc, self.vc = base
        self.kc_t, self.vc_t = [b.clone() for b in base]
        self.summ = torch.randn(num_blocks, Hk, summary_dim(summary, D), generator=g,
                                device=device) * 5                          # stale
        self.summ_t = self.summ.clone()
        self.g = g

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g, device=self.device)

    def step(self, slots, key_dtype=None):
        T = len(slots)
        kd = key_dtype or self.dtype
        key = self.randn(T, self.Hk, self.D).to(kd)
        value = self.randn(T, self.Hk, self.D).to(kd)
        sm = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self.write(key, value, sm)
        ref.write_kv_and_summaries(key=key, value=value, key_cache=self.kc_t,
                                   value_cache=self.vc_t, summaries=self.summ_t,
                                   slot_mapping=sm, **self.kind)
        return key, value, sm

    def write(self, key, value, sm):
        """The kernel alone on this state's cache and summaries."""
        write_kv_and_summaries(key=key, value=value, key_cache=self.kc, value_cache=self.vc,
                               summaries=self.summ, slot_mapping=sm, **self.kind)

    def expect(self, keys):
        """The summary of a block holding ``keys`` [n, Hk, D] (the twin's definition)."""
        present = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
        return ref.summarize_blocks(keys, present, **self.kind)

    def check(self, touched_blocks=None):
        torch.testing.assert_close(self.kc, self.kc_t, rtol=0, atol=0)
        torch.testing.assert_close(self.vc, self.vc_t, rtol=0, atol=0)
        torch.testing.assert_close(self.summ, self.summ_t, rtol=1e-5, atol=1e-5)

    def check_reference(self, tables, lens, blocks):
        """Summaries of ``blocks`` equal reference.block_summaries_paged on the whole cache."""
        bt = torch.tensor(tables, dtype=torch.int32, device=self.device)
        expect = ref.block_summaries_paged(self.kc, bt, torch.tensor(lens, device=self.device),
                                           **self.kind)
        idx = torch.tensor(sorted(blocks), device=self.device)
        torch.testing.assert_close(self.summ[idx], expect[idx], rtol=1e-5, atol=1e-5)


def _prefill_slots(table, start, stop, B):
    """Slots of tokens [start, stop) of a sequence with this block table."""
    return [table[p // B] * B + p % B for p in range(start, stop)]


SHAPES = [
    (16, 2, 32, torch.float32, False),
    (16, 1, 64, torch.bfloat16, True),
    (64, 2, 64, torch.float32, True),
    (64, 1, 32, torch.bfloat16, False),
    (16, 2, 80, torch.float32, False),          # head dim not a power of two
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("summary,B,Hk,D,dtype,head_major",
                         [("mean", *c) for c in SHAPES]
                         + [(k, *SHAPES[i]) for k in KINDS[1:] for i in (1, 4)])
def test_prefill_then_decode(device, summary, B, Hk, D, dtype, head_major):
    num_blocks = 24
    st = PagedState(num_blocks, B, Hk, D, dtype, head_major=head_major, seed=B + D,
                    device=device, summary=summary)
    # ragged lengths: partial single block, exactly one block, multiple of B, ragged multi
    lens = [B // 2 - 1, B, 2 * B, 2 * B + 3]
    # the blocks the decode steps append to are distinct (a step never writes one slot
    # twice: vLLM's slot_mapping); 0 marks a block a sequence never reaches
    tables = [[5, 0, 0], [9, 1, 0], [2, 11, 4], [7, 3, 14]]
    slots = []
    for tab, L in zip(tables, lens):
        slots += _prefill_slots(tab, 0, L, B)
    slots = slots + [-1] * 5                       # padded batch
    st.step(slots)
    st.check()
    used = {b for tab, L in zip(tables, lens) for b in tab[: -(-L // B)]}
    st.check_reference(tables, lens, used)
    # decode steps: one token per sequence, padding in between sequences' rows
    for _ in range(3):
        slots = []
        for i, (tab, L) in enumerate(zip(tables, lens)):
            if L // B >= len(tab):
                slots.append(-1)
                continue
            slots.append(tab[L // B] * B + L % B)
            lens[i] = L + 1
            if i == 1:
                slots.append(-1)
        st.step(slots)
        st.check()
        used = {b for tab, L in zip(tables, lens) for b in tab[: -(-L // B)]}
        st.check_reference(tables, lens, used)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("summary", KINDS)
def test_chunked_prefill_continues_partial_block(device, summary):
    """A second prefill chunk starting mid-block keeps the first chunk's keys (read from the
    cache) and adds the new ones (read from ``key``)."""
    B, Hk, D = 16, 2, 32
    st = PagedState(8, B, Hk, D, torch.float32, seed=3, device=device, summary=summary)
    tab = [4, 1, 6]
    st.step(_prefill_slots(tab, 0, 21, B))                 # block 4 full, block 1 fill 5
    st.check()
    st.step(_prefill_slots(tab, 21, 40, B) + [-1, -1])      # block 1 5..15, block 6 0..7
    st.check()
    st.check_reference([tab], [40], {4, 1, 6})
    # mixed step: a decode token of another sequence between two chunks' tokens
    tab2 = [3, 0, 0]
    slots = _prefill_slots(tab2, 0, 7, B) + [-1] + _prefill_slots(tab, 40, 44, B)
    st.step(slots)
    st.check()
    st.check_reference([tab, tab2], [44, 7], {4, 1, 6, 3})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("summary", KINDS)
def test_prefix_shared_blocks_untouched(device, summary):
    """Two sequences share full blocks 2 and 5 through their block tables (prefix caching):
    only their private blocks are in slot_mapping; the shared summaries stay as computed."""
    B, Hk, D = 16, 2, 32
    st = PagedState(10, B, Hk, D, torch.float32, seed=4, device=device, summary=summary)
    shared = [2, 5]
    st.step(_prefill_slots(shared + [7], 0, 2 * B + 4, B))   # first sequence: 36 tokens
    st.check()
    before = st.summ[shared].clone()
    tab_b = shared + [8]
    st.step(_prefill_slots(tab_b, 2 * B, 2 * B + 9, B))     # second: only its suffix is new
    st.check()
    torch.testing.assert_close(st.summ[shared], before, rtol=0, atol=0)
    st.check_reference([shared + [7], tab_b], [2 * B + 4, 2 * B + 9], {2, 5, 7, 8})
    # decode on both
    st.step([7 * B + 4, 8 * B + 9])
    st.check()
    st.check_reference([shared + [7], tab_b], [2 * B + 5, 2 * B + 10], {2, 5, 7, 8})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("summary,B", [("mean", 16), ("mean", 64), ("minmax", 64),
                                       ("attn_pool", 64)])
def test_block_reuse_matches_fresh(device, summary, B):
    """A freed, full block rewritten from offset 0 with new (fewer) tokens must give the
    summary of the new tokens only, equal to writing them into a never-used block."""
    Hk, D = 2, 32
    st = PagedState(6, B, Hk, D, torch.float32, seed=B, device=device, summary=summary)
    st.step(_prefill_slots([3], 0, B, B))                  # block 3 full
    st.check()
    g = generator(device, 11)
    n_new = B // 4 + 1
    key = torch.randn(n_new, Hk, D, generator=g, device=device)
    value = torch.randn(n_new, Hk, D, generator=g, device=device)
    sm = torch.tensor(_prefill_slots([3], 0, n_new, B), device=device)   # reuse block 3
    st.write(key, value, sm)
    torch.testing.assert_close(st.summ[3], st.expect(key), rtol=1e-5, atol=1e-6)
    # fresh block (never written) with the same tokens gives the same summary
    sm_fresh = torch.tensor(_prefill_slots([5], 0, n_new, B), device=device)
    st.write(key, value, sm_fresh)
    torch.testing.assert_close(st.summ[3], st.summ[5], rtol=0, atol=0)
    # decode-style reuse: a single token at offset 0 of a freed block: every kind of one
    # key is the key itself (minmax: twice)
    sm1 = torch.tensor([3 * B], device=device)
    st.write(key[:1], value[:1], sm1)
    one = key[0].float()
    torch.testing.assert_close(st.summ[3], torch.cat([one, one], -1) if summary == "minmax"
                               else one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_keys_into_bf16_cache_summary_is_of_cached_values(device):
    """Keys in another dtype than the cache: the summary is the mean of what the cache
    holds. (Triton's CPU interpreter rounds fp32 -> bf16 by truncation, the GPU to nearest
    even, so the stored values are compared to torch's rounding within one bf16 ulp.)"""
    B, Hk, D = 16, 1, 32
    st = PagedState(4, B, Hk, D, torch.bfloat16, seed=9, device=device)
    key, value, sm = st.step(_prefill_slots([1], 0, 10, B), key_dtype=torch.float32)
    torch.testing.assert_close(st.kc[1, :10].float(), key.to(torch.bfloat16).float(),
                               rtol=2 ** -7, atol=0)
    expect = st.kc[1, :10].float().mean(0)
    torch.testing.assert_close(st.summ[1], expect, rtol=1e-6, atol=1e-6)
    st.check_reference([[1]], [10], {1})


@pytest.mark.parametrize("device", DEVICES)
def test_all_padding_and_empty(device):
    B, Hk, D = 16, 1, 32
    st = PagedState(4, B, Hk, D, torch.float32, seed=1, device=device)
    st.step([-1, -1, -1])
    st.check()
    empty = torch.empty(0, Hk, D, device=device)
    write_kv_and_summaries(key=empty, value=empty, key_cache=st.kc, value_cache=st.vc,
                           summaries=st.summ,
                           slot_mapping=torch.empty(0, dtype=torch.long, device=device))
    st.check()


@pytest.mark.parametrize("device", DEVICES)
def test_argument_errors(device):
    kc = torch.zeros(4, 16, 2, 32, device=device)
    key = torch.zeros(3, 2, 32, device=device)
    summ = torch.zeros(4, 2, 32, device=device)
    sm = torch.zeros(3, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="summaries"):
        write_kv_and_summaries(key=key, value=key, key_cache=kc, value_cache=kc,
                               summaries=summ.half(), slot_mapping=sm)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_and_summaries(key=key, value=key, key_cache=kc, value_cache=kc,
                               summaries=summ, slot_mapping=sm[:2])
    with pytest.raises(ValueError, match="key"):
        write_kv_and_summaries(key=key[:, :1], value=key[:, :1], key_cache=kc,
                               value_cache=kc, summaries=summ, slot_mapping=sm)


# --------------------------------------------------------------------------------------
# chunked prefill and decode steps over whole sequences (real shapes on the GPU)
# --------------------------------------------------------------------------------------
STEPS_SMALL = [dict(B=16, Hk=2, D=32, dtype=torch.bfloat16, head_major=True,
                    lens=[2 * 16 + 5, 7, 3 * 16], summary=k) for k in ("mean", "attn_pool")]
STEPS_REAL = [dict(B=B, Hk=8, D=D, dtype=dt, head_major=hm, lens=[32 * 1024 + 17, 5000, 6400],
                   summary=k)
              for B, D, dt, hm in [(64, 128, torch.float16, False), (16, 128, torch.bfloat16, True),
                                   (64, 64, torch.bfloat16, True)]
              for k in KINDS]


@pytest.mark.parametrize("device,case", on_devices(cpu=STEPS_SMALL, cuda=STEPS_REAL))
def test_chunked_prefill_then_decode_steps(device, case):
    """Every sequence prefilled in two chunks (the second starting mid-block) with padding
    slots, then three decode steps; after each step the cache equals the twin's exactly and
    the summaries to 1e-5; at the end the summaries of every used block equal
    reference.block_summaries_paged over the whole cache."""
    B, Hk, D, dtype, lens = case["B"], case["Hk"], case["D"], case["dtype"], case["lens"]
    n = [-(-L // B) for L in lens]
    nmax = max(n) + 4
    num_blocks = sum(nmax for _ in lens) + 8
    g = generator(device, B)
    kind = dict(summary=case["summary"], pool=make_pool(case["summary"], Hk, D, g, device))
    Ds = summary_dim(case["summary"], D)
    shape = (num_blocks, Hk, B, D) if case["head_major"] else (num_blocks, B, Hk, D)
    kc = torch.randn(shape, generator=g, device=device).to(dtype)
    vc = torch.randn(shape, generator=g, device=device).to(dtype)
    if case["head_major"]:
        kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)
    kc_t, vc_t = kc.clone(), vc.clone()
    summ = torch.randn(num_blocks, Hk, Ds, device=device)
    summ_t = summ.clone()
    perm = torch.randperm(num_blocks, generator=g, device=device)[: len(lens) * nmax]
    bt = perm.view(len(lens), nmax).to(torch.int32)

    def slots_for(s, a, b):
        pos = torch.arange(a, b, device=device)
        return bt[s, pos // B].long() * B + pos % B

    def step(slot_list):
        sm = torch.cat(slot_list)
        T = sm.numel()
        key = torch.randn(T, Hk, D, generator=g, device=device).to(dtype)
        val = torch.randn(T, Hk, D, generator=g, device=device).to(dtype)
        write_kv_and_summaries(key=key, value=val, key_cache=kc, value_cache=vc,
                               summaries=summ, slot_mapping=sm, **kind)
        ref.write_kv_and_summaries(key=key, value=val, key_cache=kc_t, value_cache=vc_t,
                                   summaries=summ_t, slot_mapping=sm, **kind)
        assert torch.equal(kc, kc_t) and torch.equal(vc, vc_t)
        torch.testing.assert_close(summ, summ_t, rtol=1e-5, atol=1e-5)

    pad = torch.full((7,), -1, dtype=torch.long, device=device)
    step([slots_for(s, 0, L // 2) for s, L in enumerate(lens)] + [pad])
    step([slots_for(s, L // 2, L) for s, L in enumerate(lens)])
    cur = list(lens)
    for _ in range(3):                                  # decode steps
        step([slots_for(s, L, L + 1) for s, L in enumerate(cur)] + [pad[:1]])
        cur = [L + 1 for L in cur]
    expect = ref.block_summaries_paged(kc, bt, torch.tensor(cur, device=device), **kind)
    used = torch.cat([bt[s, : -(-L // B)] for s, L in enumerate(cur)]).long()
    torch.testing.assert_close(summ[used], expect[used], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# CUDA graphs (GPU only)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("summary", KINDS)
def test_cuda_graph_capture_and_replay(device, summary):
    """Capture one decode-step write at fixed capacity; replay after changing keys, values
    and slots in place (padding slots included); each replay equals the twin."""
    Hk, D, B, nb = 8, 128, 64, 64
    kind = dict(summary=summary, pool=make_pool(summary, Hk, D, generator(device, 0), device))
    kc = torch.randn(nb, B, Hk, D, device=device).half()
    vc = torch.randn(nb, B, Hk, D, device=device).half()
    summ = torch.zeros(nb, Hk, summary_dim(summary, D), device=device)
    T = 16
    key = torch.zeros(T, Hk, D, device=device).half()
    val = torch.zeros_like(key)
    sm = torch.full((T,), -1, dtype=torch.long, device=device)

    def call():
        write_kv_and_summaries(key=key, value=val, key_cache=kc, value_cache=vc,
                               summaries=summ, slot_mapping=sm, **kind)

    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    kc_t, vc_t, summ_t = kc.clone(), vc.clone(), summ.clone()
    for step in range(3):
        key.copy_(torch.randn_like(key))
        val.copy_(torch.randn_like(val))
        slots = torch.arange(T, device=device) * B + step       # decode: one token per block
        slots[-3:] = -1
        sm.copy_(slots)
        graph.replay()
        ref.write_kv_and_summaries(key=key, value=val, key_cache=kc_t, value_cache=vc_t,
                                   summaries=summ_t, slot_mapping=sm, **kind)
        torch.cuda.synchronize()
        assert torch.equal(kc, kc_t)
        torch.testing.assert_close(summ, summ_t, rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(summ.abs().sum()))
