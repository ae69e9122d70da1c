"""What a user would run instead of this package, built for one attention case.

Each baseline is ``(name, setup, reason)``: ``setup()`` allocates its own inputs (so only one baseline's tensors
live at a time) and returns ``{"fn": timed callable, "build": per-layout preparation or None}``; ``reason`` says why
a baseline is skipped (``setup`` is then None).

- ``sdpa_dense``: PyTorch SDPA with the dense boolean ``N x N`` mask (ASPD's and one-sequence reference code);
  k and v expanded to Hq heads outside the timing (as transformers' ``repeat_kv`` does, but not charged). ``build``
  makes the mask from ``segment``/``branch``; skipped when the mask would exceed the memory cap.
- ``flex``: FlexAttention (compiled on a GPU, eager on the CPU) with a ``mask_mod`` that reads the same
  ``segment``/``branch`` tensors; ``build`` is ``create_block_mask``, which a layout that changes every call
  (decoding) pays every time.
- ``flash_causal``: the mask-free ceiling: SDPA's flash backend on plain causal attention over the same N tokens
  (decode: the same K queries over all N keys, no mask): what the work costs with no branch mask at all.
- ``separate_sequences``: the K branches as a batch of K sequences, each ``prefix + branch``, the prefix copied K
  times (what an engine without prefix sharing does), causal flash SDPA (decode: one query per sequence).
- ``flash_attn_separate``: the same with the flash-attn package, when it is importable.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from aspd_kernels.reference import dense_mask

from .cases import AttnCase

# eager FlexAttention (the CPU path) warns that it is unfused: the tables already say so
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

Baseline = tuple[str, "Callable[[], dict] | None", "str | None"]

_compiled_flex = None


def _flex():
    """FlexAttention, compiled once per process on a GPU (eager on the CPU: the unfused reference path)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if _compiled_flex is None:
        import torch._dynamo
        # every case is a new static shape; keep recompiling instead of falling back to eager
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 512))
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _block_mask_builder(mask_mod, q_len: int, kv_len: int, device: torch.device, compiled: bool):
    """``create_block_mask`` as a user would call it: compiled (``_compile=True``, the fast path for long
    sequences) where that works, else eager (seen failing: the CPU inductor build of the decode mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def build(c: bool):
        return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device, _compile=c)

    if compiled:
        try:
            build(True)
            return lambda: build(True)
        except Exception:  # noqa: BLE001 - fall back to the eager build, still a real block mask
            warnings.warn("create_block_mask(_compile=True) failed; timing the eager build", stacklevel=2)
    return lambda: build(False)


def _flash(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """Run ``fn`` with SDPA restricted to its flash backend (an error, not a silent fallback, if it cannot)."""
    def run():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return fn()
    return run


def _bhnd(t: torch.Tensor) -> torch.Tensor:
    """``[N, H, D] -> [1, H, N, D]`` contiguous (the layout SDPA and FlexAttention want)."""
    return t.transpose(0, 1).unsqueeze(0).contiguous()


def _mask_bytes(nq: int, nk: int) -> int:
    # the bool mask plus the additive float mask SDPA's kernels turn it into (2 bytes in bf16, 4 in float32)
    return nq * nk * 5


def _flash_attn_missing() -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not importable (not installed in this environment)"
    return None


def _separate_rows(separate: Callable[[bool], Callable], sep_bytes: int, mask_cap: int):
    """The "K separate sequences" rows (torch SDPA, and flash-attn where importable), skipped past the memory cap."""
    too_big = sep_bytes > mask_cap
    why_big = f"K copies of the prefix need {sep_bytes / 2**30:.1f} GiB > cap {mask_cap / 2**30:.1f} GiB"
    yield ("separate_sequences", None if too_big else separate(False), why_big if too_big else None)
    missing = _flash_attn_missing() or (why_big if too_big else None)
    yield ("flash_attn_separate", None if missing else separate(True), missing)


def prefill(case: AttnCase, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor,
            branch: torch.Tensor, info: dict, mask_cap: int, cuda: bool) -> Iterator[Baseline]:
    """Baselines of ``branch_attention`` on one sequence: ``q [N, Hq, D]``, ``k, v [N, Hkv, D]``."""
    n, dev, g = case.n, q.device, case.hq // case.hkv
    scale = case.d ** -0.5

    def dense():
        qb, kb, vb = _bhnd(q), _bhnd(k).repeat_interleave(g, 1), _bhnd(v).repeat_interleave(g, 1)
        mask = dense_mask(segment, branch)
        return {"fn": lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale),
                "build": lambda: dense_mask(segment, branch)}

    need = _mask_bytes(n, n)
    yield ("sdpa_dense", dense if need <= mask_cap else None,
           None if need <= mask_cap else f"N x N mask needs {need / 2**30:.1f} GiB > cap {mask_cap / 2**30:.1f} GiB")

    def flex():
        from torch.nn.attention.flex_attention import flex_attention
        seg, br = segment, branch

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & ((seg[ki] != seg[qi]) | (br[ki] == br[qi]))

        build = _block_mask_builder(mask_mod, n, n, dev, cuda)
        bm = build()
        qb, kb, vb = _bhnd(q), _bhnd(k), _bhnd(v)
        attn = _flex() if cuda else flex_attention
        return {"fn": lambda: attn(qb, kb, vb, block_mask=bm, scale=scale, enable_gqa=g > 1), "build": build}

    eager_cap = 1024  # eager FlexAttention materialises Hq x N x N scores
    eager_ok = cuda or n <= eager_cap
    yield ("flex", flex if eager_ok else None,
           None if eager_ok else f"eager FlexAttention on the CPU materialises the scores; N > {eager_cap}")

    def causal():
        qb, kb, vb = _bhnd(q), _bhnd(k), _bhnd(v)
        return {"fn": _flash(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                                                     enable_gqa=g > 1), dev)}

    yield ("flash_causal", causal, None)

    prefix, length = info["prefix"], info["branch_len"]
    sep_bytes = case.k * (prefix + length) * (2 * case.hq + 2 * case.hkv) * case.d * q.element_size()

    def separate(use_flash_attn: bool):
        def setup():
            # sequence j = prefix + branch j, gathered from the packed layout (the prefix copied K times)
            idx = torch.stack([torch.cat([torch.arange(prefix, device=dev),
                                          (branch == j).nonzero().flatten()[:length].long()])
                               for j in range(1, case.k + 1)])  # [K, P + L]
            if use_flash_attn:
                from flash_attn import flash_attn_func
                qs, ks, vs = q[idx].contiguous(), k[idx].contiguous(), v[idx].contiguous()
                return {"fn": lambda: flash_attn_func(qs, ks, vs, softmax_scale=scale, causal=True)}
            qs, ks, vs = (t[idx].permute(0, 2, 1, 3).contiguous() for t in (q, k, v))
            return {"fn": _flash(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                                         enable_gqa=g > 1), dev)}
        return setup

    yield from _separate_rows(separate, sep_bytes, mask_cap)


def decode(case: AttnCase, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, segment: torch.Tensor,
           branch: torch.Tensor, info: dict, mask_cap: int, cuda: bool) -> Iterator[Baseline]:
    """Baselines of one decoding step: ``q [1, K, Hq, D]`` (the newest token of every branch) over
    ``k_cache, v_cache [1, N, Hkv, D]`` holding exactly N valid slots."""
    n, kq, dev, g = case.n, q.shape[1], q.device, case.hq // case.hkv
    scale = case.d ** -0.5
    seg, br = segment[0], branch[0]
    qb = q[0].transpose(0, 1).unsqueeze(0).contiguous()  # [1, Hq, K, D]

    def dense():
        kb = _bhnd(k_cache[0]).repeat_interleave(g, 1)
        vb = _bhnd(v_cache[0]).repeat_interleave(g, 1)

        def build():
            return dense_mask(seg, br)[n - kq:]

        mask = build()
        return {"fn": lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale),
                "build": build}

    # building the K x N rows still goes through the N x N reference mask
    need = _mask_bytes(n, n)
    yield ("sdpa_dense", dense if need <= mask_cap else None,
           None if need <= mask_cap else f"N x N mask needs {need / 2**30:.1f} GiB > cap {mask_cap / 2**30:.1f} GiB")

    def flex():
        from torch.nn.attention.flex_attention import flex_attention
        q_seg, q_br, off = seg[n - kq:].contiguous(), br[n - kq:].contiguous(), n - kq

        def mask_mod(b, h, qi, ki):
            return (ki <= qi + off) & ((seg[ki] != q_seg[qi]) | (br[ki] == q_br[qi]))

        build = _block_mask_builder(mask_mod, kq, n, dev, cuda)
        bm = build()
        kb, vb = _bhnd(k_cache[0]), _bhnd(v_cache[0])
        attn = _flex() if cuda else flex_attention
        return {"fn": lambda: attn(qb, kb, vb, block_mask=bm, scale=scale, enable_gqa=g > 1), "build": build}

    yield ("flex", flex, None)

    def nomask():
        kb, vb = _bhnd(k_cache[0]), _bhnd(v_cache[0])
        return {"fn": _flash(lambda: F.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=g > 1), dev)}

    yield ("flash_causal", nomask, None)

    prefix, length = info["prefix"], info["branch_len"]
    sep_bytes = case.k * (prefix + length) * 2 * case.hkv * case.d * q.element_size()

    def separate(use_flash_attn: bool):
        def setup():
            idx = torch.stack([torch.cat([torch.arange(prefix, device=dev), (br == j).nonzero().flatten().long()])
                               for j in range(1, case.k + 1)])  # [K, P + L]: sequence j = prefix + branch j
            ks, vs = k_cache[0][idx].contiguous(), v_cache[0][idx].contiguous()  # [K, P + L, Hkv, D]
            qs = q[0].unsqueeze(1).contiguous()  # [K, 1, Hq, D]: branch j's newest token
            if use_flash_attn:
                from flash_attn import flash_attn_with_kvcache
                lens = torch.full((case.k,), idx.shape[1], dtype=torch.int32, device=dev)
                return {"fn": lambda: flash_attn_with_kvcache(qs, ks, vs, cache_seqlens=lens, softmax_scale=scale)}
            qt, kt, vt = qs.transpose(1, 2), ks.transpose(1, 2).contiguous(), vs.transpose(1, 2).contiguous()
            return {"fn": _flash(lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=g > 1),
                                 dev)}
        return setup

    yield from _separate_rows(separate, sep_bytes, mask_cap)
