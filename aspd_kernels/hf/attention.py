"""``attn_implementation="aspd"``: ``branch_attention`` behind transformers' attention interface.

Registered under one name with both registries transformers consults:

- ``transformers.AttentionInterface``: the attention call of every layer (``aspd_attention_forward``);
- ``transformers.masking_utils.AttentionMaskInterface``: the mask builder (``aspd_mask``). Without it,
  ``create_causal_mask`` returns ``None`` for unknown implementations (``_preprocess_mask_arguments``), so a padding
  ``attention_mask`` would silently vanish. Ours never builds an ``N x N`` mask: it returns one int8 code per key
  slot (valid key? query slot?), ``None`` when there is no padding, which the attention call uses to unpad.

What reaches the attention call (transformers 5 passes the model's ``**kwargs`` down unchanged) and how it is read:

=====================================  ==============================================================================
``aspd_segment``, ``aspd_branch``      int ``[B, Lk]`` (or anything with ``B * Lk`` elements): section and branch id of
                                       every key token. Absent: every token serial (segment 0, branch 0) = causal.
``cu_seq_lens_q``, ``cu_seq_lens_k``   int ``[n + 1]``: the rows, flattened, hold ``n`` packed sequences (the names of
                                       transformers' ``FlashAttentionKwargs`` and ``DataCollatorWithFlattening``).
``max_length_q``, ``max_length_k``     the longest packed sequence (computed when absent).
``position_ids``                       without a layout and without ``cu_seq_lens_*``, a restart (a step other than
                                       +1) starts a new packed sequence (FlashAttention-2's behaviour; the eager
                                       and SDPA masks do it only without a KV cache).
``aspd_check_values``                  run the value checks of ``branch_attention`` (default: in layer 0 only).
``aspd_backend``                       force a backend ("torch", "triton", "cuda").
=====================================  ==============================================================================

Without ``cu_seq_lens_*`` every row is one sequence. Queries are the last ``Lq`` keys of their row (a KV cache adds
keys in front), so ``generate`` works with the default causal layout. A 2-D padding mask (left or right padding,
static-cache slots) is honoured by gathering the valid tokens; padded query rows come back as zeros. Refused with an
error: a 4-D or block mask, a padding mask together with ``cu_seq_lens_*``, attention dropout, soft-capping, sinks,
non-causal attention and a sliding window shorter than the keys.

Traceable: the mask builder and the attention call read nothing back to the host and branch only on shapes and
Python values, so ``torch.compile(fullgraph=True)`` traces them (transformers' compiled generation with a static
cache included) and one graph serves every prompt length of a static cache. The padding path sorts each row's valid
tokens first (fixed shapes); packing found from ``position_ids`` becomes branch ids under one segment. Two reads
remain outside compilation: ``max_length_*`` computed from ``cu_seq_lens_*`` when not given as ints (while
compiling, the packed length bounds it), and the value checks of a checked call (layer 0; off while compiling).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..branch_attention import branch_attention

NAME = "aspd"

_UNSUPPORTED = ("softcap", "s_aux", "sinks")


def register(name: str = NAME) -> None:
    """Register ``name`` with ``AttentionInterface`` and ``AttentionMaskInterface`` (done on import of
    ``aspd_kernels.hf``; call again to add another name). Afterwards ``from_pretrained(...,
    attn_implementation=name)`` and ``model.set_attn_implementation(name)`` select the branch attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, aspd_attention_forward)
    AttentionMaskInterface.register(name, aspd_mask)


