"""A small case of every op on every GPU backend, for ``compute-sanitizer`` (bench/gpu_suite.sh, stage
``sanitizer``): each output is compared with the torch backend, so a run that reads or writes out of bounds
fails either under the sanitizer or here.

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m bench.sanitizer_case
"""
from __future__ import annotations

import sys

import torch

from aspd_kernels import (branch_attention, branch_attention_with_kvcache, remap_positions, rope_append_kv,
                          rope_cos_sin_cache)
from aspd_kernels._dispatch import has_backend

from .cases import build_layout


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()
    ok = bool(torch.isfinite(got).all()) and err < tol
    print(f"{name:55s} rel err {err:.2e} {'ok' if ok else 'FAIL'}")
    return ok


def main() -> int:
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    n, k, hq, hkv, d = 333, 5, 8, 2, 128
    seg, br, _ = build_layout(n, k, "interleaved", decode=True)
    seg, br = seg.to(dev), br.to(dev)
    q, kk, v = (torch.randn(n, h, d, device=dev, dtype=dt) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    lens = torch.tensor([n], dtype=torch.int32, device=dev)
    qd = q[-k:][None].contiguous()
    ok = True
    ref_pre = branch_attention(q, kk, v, seg, br, cu, cu, n, n, backend="torch")
    ref_dec = branch_attention_with_kvcache(qd, kk[None], v[None], lens, seg[None], br[None], backend="torch")
    ref_pos = remap_positions(seg, br, backend="torch")
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    cs = rope_cos_sin_cache(inv, 512).to(dev)
    pos = ref_pos[-k:][None]

    def rope(backend):
        kc = torch.full((1, n, hkv, d), float("nan"), device=dev, dtype=dt)
        vc = kc.clone()
        sc = torch.full((1, n), -1, dtype=torch.int32, device=dev)
        bc = sc.clone()
        qr = rope_append_kv(qd, kk[-k:][None], v[-k:][None], pos, cs, kc, vc, sc, bc, lens, seg[-k:][None],
                            br[-k:][None], backend=backend)
        return qr, kc[0, -k:], vc[0, -k:], sc[0, -k:]

    ref_rope = rope("torch")
    for backend in ("cuda", "triton"):
        if has_backend(backend, "branch_attention_fwd"):
            ok &= _close(f"{backend} branch_attention", branch_attention(q, kk, v, seg, br, cu, cu, n, n,
                                                                         backend=backend), ref_pre, 2e-2)
        if has_backend(backend, "branch_attention_with_kvcache"):
            ok &= _close(f"{backend} branch_attention_with_kvcache", branch_attention_with_kvcache(
                qd, kk[None], v[None], lens, seg[None], br[None], backend=backend), ref_dec, 2e-2)
        if has_backend(backend, "remap_positions"):
            ok &= _close(f"{backend} remap_positions", remap_positions(seg, br, backend=backend).float(),
                         ref_pos.float(), 1e-6)
        if has_backend(backend, "rope_append_kv"):
            got = rope(backend)
            for name, g, w in zip(("q_rot", "k_cache", "v_cache", "segment_cache"), got, ref_rope):
                ok &= _close(f"{backend} rope_append_kv {name}", g, w, 2e-2)
    torch.cuda.synchronize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
