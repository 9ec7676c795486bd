"""DASH as a vLLM attention backend: backend facts, per-step metadata + builder, per-layer impl.

Per step (builder, once for all layers): decodes are reordered to the front and split
from prefills; capacity buffers (compacted selections, select scratch, split-KV partials)
live in the builder, allocated once. Per layer (impl): decode tokens go to the DASH kernels
(select -> sparse split-KV decode; on CPU the torch reference); prefill and mixed-batch
tokens to dense causal attention (vLLM's FlashAttention / Triton kernels on GPU, torch SDPA
on CPU). K/V writes also refresh the block summaries, kept in each KV page's padding.

KV cache layout (layout.py): (num_blocks, 2, Hk, B, D), head-major per block, K then V, the
fp32 summaries [Hk, Ds] in the page padding; kernels see K and V as [num_blocks, B, Hk, D]
views. The DASH settings are parsed and their summary kind resolved once per process
(compat.engine_summaries: "auto" -> attn_pool when pooling vectors exist); each layer's Impl
keeps its layer's DashParams and, for attn_pool, its pooling vectors fp32 [Hk, D] on the
layer's device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionLayer,
                                       AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata)

from vllm.logger import init_logger

from vllm_dash import compat, layout
from vllm_dash.config import DashConfig
from vllm_dash.kernels.checks import check_heads
from vllm_dash.kernels.params import DashParams
from vllm_dash.stats import STATS

logger = init_logger("vllm.vllm_dash")  # under "vllm" so vLLM's log config shows it


class DashAttentionBackend(AttentionBackend):
    IS_DASH = True                   # compat's page padding checks this attribute
    DEFAULT_BLOCK_SIZE = layout.DEFAULT_BLOCK_SIZE
    forward_includes_kv_cache_update = False
    supported_dtypes: ClassVar[list] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"          # vLLM 0.26 looks backends up by enum name: the CUSTOM slot

    @staticmethod
    def get_impl_cls():
        return DashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return DashMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_size: int, cache_dtype_str: str = "auto") -> tuple:
        return layout.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)

    @staticmethod
    def get_supported_kernel_block_sizes() -> list:
        return list(layout.SUPPORTED_BLOCK_SIZES)

    @classmethod
    def supports_block_size(cls, block_size) -> bool:
        return block_size is None or block_size in layout.SUPPORTED_BLOCK_SIZES

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return cls.DEFAULT_BLOCK_SIZE

    @classmethod
    def get_supported_head_sizes(cls) -> list:
        return list(layout.HEAD_SIZES)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla,
                             has_sink, use_sparse, device_capability, *args, **kwargs):
        return None


@dataclass
class DashMetadata:
    num_actual_tokens: int
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    num_splits: int
    buffers: "DashBuffers"
    prefill_query_start_loc: Optional[torch.Tensor] = None   # prefill part, rebased to 0


class DashBuffers:
    """Capacity buffers shared by all layers of a step (layers run one after another)."""

    def __init__(self, *, max_num_seqs: int, num_heads: int, num_kv_heads: int,
                 head_size: int, max_blocks: int, device: torch.device):
        self.max_blocks = max_blocks
        self.block_ids = torch.zeros(max_num_seqs, num_kv_heads, max_blocks, dtype=torch.int32,
                                     device=device)
        self.log_prior = torch.zeros(max_num_seqs, num_kv_heads, max_blocks,
                                     dtype=torch.float32, device=device)
        self.counts = torch.zeros(max_num_seqs, num_kv_heads, dtype=torch.int32, device=device)
        self.select_ws = None
        self.decode_ws = None
        if device.type == "cuda":
            from vllm_dash.kernels.decode import DecodeWorkspace
            from vllm_dash.kernels.select import SelectWorkspace
            self.select_ws = SelectWorkspace(max_num_seqs, num_heads, num_kv_heads, max_blocks,
                                             device=device)
            self.decode_ws = DecodeWorkspace(max_num_seqs, num_heads, head_size,
                                             max_splits=16, device=device)


class DashMetadataBuilder(AttentionMetadataBuilder[DashMetadata]):
    _cudagraph_support = compat.attention_cg_support_uniform_decode()

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self.block_size = kv_cache_spec.block_size
        model_config = vllm_config.model_config
        parallel = vllm_config.parallel_config
        self.num_heads = model_config.get_num_attention_heads(parallel)
        self.num_kv_heads = model_config.get_num_kv_heads(parallel)
        self.head_size = model_config.get_head_size()
        max_blocks = -(-model_config.max_model_len // self.block_size)
        max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        self.buffers = DashBuffers(max_num_seqs=max_num_seqs, num_heads=self.num_heads,
                                   num_kv_heads=self.num_kv_heads, head_size=self.head_size,
                                   max_blocks=max_blocks, device=torch.device(device))
        summaries = compat.engine_summaries(vllm_config)
        config = summaries.config
        config.check_num_layers(len(layer_names))
        if summaries.pool is not None:   # every layer's vectors on the device, before capture
            first = compat.kv_head_offset(summaries.pool.shape[1])
            for name in layer_names:
                summaries.layer_pool(compat.layer_index(name), first, self.num_kv_heads,
                                     device)
        self.stats_interval = config.stats_interval
        self._step = 0
        self._prev_decodes = 0
        if self.stats_interval:
            num_layers = 1 + max(compat.layer_index(n) for n in layer_names)
            STATS.allocate(num_layers=num_layers, max_num_seqs=max_num_seqs,
                           num_kv_heads=self.num_kv_heads, block_size=self.block_size,
                           device=device)
        logger.info("DASH attention backend: block_size=%d, %d layers, device=%s, config=%s",
                    self.block_size, len(layer_names), device, config.to_dict())

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DashMetadata:
        cam = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, _ = compat.split_decodes_and_prefills(cam)
        if self.stats_interval:
            # host side, between steps: sample the last step's selection counts (async copy)
            self._step += 1
            if self._step % self.stats_interval == 0:
                STATS.sample(self._prev_decodes)
            self._prev_decodes = num_decodes
        num_splits = 1
        if self.buffers.decode_ws is not None and num_decodes:
            from vllm_dash.kernels.decode import choose_num_splits
            num_splits = choose_num_splits(num_seqs=num_decodes, num_kv_heads=self.num_kv_heads,
                                           max_blocks_per_seq=cam.block_table_tensor.shape[1],
                                           block_size=self.block_size, device=self.device,
                                           max_splits=self.buffers.decode_ws.max_splits)
        return DashMetadata(
            num_actual_tokens=cam.num_actual_tokens, num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens, num_prefills=num_prefills,
            max_query_len=cam.max_query_len, max_seq_len=cam.max_seq_len,
            query_start_loc=cam.query_start_loc, seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor, slot_mapping=cam.slot_mapping,
            num_splits=num_splits, buffers=self.buffers,
            prefill_query_start_loc=(cam.query_start_loc[num_decodes:] - num_decode_tokens
                                     if num_prefills else None))


class DashAttentionImpl(AttentionImpl):

    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: Optional[int] = None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype: str = "auto", logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 **extra):
        reasons = []
        if alibi_slopes is not None:
            reasons.append("ALiBi is not supported")
        if sliding_window is not None:
            reasons.append("sliding-window attention is not supported")
        if logits_soft_cap:
            reasons.append("logits soft-capping is not supported")
        if attn_type != AttentionType.DECODER:
            reasons.append(f"attention type {attn_type} is not supported (decoder only)")
        if kv_cache_dtype not in ("auto", "float16", "bfloat16"):
            reasons.append(f"kv_cache_dtype={kv_cache_dtype} is not supported (fp16/bf16 only)")
        if extra.get("sinks") is not None:
            reasons.append("attention sinks are not supported")
        if reasons:
            raise ValueError("DASH attention backend: " + "; ".join(reasons))
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        check_heads(num_heads, self.num_kv_heads)
        # resolves summary "auto" and reads the pooling vectors (once per process): a bad
        # summary_file stops the engine here, while the model is built
        self.engine = compat.engine_summaries(compat.current_vllm_config())
        self.config = self.engine.config
        self.summary = self.config.summary       # concrete kind, fixed for the engine
        self._layer_idx: Optional[int] = None      # known at the first forward
        self._params: Optional[DashParams] = None
        self.pool: Optional[torch.Tensor] = None   # attn_pool: fp32 [Hk, D] on the device
        self._fa = None

    def set_config(self, config: DashConfig) -> None:
        """Replace this layer's DASH settings (the accuracy harness switches settings in one
        eager engine: eval/ calls this through set_runtime_config). The summary kind and
        summary_file are engine settings (page size, cache contents): a config that resolves
        to another kind, or names another summary_file, is refused."""
        new = self.config.runtime_change(config, has_pool=self.engine.pool is not None)
        self.config = new
        self._params = None

    def _layer(self, layer: AttentionLayer, device: torch.device) -> tuple:
        """(layer index, DashParams, pooling vectors or None) of this layer, computed once."""
        if self._layer_idx is None:
            self._layer_idx = compat.layer_index(layer.layer_name)
            if self.engine.pool is not None:      # copied to the device by the builder
                first = compat.kv_head_offset(self.engine.pool.shape[1])
                self.pool = self.engine.layer_pool(self._layer_idx, first, self.num_kv_heads,
                                                   device)
        if self._params is None:
            self._params = self.config.params_for_layer(self._layer_idx)
        return self._layer_idx, self._params, self.pool

    # ----------------------------------------------------------------- cache views
    def _views(self, kv_cache: torch.Tensor):
        key_cache, value_cache = layout.kv_views(kv_cache)   # [nb, B, Hk, D] views
        summaries = layout.summary_view(kv_cache, self.num_kv_heads, self.head_size,
                                        self.summary)
        return key_cache, value_cache, summaries

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        key_cache, value_cache, summaries = self._views(kv_cache)
        _, _, pool = self._layer(layer, kv_cache.device)
        n = slot_mapping.shape[0]
        if kv_cache.is_cuda:
            from vllm_dash.kernels.summaries import write_kv_and_summaries
            write_kv_and_summaries(key=key[:n], value=value[:n], key_cache=key_cache,
                                   value_cache=value_cache, summaries=summaries,
                                   slot_mapping=slot_mapping, summary=self.summary, pool=pool)
        else:
            from vllm_dash import cpu
            cpu.write_kv_and_summaries(key[:n], value[:n], key_cache, value_cache, summaries,
                                       slot_mapping, summary=self.summary, pool=pool)

    # ----------------------------------------------------------------- attention
    def forward(self, layer: AttentionLayer, query, key, value, kv_cache, attn_metadata,
                output, output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("DASH does not fuse output quantization")
        if attn_metadata is None:                 # profiling run
            return output
        md: DashMetadata = attn_metadata
        key_cache, value_cache, summaries = self._views(kv_cache)
        layer_idx, params, _ = self._layer(layer, kv_cache.device)
        nd = md.num_decode_tokens
        if md.num_decodes:
            if kv_cache.is_cuda:
                self._decode_gpu(md, query[:nd], key_cache, value_cache, summaries,
                                 output[:nd], layer_idx, params)
            else:
                from vllm_dash import cpu
                counts = cpu.decode(md, query[:nd], key_cache, value_cache, summaries,
                                    output[:nd], params=params, scale=self.scale)
                if self.config.stats_interval:
                    STATS.record(layer_idx, counts.to(torch.int32),
                                 md.seq_lens[:md.num_decodes])
        if md.num_prefills:
            if kv_cache.is_cuda:
                self._prefill_gpu(md, query, key_cache, value_cache, output)
            else:
                from vllm_dash import cpu
                cpu.prefill(md, query, key_cache, value_cache, output, scale=self.scale)
        return output

    def _decode_gpu(self, md: DashMetadata, q, key_cache, value_cache, summaries, out,
                    layer_idx: int, params: DashParams) -> None:
        from vllm_dash.kernels.decode import sparse_decode
        from vllm_dash.kernels.select import select_blocks_paged
        b = md.buffers
        S = md.num_decodes
        seq_lens = md.seq_lens[:S]
        block_table = md.block_table[:S]
        # statistics: the selection kernel writes the counts to the stats buffer as well
        # (no copy launch per layer); layer 0 copies the lengths
        stats_counts = STATS.counts_out(layer_idx) if self.config.stats_interval else None
        select_blocks_paged(q=q, summaries=summaries, block_table=block_table,
                            seq_lens=seq_lens, out_block_ids=b.block_ids,
                            out_log_prior=b.log_prior, out_counts=b.counts, params=params,
                            block_size=key_cache.shape[1], scale=self.scale,
                            workspace=b.select_ws, out_counts_copy=stats_counts)
        sparse_decode(q=q, key_cache=key_cache, value_cache=value_cache, block_ids=b.block_ids,
                      log_prior=b.log_prior, counts=b.counts, seq_lens=seq_lens, out=out,
                      params=params, block_size=key_cache.shape[1], scale=self.scale,
                      num_splits=md.num_splits, workspace=b.decode_ws)
        if stats_counts is not None:
            STATS.record_lens(layer_idx, seq_lens)

    def _prefill_gpu(self, md: DashMetadata, query, key_cache, value_cache, output) -> None:
        nd, nr = md.num_decode_tokens, md.num_decodes
        n = md.num_actual_tokens
        qsl = md.prefill_query_start_loc
        if self._fa is None:
            self._fa = compat.flash_attn_varlen()
        fa, version = self._fa
        if fa is not None:
            fa(q=query[nd:n], k=key_cache, v=value_cache, out=output[nd:n], cu_seqlens_q=qsl,
               max_seqlen_q=md.max_query_len, seqused_k=md.seq_lens[nr:],
               max_seqlen_k=md.max_seq_len, softmax_scale=self.scale, causal=True,
               block_table=md.block_table[nr:], fa_version=version)
        else:
            compat.triton_unified_attention()(
                q=query[nd:n], k=key_cache, v=value_cache, out=output[nd:n], cu_seqlens_q=qsl,
                max_seqlen_q=md.max_query_len, seqused_k=md.seq_lens[nr:],
                max_seqlen_k=md.max_seq_len, softmax_scale=self.scale, causal=True,
                window_size=(-1, -1), block_table=md.block_table[nr:], softcap=0,
                q_descale=None, k_descale=None, v_descale=None)
