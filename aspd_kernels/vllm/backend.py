"""A vLLM v1 attention backend on ``branch_attention_with_kvcache`` over vLLM's own paged KV cache.

vLLM gives the backend, per step: packed queries ``[T, Hq, D]``, ``query_start_loc`` ``[B+1]``, ``seq_lens`` ``[B]``,
the block table ``[B, max_blocks]`` and the slot of every new token (``slot_mapping [T]``). Two int32 id caches
``[num_blocks, block_size]`` (segment, branch of every KV slot) sit beside vLLM's KV cache, written with the same
slot mapping; the branch mask is computed from them inside the op, no dense mask anywhere. A request without a
layout has ids 0/0 everywhere, which is plain causal attention: then this backend computes what vLLM's own does.

The KV cache keeps CPU_ATTN's shape and layout (``[num_blocks, Hkv, block_size, 2*D]``: per block and head, the
keys then the values), so vLLM's allocator, profiler and block zeroing work unchanged; the op reads it through a
``[num_blocks, block_size, Hkv, D]`` view (strides only, no copy).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.attention.backend import (AttentionImpl, AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata)
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from ..branch_attention_with_kvcache import branch_attention_with_kvcache
from .layout import StepIds


@dataclass
class AspdMetadata:
    """One step's batch. ``q_b``, ``q_i`` (int64 ``[T]``): row and offset of each packed query in the padded
    ``[B, max_query_len]`` query; ``seg``, ``br`` (int32 ``[T]``): ids of the new tokens."""

    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    q_seqlens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    q_b: torch.Tensor
    q_i: torch.Tensor
    seg: torch.Tensor
    br: torch.Tensor


class AspdMetadataBuilder(AttentionMetadataBuilder[AspdMetadata]):
    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> AspdMetadata:
        m = common_attn_metadata
        qsl = m.query_start_loc_cpu.numpy().astype(np.int64)
        n_tok = int(qsl[-1])
        q_lens = np.diff(qsl)
        q_b = np.repeat(np.arange(len(q_lens)), q_lens)
        q_i = np.arange(n_tok) - qsl[:-1][q_b]
        seg, br = StepIds.seg, StepIds.br
        if len(seg) != n_tok:  # a step the runner did not prepare (profiling, warm-up): plain causal text
            seg, br = np.zeros(n_tok, np.int32), np.zeros(n_tok, np.int32)
        dev = m.query_start_loc.device
        return AspdMetadata(
            num_actual_tokens=n_tok, max_query_len=int(q_lens.max(initial=0)),
            query_start_loc=m.query_start_loc, seq_lens=m.seq_lens[:len(q_lens)].to(torch.int32),
            q_seqlens=torch.from_numpy(q_lens.astype(np.int32)).to(dev),
            block_table=m.block_table_tensor[:len(q_lens)].to(torch.int32), slot_mapping=m.slot_mapping[:n_tok],
            q_b=torch.from_numpy(q_b).to(dev), q_i=torch.from_numpy(q_i).to(dev),
            seg=torch.from_numpy(np.ascontiguousarray(seg)).to(dev),
            br=torch.from_numpy(np.ascontiguousarray(br)).to(dev))


class _IdCache:
    """Segment and branch of every KV slot, int32 ``[num_blocks, block_size]`` each, one pair per process (the
    ids are the same for every layer). Sized on first use from the KV cache."""

    seg: torch.Tensor | None = None
    br: torch.Tensor | None = None

    @classmethod
    def get(cls, num_blocks: int, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if cls.seg is None or cls.seg.shape != (num_blocks, block_size) or cls.seg.device != device:
            cls.seg = torch.zeros(num_blocks, block_size, dtype=torch.int32, device=device)
            cls.br = torch.zeros(num_blocks, block_size, dtype=torch.int32, device=device)
        return cls.seg, cls.br


def _split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[num_blocks, Hkv, block_size, 2*D]`` -> key and value views ``[num_blocks, block_size, Hkv, D]``."""
    nb, hkv, bs, d2 = kv_cache.shape
    kv = kv_cache.view(nb, hkv, 2 * bs, d2 // 2)
    k, v = kv[:, :, :bs], kv[:, :, bs:]
    return k.transpose(1, 2), v.transpose(1, 2)


class AspdAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None) -> None:
        unsupported = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
                       "logits_soft_cap": logits_soft_cap or None, "sinks": sinks}
        bad = [k for k, v in unsupported.items() if v is not None]
        if bad or attn_type != AttentionType.DECODER or kv_cache_dtype != "auto":
            raise NotImplementedError(f"the aspd attention backend runs decoder self-attention with an unquantized "
                                      f"cache and none of {bad or list(unsupported)}; got attn_type={attn_type}, "
                                      f"kv_cache_dtype={kv_cache_dtype}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write the new tokens' keys and values (``[T, Hkv, D]``) at their slots."""
        k_cache, v_cache = _split_cache(kv_cache)
        bs = k_cache.shape[1]
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        blk, off = slots // bs, slots % bs
        k_cache[blk, off] = key[:n].to(k_cache.dtype)
        v_cache[blk, off] = value[:n].to(v_cache.dtype)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AspdMetadata | None, output: torch.Tensor, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        """query ``[T, Hq, D]`` (new tokens, packed); output ``[T, Hq, D]`` written in place."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the aspd backend")
        if attn_metadata is None:  # profiling run
            return output
        md = attn_metadata
        n = md.num_actual_tokens
        k_cache, v_cache = _split_cache(kv_cache)
        seg_cache, br_cache = _IdCache.get(k_cache.shape[0], k_cache.shape[1], kv_cache.device)
        # every layer writes the same ids; doing it here keeps the builder free of the cache
        seg_cache.view(-1)[md.slot_mapping.long()] = md.seg
        br_cache.view(-1)[md.slot_mapping.long()] = md.br
        nreq = md.seq_lens.shape[0]
        q = query.new_zeros(nreq, md.max_query_len, self.num_heads, self.head_size)
        q[md.q_b, md.q_i] = query[:n]
        out = branch_attention_with_kvcache(q, k_cache, v_cache, md.seq_lens, seg_cache, br_cache, self.scale,
                                            md.q_seqlens, md.block_table, check_values=False)
        output[:n] = out[md.q_b, md.q_i].reshape(output[:n].shape)
        return output


class AspdAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN's cache shape and layout, our builder and impl. Registered over ``CPU_ATTN`` by the plugin (the CPU
    platform always picks that one) and as ``ASPD`` (selectable by name elsewhere)."""

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [16, 32, 64, 80, 96, 112, 128, 160, 192, 224, 256]

    @staticmethod
    def get_impl_cls() -> type[AspdAttentionImpl]:
        return AspdAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[AspdMetadataBuilder]:
        return AspdMetadataBuilder
