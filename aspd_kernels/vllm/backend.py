"""A vLLM v1 attention backend on ``branch_attention_with_kvcache`` over vLLM's own paged KV cache, and vLLM's own
CPU attention (``CPU_ATTN``) for everything the op does not do.

vLLM gives the backend, per step: packed queries ``[T, Hq, D]``, ``query_start_loc`` ``[B+1]``, ``seq_lens`` ``[B]``,
the block table ``[B, max_blocks]`` and the slot of every new token (``slot_mapping [T]``). Two int32 id caches
``[num_blocks, block_size]`` (segment, branch of every KV slot) sit beside vLLM's KV cache, written with the same
slot mapping; the branch mask is computed from them inside the op, no dense mask anywhere. A request without a
layout has ids 0/0 everywhere, which is plain causal attention: then this backend computes what vLLM's own does.

Which layers are ours. A layer is "ours" when the op computes it exactly: decoder self-attention, an unquantized
cache (``kv_cache_dtype="auto"``), no sliding window, ALiBi, soft-capping or sinks. Every other layer (an fp8
cache, a windowed or encoder/cross layer...) *is* vLLM's CPU_ATTN: the impl and builder subclass it and defer to it
wholesale, so with this package installed vLLM serves those models exactly as without it; a request carrying a
layout that reaches such a layer raises (the front-end check, ``layout.refusal``, normally refuses it earlier). The
capability flags are CPU_ATTN's, and true: what ours do not do, CPU_ATTN does.

On our layers the KV cache keeps CPU_ATTN's shape (``[num_blocks, Hkv, block_size, 2*D]``: per block and head, the
keys then the values), so vLLM's allocator, profiler and block zeroing work unchanged, but rows are written plainly
(CPU_ATTN's writer packs the keys for its ISA), and the op reads them through a ``[num_blocks, block_size, Hkv, D]``
view. A non-causal step (``CommonAttentionMetadata.causal`` False or a per-request tensor, which vLLM's attention
tests and bidirectional prefixes use) on such a layer runs a dense torch path over the same paged cache: still
exact, never silently causal; with a layout in it, it raises.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata, CPUAttentionMetadataBuilder)

from ..branch_attention_with_kvcache import branch_attention_with_kvcache
from .layout import StepIds

HEAD_SIZES = (16, 32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass
class AspdStep:
    """What our layers need beyond CPU_ATTN's metadata. ``q_b``, ``q_i`` (int64 ``[T]``): row and offset of each
    packed query in the padded ``[B, max_query_len]`` query; ``seg``, ``br`` (int32 ``[T]``): ids of the new tokens;
    ``causal`` (bool ``[B]``): which requests attend causally (all, unless vLLM asked otherwise). ``seq_lens``,
    ``block_table`` (int32): the op's, built once per step, so every layer passes the same tensors and shares the
    op's per-step plan (the runner runs a step's layers inside ``step_scope``)."""

    q_seqlens: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    q_b: torch.Tensor
    q_i: torch.Tensor
    seg: torch.Tensor
    br: torch.Tensor
    causal: torch.Tensor
    all_causal: bool
    has_layout: bool


@dataclass
class AspdMetadata(CPUAttentionMetadata):
    """CPU_ATTN's metadata (its own layers read only that) plus :class:`AspdStep` for ours."""

    aspd: AspdStep | None = None


class AspdMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> AspdMetadata:
        stock = super().build(common_prefix_len, common_attn_metadata, fast_build)
        m = common_attn_metadata
        qsl = m.query_start_loc_cpu.numpy().astype(np.int64)
        n_tok = int(qsl[-1])
        q_lens = np.diff(qsl)
        nreq = len(q_lens)
        q_b = np.repeat(np.arange(nreq), q_lens)
        q_i = np.arange(n_tok) - qsl[:-1][q_b]
        seg, br, has_layout = StepIds.seg, StepIds.br, StepIds.has_layout
        if len(seg) != n_tok:  # a step the runner did not prepare (profiling, warm-up, a test): plain text
            seg, br, has_layout = np.zeros(n_tok, np.int32), np.zeros(n_tok, np.int32), False
        if isinstance(m.causal, torch.Tensor):
            causal = m.causal[:nreq].to("cpu", torch.bool)
        else:
            causal = torch.full((nreq,), bool(m.causal), dtype=torch.bool)
        all_causal = bool(causal.all())
        if has_layout and (not all_causal or self.is_cross_attention or self.is_encoder_only_attention):
            raise ValueError("a request carrying an aspd layout reached a non-causal attention step: the branch "
                             "mask is defined for causal decoder self-attention only")
        dev = m.query_start_loc.device
        step = AspdStep(q_seqlens=torch.from_numpy(q_lens.astype(np.int32)).to(dev),
                        seq_lens=stock.seq_lens[:nreq].to(torch.int32),
                        block_table=stock.block_table[:nreq].to(torch.int32),
                        q_b=torch.from_numpy(q_b).to(dev), q_i=torch.from_numpy(q_i).to(dev),
                        seg=torch.from_numpy(np.ascontiguousarray(seg)).to(dev),
                        br=torch.from_numpy(np.ascontiguousarray(br)).to(dev),
                        causal=causal, all_causal=all_causal, has_layout=has_layout)
        return AspdMetadata(**{f.name: getattr(stock, f.name) for f in fields(CPUAttentionMetadata)}, aspd=step)


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


