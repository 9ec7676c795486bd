"""kernels/summaries.py under the Triton interpreter vs its torch twin and the reference.

Scenarios follow vLLM's use: prefill of ragged sequences (several blocks per sequence, the
last one partial), decode steps appending one token per sequence, padding slots (-1),
prefix-shared full blocks (never in slot_mapping), and reuse of a freed block from offset 0.
"""
import pytest
import torch

from vllm_dash.kernels import reference as ref
from vllm_dash.kernels import reference as ref
from vllm_dash.kernels.summaries import write_kv_and_summaries


class PagedState:
    """A paged cache + summaries pair, written by the kernel and by the torch twin side by
    side; ``tables``/``lens`` track what each sequence holds (for block_summaries_paged)."""

    def __init__(self, num_blocks, B, Hk, D, dtype, head_major=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.B, self.Hk, self.D, self.dtype = B, Hk, D, dtype
        # stale garbage everywhere: nothing may read a slot that was not written
        shape = (num_blocks, Hk, B, D) if head_major else (num_blocks, B, Hk, D)
        base = [torch.randn(shape, generator=g).to(dtype) * 7 + 3 for _ in range(2)]
        if head_major:
            base = [b.transpose(1, 2) for b in base]          # [num_blocks, B, Hk, D] views
        self.kc, self.vc = base
        self.kc_t, self.vc_t = [b.clone() for b in base]
        self.summ = torch.randn(num_blocks, Hk, D, generator=g) * 5    # stale summaries
        self.summ_t = self.summ.clone()
        self.g = g

    def step(self, slots, key_dtype=None):
        T = len(slots)
        kd = key_dtype or self.dtype
        key = torch.randn(T, self.Hk, self.D, generator=self.g).to(kd)
        value = torch.randn(T, self.Hk, self.D, generator=self.g).to(kd)
        sm = torch.tensor(slots, dtype=torch.int64)
        write_kv_and_summaries(key=key, value=value, key_cache=self.kc, value_cache=self.vc,
                               summaries=self.summ, slot_mapping=sm)
        ref.write_kv_and_summaries(key=key, value=value, key_cache=self.kc_t,
                                   value_cache=self.vc_t, summaries=self.summ_t,
                                   slot_mapping=sm)
        return key, value, sm

    def check(self, touched_blocks=None):
        torch.testing.assert_close(self.kc, self.kc_t, rtol=0, atol=0)
        torch.testing.assert_close(self.vc, self.vc_t, rtol=0, atol=0)
        torch.testing.assert_close(self.summ, self.summ_t, rtol=1e-5, atol=1e-5)

    def check_reference(self, tables, lens, blocks):
        """Summaries of ``blocks`` equal reference.block_summaries_paged on the whole cache."""
        bt = torch.tensor(tables, dtype=torch.int32)
        expect = ref.block_summaries_paged(self.kc, bt, torch.tensor(lens))
        idx = torch.tensor(sorted(blocks))
        torch.testing.assert_close(self.summ[idx], expect[idx], rtol=1e-5, atol=1e-5)


def _prefill_slots(table, start, stop, B):
    """Slots of tokens [start, stop) of a sequence with this block table."""
    return [table[p // B] * B + p % B for p in range(start, stop)]


@pytest.mark.parametrize("B,Hk,D,dtype,head_major", [
    (16, 2, 32, torch.float32, False),
    (16, 1, 64, torch.bfloat16, True),
    (64, 2, 64, torch.float32, True),
    (64, 1, 32, torch.bfloat16, False),
    (16, 2, 80, torch.float32, False),          # head dim not a power of two
])
def test_prefill_then_decode(B, Hk, D, dtype, head_major):
    num_blocks = 24
    st = PagedState(num_blocks, B, Hk, D, dtype, head_major=head_major, seed=B + D)
    # ragged lengths: partial single block, exactly one block, multiple of B, ragged multi
    lens = [B // 2 - 1, B, 2 * B, 2 * B + 3]
    tables = [[5, 0, 0], [9, 0, 0], [2, 11, 0], [7, 3, 14]]
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


def test_chunked_prefill_continues_partial_block():
    """A second prefill chunk starting mid-block keeps the first chunk's keys (read from the
    cache) and adds the new ones (read from ``key``)."""
    B, Hk, D = 16, 2, 32
    st = PagedState(8, B, Hk, D, torch.float32, seed=3)
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


def test_prefix_shared_blocks_untouched():
    """Two sequences share full blocks 2 and 5 through their block tables (prefix caching):
    only their private blocks are in slot_mapping; the shared summaries stay as computed."""
    B, Hk, D = 16, 2, 32
    st = PagedState(10, B, Hk, D, torch.float32, seed=4)
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


@pytest.mark.parametrize("B", [16, 64])
def test_block_reuse_matches_fresh(B):
    """A freed, full block rewritten from offset 0 with new (fewer) tokens must give the
    summary of the new tokens only, equal to writing them into a never-used block."""
    Hk, D = 2, 32
    st = PagedState(6, B, Hk, D, torch.float32, seed=B)
    st.step(_prefill_slots([3], 0, B, B))                  # block 3 full
    st.check()
    g = torch.Generator().manual_seed(11)
    n_new = B // 4 + 1
    key = torch.randn(n_new, Hk, D, generator=g)
    value = torch.randn(n_new, Hk, D, generator=g)
    sm = torch.tensor(_prefill_slots([3], 0, n_new, B))       # reuse block 3
    write_kv_and_summaries(key=key, value=value, key_cache=st.kc, value_cache=st.vc,
                           summaries=st.summ, slot_mapping=sm)
    expect = key.float().mean(0)
    torch.testing.assert_close(st.summ[3], expect, rtol=1e-5, atol=1e-6)
    # fresh block (never written) with the same tokens gives the same summary
    sm_fresh = torch.tensor(_prefill_slots([5], 0, n_new, B))
    write_kv_and_summaries(key=key, value=value, key_cache=st.kc, value_cache=st.vc,
                           summaries=st.summ, slot_mapping=sm_fresh)
    torch.testing.assert_close(st.summ[3], st.summ[5], rtol=0, atol=0)
    # decode-style reuse: a single token at offset 0 of a freed block
    sm1 = torch.tensor([3 * B])
    write_kv_and_summaries(key=key[:1], value=value[:1], key_cache=st.kc, value_cache=st.vc,
                           summaries=st.summ, slot_mapping=sm1)
    torch.testing.assert_close(st.summ[3], key[0].float(), rtol=0, atol=0)


def test_fp32_keys_into_bf16_cache_summary_is_of_cached_values():
    """Keys in another dtype than the cache: the summary is the mean of what the cache
    holds. (Triton's CPU interpreter rounds fp32 -> bf16 by truncation, the GPU to nearest
    even, so the stored values are compared to torch's rounding within one bf16 ulp.)"""
    B, Hk, D = 16, 1, 32
    st = PagedState(4, B, Hk, D, torch.bfloat16, seed=9)
    key, value, sm = st.step(_prefill_slots([1], 0, 10, B), key_dtype=torch.float32)
    torch.testing.assert_close(st.kc[1, :10].float(), key.to(torch.bfloat16).float(),
                               rtol=2 ** -7, atol=0)
    expect = st.kc[1, :10].float().mean(0)
    torch.testing.assert_close(st.summ[1], expect, rtol=1e-6, atol=1e-6)
    st.check_reference([[1]], [10], {1})


def test_all_padding_and_empty():
    B, Hk, D = 16, 1, 32
    st = PagedState(4, B, Hk, D, torch.float32, seed=1)
    st.step([-1, -1, -1])
    st.check()
    empty = torch.empty(0, Hk, D)
    write_kv_and_summaries(key=empty, value=empty, key_cache=st.kc, value_cache=st.vc,
                           summaries=st.summ, slot_mapping=torch.empty(0, dtype=torch.long))
    st.check()


def test_argument_errors():
    kc = torch.zeros(4, 16, 2, 32)
    key = torch.zeros(3, 2, 32)
    summ = torch.zeros(4, 2, 32)
    sm = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="summaries"):
        write_kv_and_summaries(key=key, value=key, key_cache=kc, value_cache=kc,
                               summaries=summ.half(), slot_mapping=sm)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_and_summaries(key=key, value=key, key_cache=kc, value_cache=kc,
                               summaries=summ, slot_mapping=sm[:2])
    with pytest.raises(ValueError, match="key"):
        write_kv_and_summaries(key=key[:, :1], value=key[:, :1], key_cache=kc,
                               value_cache=kc, summaries=summ, slot_mapping=sm)
