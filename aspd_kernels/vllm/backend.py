"""A vLLM v1 attention backend: vLLM's own CPU attention (``CPU_ATTN``) for every step without a request layout,
``branch_attention_with_kvcache`` over vLLM's paged KV cache for the steps that carry one.

vLLM gives the backend, per step: packed queries ``[T, Hq, D]``, ``query_start_loc`` ``[B+1]``, ``seq_lens`` ``[B]``,
the block table ``[B, max_blocks]`` and the slot of every new token (``slot_mapping [T]``). Two int32 id caches
``[num_blocks, block_size]`` (segment, branch of every KV slot) sit beside vLLM's KV cache, written with the same
slot mapping on every step (a slot freed by a branch and reused by plain text must read 0/0 again); the branch mask
is computed from them inside the op, no dense mask anywhere.

Which layers are ours. A layer is "ours" when the op computes it exactly: decoder self-attention, an unquantized
cache (``kv_cache_dtype="auto"``), no sliding window, ALiBi, soft-capping or sinks. Every other layer (an fp8
cache, a windowed or encoder/cross layer...) *is* vLLM's CPU_ATTN: the impl and builder subclass it and defer to it
wholesale; a request carrying a layout that reaches such a layer raises (the front-end check, ``layout.refusal``,
normally refuses it earlier). The capability flags are CPU_ATTN's, and true: what ours do not do, CPU_ATTN does.

On our layers too the cache is CPU_ATTN's, written by CPU_ATTN's writer, and a step without a layout (plain text,
causal or not, vLLM's own tests) runs CPU_ATTN's kernel: with this package installed such steps give vLLM's bits.
A step with a layout runs the op. CPU_ATTN's writer packs each block's keys for its ISA (values stay plain
rows), so the op reads the step's blocks through an unpacked copy of their keys: the packing is a permutation
within a block and head, learnt once per (ISA, dtype, block size, head size) by writing index-valued keys through
CPU_ATTN's writer (:func:`_key_order`). That costs one copy of the step's keys per layer, on layout steps only,
and keeps one cache format for plain and layout requests (their full blocks are shared through the prefix cache).
A non-causal step with a layout raises.
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
    # the step's blocks, renumbered (used block ids, local table, their ids): the same for every layer, built by
    # the first one, so every layer passes the op the same table and ids and shares its per-step plan
    blocks: tuple | None = None


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

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AspdMetadata | None, output: torch.Tensor, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        """query ``[T, Hq, D]`` (new tokens, packed); output ``[T, Hq, D]`` written in place. The new tokens' K/V
        are already in the cache (CPU_ATTN's ``do_kv_cache_update``, which this impl keeps)."""
        step = getattr(attn_metadata, "aspd", None)
        if step is not None and step.has_layout and (not self.ours or output_scale is not None
                                                     or output_block_scale is not None):
            raise ValueError(f"a request carrying an aspd layout reached an attention layer the branch mask "
                             f"cannot apply to: {', '.join(self.why_not) or 'fused output quantization'}")
        if self.ours and step is not None:
            n = attn_metadata.num_actual_tokens
            seg_cache, br_cache = _IdCache.get(kv_cache.shape[0], kv_cache.shape[2], kv_cache.device)
            # every layer writes the same ids; doing it here keeps the builder free of the cache
            slots = attn_metadata.slot_mapping[:n].long()
            seg_cache.view(-1)[slots] = step.seg
            br_cache.view(-1)[slots] = step.br
        if step is None or not step.has_layout or not self.ours:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        n = attn_metadata.num_actual_tokens
        k_cache, v_cache, seg, br, table = _gather_blocks(kv_cache, step, seg_cache, br_cache,
                                                          _key_order(layer.isa, kv_cache.dtype, kv_cache.shape[2],
                                                                     self.head_size))
        nreq = step.q_seqlens.shape[0]
        max_q = int(step.q_seqlens.max()) if nreq else 0
        q = query.new_zeros(nreq, max_q, self.num_heads, self.head_size)
        q[step.q_b, step.q_i] = query[:n]
        out = branch_attention_with_kvcache(q, k_cache, v_cache, step.seq_lens, seg, br, self.scale,
                                            step.q_seqlens, table, check_values=False)
        output[:n] = out[step.q_b, step.q_i].reshape(output[:n].shape)
        return output


_KEY_ORDER: dict[tuple, torch.Tensor] = {}


def _key_order(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> torch.Tensor:
    """``order`` with ``packed_block_head.view(-1)[order]`` = that block and head's keys as plain
    ``[block_size, head_size]`` rows, for CPU_ATTN's writer at this ISA. Learnt by writing keys whose values are
    their own index (7 bits per pass, exact in every float dtype) through the writer."""
    key = (isa, dtype, block_size, head_size)
    if key not in _KEY_ORDER:
        from vllm import _custom_ops as ops

        n = block_size * head_size
        idx = torch.arange(n)
        where = torch.zeros(n, dtype=torch.long)
        for p in range(3):
            kv = torch.zeros(1, 1, 2 * block_size, head_size, dtype=dtype)
            digits = ((idx >> (7 * p)) & 127).to(dtype).view(block_size, 1, head_size)
            ops.cpu_attn_reshape_and_cache(digits, torch.zeros_like(digits), kv[:, :, :block_size],
                                           kv[:, :, block_size:], torch.arange(block_size), isa, k_scale=1.0,
                                           v_scale=1.0, kv_cache_dtype="auto")
            where |= kv[0, 0, :block_size].reshape(-1).long() << (7 * p)
        if not torch.equal(where.sort().values, idx):
            raise RuntimeError(f"CPU_ATTN's key packing for isa={isa!r} is not a permutation of a block's keys")
        order = torch.empty(n, dtype=torch.long)
        order[where] = idx
        _KEY_ORDER[key] = order
    return _KEY_ORDER[key]


def _gather_blocks(kv_cache: torch.Tensor, step: AspdStep, seg_cache: torch.Tensor, br_cache: torch.Tensor,
                   order: torch.Tensor):
    """The step's blocks of a CPU_ATTN cache ``[num_blocks, Hkv, block_size, 2*D]`` as the op's paged inputs: keys
    unpacked and values, ``[n, block_size, Hkv, D]`` each, their ids, and the block table renumbered to them."""
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    if step.blocks is None:
        need = (int(step.seq_lens.max()) + bs - 1) // bs if step.seq_lens.numel() else 0
        table = step.block_table[:, :need]
        used, local = torch.unique(table.long(), return_inverse=True)
        step.blocks = (used, local.to(torch.int32).view(table.shape), seg_cache[used], br_cache[used])
    used, table, seg, br = step.blocks
    kv = kv_cache.view(nb, hkv, 2 * bs, d)[used]
    k = kv[:, :, :bs].reshape(len(used), hkv, bs * d)[:, :, order].view(len(used), hkv, bs, d)
    return k.transpose(1, 2), kv[:, :, bs:].transpose(1, 2), seg, br, table


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