# ----------------------------------------------------------------------------------------------------------- mask
def aspd_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0, mask_function=None,
              attention_mask: Tensor | None = None, device=None, **kwargs) -> Tensor | None:
    """The mask builder transformers calls once per forward; never ``N x N``. Returns ``None`` when there is no
    2-D mask and the queries are the last ``q_length`` slots (no cache or a dynamic one: decided from shapes), else
    slot codes ``int8 [B, 1, 1, kv_length]``: bit 0 = the slot holds a valid key (not padding, not a free slot of a
    static cache), bit 1 = it holds one of this step's queries (``q_length`` per row; mid-buffer in a static cache).
    A 2-D mask always gives codes, an all-ones one too: telling them apart would read the mask back to the host.

    The codes are 4-D because ``generate`` builds the mask ahead of a static-cache forward and the model then asks
    for it again: transformers casts a 2-D mask to bool first (losing bit 1) but hands 4-D masks through untouched.
    ``mask_function`` (causal, packed-sequence) is not evaluated: the branch layout and ``cu_seq_lens_*`` travel to
    the attention call instead."""
    if attention_mask is not None and attention_mask.dim() != 2:
        return attention_mask  # ours passes through; any other 4-D mask is refused by the attention call
    # slots filled after this step (transformers 5.x passes q_offset, a tensor for a static cache; earlier versions
    # cache_position). Never read back: under torch.compile the codes stay a function of tensors, so one graph
    # serves every prompt length of a static cache.
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        end = cache_position[-1] + 1
    else:
        end = (q_offset if q_offset is not None else 0) + q_length
    if attention_mask is None and isinstance(end, int) and end == kv_length:
        return None  # decided from shapes alone
    valid = None
    if attention_mask is not None:
        valid = attention_mask.to(device=device, dtype=torch.bool)
        n = valid.shape[-1]
        if n > kv_length:
            valid = valid[:, n - kv_length:]
        elif n < kv_length:
            valid = torch.nn.functional.pad(valid, (0, kv_length - n), value=False)
    slots = torch.arange(kv_length, device=device)
    filled = slots < end
    query = filled & (slots >= end - q_length)
    valid = filled if valid is None else valid & filled
    codes = valid.to(torch.int8) | (query.to(torch.int8) << 1)
    return codes.expand(batch_size, kv_length)[:, None, None, :]


# ------------------------------------------------------------------------------------------------------ attention
def aspd_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[Tensor, None]:
    """transformers' attention signature: ``query [B, Hq, Lq, D]``, ``key, value [B, Hkv, Lk, D]`` (GQA heads
    not repeated), ``attention_mask`` from :func:`aspd_mask`. Returns ``out [B, Lq, Hq, D]`` and ``None`` weights.
    Differentiable in query, key and value."""
    _refuse_unsupported(module, key.shape[2], dropout, kwargs)
    bsz, hq, lq, d = query.shape
    lk = key.shape[2]
    dev = query.device
    q = query.transpose(1, 2)  # [B, Lq, Hq, D]
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    segment, branch = _layout(kwargs, bsz, lk, dev)
    check = kwargs.get("aspd_check_values", getattr(module, "layer_idx", 0) in (0, None))
    backend = kwargs.get("aspd_backend")
    if attention_mask is not None and not (
        attention_mask.dtype == torch.int8 and attention_mask.shape == (bsz, 1, 1, lk)
    ):
        raise ValueError(
            f"attn_implementation='aspd' cannot honour a {attention_mask.dim()}-D {attention_mask.dtype} attention "
            f"mask of shape {tuple(attention_mask.shape)}: pass the branch layout as aspd_segment / aspd_branch (and "
            "packed sequences as cu_seq_lens_q / cu_seq_lens_k), and padding as a 2-D attention_mask"
        )

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if attention_mask is not None:
            raise ValueError(
                "attn_implementation='aspd': packed rows (cu_seq_lens_q / cu_seq_lens_k) carry no padding; drop the "
                "2-D attention_mask"
            )
        cu_q = (cu_q if cu_q is not None else cu_k).to(device=dev, dtype=torch.int32)
        cu_k = (cu_k if cu_k is not None else cu_q).to(device=dev, dtype=torch.int32)
        max_q = _max_len(kwargs.get("max_length_q"), cu_q, bsz * lq)
        max_k = _max_len(kwargs.get("max_length_k"), cu_k, bsz * lk)
        return _packed(q, k, v, segment, branch, cu_q, cu_k, max_q, max_k, scaling, check, backend), None

    if attention_mask is not None:
        return _unpadded(q, k, v, segment, branch, attention_mask, scaling, check, backend), None

    if segment is None and lq == lk and lq > 1:
        restarts = _restart_branches(kwargs.get("position_ids"), bsz, lq)
        if restarts is not None:
            branch = restarts.to(dev)
            segment = torch.zeros_like(branch)

    cu_q = torch.arange(0, (bsz + 1) * lq, lq, dtype=torch.int32, device=dev)
    cu_k = torch.arange(0, (bsz + 1) * lk, lk, dtype=torch.int32, device=dev)
    return _packed(q, k, v, segment, branch, cu_q, cu_k, lq, lk, scaling, check, backend), None