def why_not_ours(head_size: int, alibi_slopes, sliding_window, kv_cache_dtype: str, logits_soft_cap, attn_type,
                 sinks) -> list[str]:
    """The settings of a layer that the op does not compute (empty: the layer is ours)."""
    why = []
    if attn_type != AttentionType.DECODER:
        why.append(f"attn_type={attn_type} (only decoder self-attention)")
    if kv_cache_dtype != "auto":
        why.append(f"kv_cache_dtype={kv_cache_dtype!r} (set kv_cache_dtype='auto')")
    if sliding_window is not None:
        why.append(f"sliding_window={sliding_window}")
    if alibi_slopes is not None:
        why.append("ALiBi")
    if logits_soft_cap:
        why.append(f"logits_soft_cap={logits_soft_cap}")
    if sinks is not None:
        why.append("attention sinks")
    if head_size not in HEAD_SIZES:
        why.append(f"head_size={head_size} (the op takes {HEAD_SIZES})")
    return why


class AspdAttentionImpl(CPUAttentionBackendImpl):
    """CPU_ATTN's impl, with the op on the layers it computes exactly (:func:`why_not_ours` empty)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self.why_not = why_not_ours(head_size, alibi_slopes, sliding_window, kv_cache_dtype, logits_soft_cap,
                                    attn_type, sinks)
        self.ours = not self.why_not

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write the new tokens' keys and values (``[T, Hkv, D]``) at their slots (plain rows on our layers)."""
        if not self.ours:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
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
        step = getattr(attn_metadata, "aspd", None)
        if not self.ours or attn_metadata is None or output_scale is not None or output_block_scale is not None:
            if step is not None and step.has_layout:
                raise ValueError(f"a request carrying an aspd layout reached an attention layer the branch mask "
                                 f"cannot apply to: {', '.join(self.why_not) or 'fused output quantization'}")
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        md = attn_metadata
        n = md.num_actual_tokens
        k_cache, v_cache = _split_cache(kv_cache)
        seg_cache, br_cache = _IdCache.get(k_cache.shape[0], k_cache.shape[1], kv_cache.device)
        # every layer writes the same ids; doing it here keeps the builder free of the cache
        slots = md.slot_mapping[:n].long()
        seg_cache.view(-1)[slots] = step.seg
        br_cache.view(-1)[slots] = step.br
        nreq = step.q_seqlens.shape[0]
        max_q = int(step.q_seqlens.max()) if nreq else 0
        q = query.new_zeros(nreq, max_q, self.num_heads, self.head_size)
        q[step.q_b, step.q_i] = query[:n]
        if step.all_causal:
            out = branch_attention_with_kvcache(q, k_cache, v_cache, step.seq_lens, seg_cache, br_cache, self.scale,
                                                step.q_seqlens, step.block_table, check_values=False)
        else:
            out = _dense_paged(q, k_cache, v_cache, step.seq_lens, step.q_seqlens, step.block_table, step.causal,
                               self.scale)
        output[:n] = out[step.q_b, step.q_i].reshape(output[:n].shape)
        return output


def _dense_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                 q_lens: torch.Tensor, block_table: torch.Tensor, causal: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of ``q [B, Lq, Hq, D]`` (the last ``q_lens[b]`` of ``seq_lens[b]`` tokens) over each request's
    paged keys, causal where ``causal[b]``, else over all ``seq_lens[b]`` keys. Same shape as ``q``; padding 0."""
    out = torch.zeros_like(q)
    bs = k_cache.shape[1]
    for b in range(q.shape[0]):
        n, lq = int(seq_lens[b]), int(q_lens[b])
        if lq == 0:
            continue
        blocks = block_table[b, :(n + bs - 1) // bs].long()
        k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:n]  # [n, Hkv, D]
        v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:n]
        rep = q.shape[2] // k.shape[1]
        qq = q[b, :lq].transpose(0, 1).float()  # [Hq, lq, D]
        kk = k.repeat_interleave(rep, dim=1).transpose(0, 1).float()
        vv = v.repeat_interleave(rep, dim=1).transpose(0, 1).float()
        s = qq @ kk.transpose(1, 2) * scale  # [Hq, lq, n]
        if bool(causal[b]):
            keep = torch.arange(n)[None, :] <= torch.arange(n - lq, n)[:, None]
            s = s.masked_fill(~keep, float("-inf"))
        out[b, :lq] = (s.softmax(-1) @ vv).transpose(0, 1).to(q.dtype)
    return out


class AspdAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN, with our builder and impl (which defer to CPU_ATTN's wherever the op does not apply), so its
    capability flags stay CPU_ATTN's and true. Registered over ``CPU_ATTN`` by the plugin (the CPU platform always
    picks that one) and as ``ASPD`` (selectable by name elsewhere)."""

    @staticmethod
    def get_impl_cls() -> type[AspdAttentionImpl]:
        return AspdAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[AspdMetadataBuilder]:
        return AspdMetadataBuilder