def _packed(q, k, v, segment, branch, cu_q, cu_k, max_q, max_k, scale, check, backend) -> Tensor:
    """Rows flattened into one packed batch described by ``cu_q, cu_k``."""
    bsz, lq, hq, d = q.shape
    total_k = k.shape[0] * k.shape[1]
    if segment is None:
        segment = branch = torch.zeros(total_k, dtype=torch.int32, device=q.device)
    out = branch_attention(
        q.reshape(bsz * lq, hq, d), k.reshape(total_k, *k.shape[2:]), v.reshape(total_k, *v.shape[2:]),
        segment.reshape(-1), branch.reshape(-1), cu_q, cu_k, max_q, max_k, scale,
        check_values=check, backend=backend,
    )
    return out.view(bsz, lq, hq, -1)


def _unpadded(q, k, v, segment, branch, codes, scale, check, backend) -> Tensor:
    """Attend the valid tokens of every row (FlashAttention's unpadding) with fixed shapes: each row's tokens are
    reordered, valid ones first (a stable sort, so their order holds), and the row becomes two packed sequences, its
    valid tokens and the rest. Every key after a row's queries is empty (a static cache's free slots), so the valid
    queries of a row are the last of its valid keys: bottom-right alignment holds for the valid sequence. The rest
    attend one another causally under serial ids (every query there sees a key: invalid query slots are invalid
    key slots) and come back as zeros. Nothing is read back to the host."""
    bsz, lq, hq, d = q.shape
    lk = k.shape[1]
    meta = _memo_or_run(f"unpad{lq}", codes, lambda m: _unpad_meta(m, lq))
    order_q, order_k, valid_q, valid_ks, cu_q, cu_k = meta
    if check and not torch.compiler.is_compiling():
        _check_codes(codes, lq)
    zero = torch.zeros((), dtype=torch.int32, device=q.device)
    if segment is None:
        seg = br = torch.zeros(bsz * lk, dtype=torch.int32, device=q.device)
    else:  # the rest get serial ids: theirs (padding) may be anything
        seg = torch.where(valid_ks, segment.reshape(-1)[order_k], zero)
        br = torch.where(valid_ks, branch.reshape(-1)[order_k], zero)
    packed = branch_attention(
        q.reshape(bsz * lq, hq, d)[order_q], k.reshape(bsz * lk, *k.shape[2:])[order_k],
        v.reshape(bsz * lk, *v.shape[2:])[order_k], seg, br, cu_q, cu_k, lq, lk, scale,
        check_values=check, backend=backend,
    )
    out = torch.zeros_like(packed).index_put((order_q,), packed)  # back to the rows' order
    out = torch.where(valid_q.reshape(-1, 1, 1), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.view(bsz, lq, hq, -1)


def _unpad_meta(codes: Tensor, lq: int):
    """From :func:`aspd_mask`'s codes ``int8 [B, 1, 1, Lk]``, all on the device with fixed shapes: the gather orders
    ``order_q [B * Lq]``, ``order_k [B * Lk]`` (int64, flat indices, each row's valid tokens first), query validity
    ``valid_q [B * Lq]`` in the rows' order, key validity in the sorted order ``[B * Lk]``, and int32
    ``cu_q, cu_k [2B + 1]`` of the two sequences per row (valid tokens, the rest)."""
    codes = codes[:, 0, 0]
    bsz, lk = codes.shape
    dev = codes.device
    valid_k = (codes & 1) != 0
    is_query = (codes & 2) != 0
    # the query slots of a row are consecutive: from the first marked slot on (argmax returns the first maximum)
    first = is_query.to(torch.int8).argmax(1)
    q_slots = (first[:, None] + torch.arange(lq, device=dev)).clamp_max(lk - 1)
    valid_q = valid_k.gather(1, q_slots)

    def order(valid: Tensor) -> Tensor:
        n = valid.shape[1]
        rows = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        return (rows + torch.arange(bsz, device=dev)[:, None] * n).reshape(-1)

    def cu(valid: Tensor) -> Tensor:
        n = valid.shape[1]
        lens = valid.sum(1, dtype=torch.int32)
        pairs = torch.stack([lens, n - lens], 1).reshape(-1)
        return torch.cat([torch.zeros(1, dtype=torch.int32, device=dev), pairs.cumsum(0, dtype=torch.int32)])

    order_k = order(valid_k)
    return order(valid_q), order_k, valid_q.reshape(-1), valid_k.reshape(-1)[order_k], cu(valid_q), cu(valid_k)


def _check_codes(codes: Tensor, lq: int) -> None:
    """The value check of a checked call (layer 0 by default; never while compiling): ``lq`` query slots per row."""
    marked = ((codes[:, 0, 0] & 2) != 0).sum(1)
    if not bool((marked == lq).all()):
        raise ValueError(f"attention_mask: the aspd slot codes do not mark {lq} query slots per row")


def _layout(kwargs: dict, bsz: int, lk: int, dev) -> tuple[Tensor | None, Tensor | None]:
    """``aspd_segment`` / ``aspd_branch`` as int32 ``[B, Lk]`` on ``dev``, or ``(None, None)``."""
    segment, branch = kwargs.get("aspd_segment"), kwargs.get("aspd_branch")
    if segment is None and branch is None:
        return None, None
    if segment is None or branch is None:
        raise ValueError("attn_implementation='aspd': pass aspd_segment and aspd_branch together")
    out = []
    for name, t in (("aspd_segment", segment), ("aspd_branch", branch)):
        t = torch.as_tensor(t, device=dev)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {t.dtype}")
        if t.numel() != bsz * lk:
            raise ValueError(
                f"{name}: expected one id per key token ({bsz} x {lk} = {bsz * lk}), got shape {tuple(t.shape)}; "
                "with a KV cache the layout must cover the cached tokens too"
            )
        out.append(t.reshape(bsz, lk).to(torch.int32))
    return out[0], out[1]


def _refuse_unsupported(module, lk: int, dropout: float, kwargs: dict) -> None:
    if dropout:
        raise NotImplementedError(f"attn_implementation='aspd' has no attention dropout (got p={dropout})")
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attn_implementation='aspd' does not support {name}")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise NotImplementedError("attn_implementation='aspd' is causal only (got is_causal=False)")
    window = kwargs.get("sliding_window")
    if window is not None and window < lk:
        raise NotImplementedError(
            f"attn_implementation='aspd' has no sliding window (window {window} < {lk} keys in this layer)"
        )


# ----------------------------------------------------------------------------- once per forward, not per layer
_memo: dict[str, tuple] = {}


def _memo_or_run(tag: str, t: Tensor, fn):
    """``fn(t)`` remembered for the last tensor seen under ``tag``: every layer of one forward passes the same
    mask / ``position_ids`` / ``cu_seq_lens`` object, so the derived tensors are built once. The strong reference
    keeps the identity check sound; ``_version`` catches in-place edits. While compiling: ``fn(t)`` every time
    (the graph is built once; a Python-side cache would only add guards)."""
    if torch.compiler.is_compiling():
        return fn(t)
    key = (id(t), t._version)
    hit = _memo.get(tag)
    if hit is not None and hit[0] is t and hit[1] == key:
        return hit[2]
    value = fn(t)
    _memo[tag] = (t, key, value)
    return value


def _max_len(given, cu: Tensor, bound: int) -> int:
    """The longest packed sequence: ``given`` when it is a Python int; while compiling ``bound`` (the packed length,
    an upper bound the ops accept), so that no value is read back; else read once per forward."""
    if isinstance(given, int):
        return given
    if torch.compiler.is_compiling():
        return bound
    if given is not None:
        return int(given)
    return _memo_or_run("max_len", cu, lambda c: int(c.diff().max()) if c.numel() > 1 else 0)


def _restart_branches(position_ids: Tensor | None, bsz: int, length: int) -> Tensor | None:
    """The sequences packed in the rows, from restarts of ``position_ids`` (a step other than +1, the rule of
    transformers' ``find_packed_sequence_indices``), as branch ids int32 ``[B, L]`` under one serial segment: the
    j-th sequence of a row is branch j, so a token sees only its own sequence's earlier tokens (the visibility rule
    with equal segments). Fixed shapes, nothing read back; ``None`` without position ids of this length."""
    if position_ids is None or position_ids.shape[-1] != length:
        return None

    def find(pos: Tensor) -> Tensor:
        pos = pos.reshape(-1, length).expand(bsz, length)
        steps = (pos.diff(dim=-1) != 1).to(torch.int32)
        return torch.nn.functional.pad(steps.cumsum(-1, dtype=torch.int32), (1, 0))

    return _memo_or_run(f"restarts{bsz}", position_ids, find)
