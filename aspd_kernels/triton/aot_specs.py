"""What the JIT compiles for the attention kernels on a GPU, as ahead-of-time compile specs for CI
(``.ci/aot_compile_triton.py``, which also adds the JIT's alignment hints and refuses TF32 on float32 operands,
spills in fp16/bf16 kernels and shared memory over the part's limit).

Every dtype the ops accept (fp16, bf16, fp32), every class of padded head width (16, 64, 128 and 256, with D = 80
padding 48 lanes into 128), the decode tiles for 4, 64 and 256 query rows per KV head (serial decoding at GQA 4,
16 and 64 branches: BLOCK_M 16, 64, 128), each from the tile table of the architecture it serves
(``tile_configs``): compiled for sm_90 and sm_80, and for the 99 KB parts (sm_86/sm_89) the sm_80 compile of
their own table entry is held to their shared-memory limit; every entry of every committed tuned table
(``tuned_tiles``) for its own capability. Small kernels (tile lists, positions, rope) keep their
specs in their own modules.
"""
from __future__ import annotations

import os

import torch

from .branch_attention import preprocess_rows
from .branch_attention_backward import bwd_dkdv_kernel, bwd_dq_kernel, bwd_preprocess_kernel
from .branch_attention_forward import fwd_kernel
from .branch_attention_with_kvcache import _decode_kernel
from . import tuned_tiles
from .decode_merge import CHUNK_S, _merge_kernel, merge_warps
from .tile_configs import (ADA, AMPERE, HOPPER, Config, block_d, bwd_configs, decode_config, dot_precision,
                           fwd_config)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_SIZES = (16, 64, 80, 128, 256)
DECODE_ROWS = (4, 64, 256)  # G = 4 at 1, 16 and 64 new tokens
I32, F32 = "i32", "fp32"


def _targets(config_of) -> list[tuple[int, tuple[int, ...], Config]]:
    """(compile target, capabilities whose shared-memory limit applies, config) for sm_90, sm_80 and sm_89, the
    last folded into sm_80's compile when its table entry is the same."""
    out = [(HOPPER, (HOPPER,), config_of(HOPPER))]
    ampere, ada = config_of(AMPERE), config_of(ADA)
    if ampere == ada:
        out.append((AMPERE, (AMPERE, ADA), ampere))
    else:
        out += [(AMPERE, (AMPERE,), ampere), (AMPERE, (ADA,), ada)]
    return out


def _spec(name: str, fn, signature: dict, constexprs: dict, cfg: Config | None, target: int,
          smem: tuple[int, ...], overlap: bool = False) -> dict:
    """One compile spec; ``overlap``: CI asserts that every loop keeps a tile's copies in flight at its top wait
    (the 16-bit attention loops; float32 is the correctness path and runs 2 stages)."""
    if smem == (target,):
        tag = f"sm{target}"
    elif target in smem:
        tag = f"sm{target}+" + "+".join(str(c) for c in smem if c != target)
    else:
        tag = f"sm{target}-as-" + "-".join(str(c) for c in smem)
    spec = dict(name=f"{name}_{tag}", fn=fn, signature=signature, constexprs=constexprs, target=target,
                smem_capabilities=smem, overlap=overlap)
    if cfg is not None:
        spec.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return spec


def _prefill_specs(dt: str, d: int) -> list[dict]:
    torch_dt, ptr, bd = DTYPES[dt], f"*{dt}", block_d(d)
    common = dict(GROUP=4, HEAD_DIM=d, BLOCK_D=bd, UPCAST=False, DOT_PRECISION=dot_precision(DTYPES[dt]))
    ids = {n: "*i32" for n in ("SEG", "BR", "CU_Q", "CU_K")}
    sizes = {n: I32 for n in ("total_q", "total_k", "max_seqlen_q", "max_seqlen_k")}

    def strides(*names):
        return {f"stride_{n}{a}": I32 for n in names for a in "th"}

    fwd_sig = {"Q": ptr, "K": ptr, "V": ptr, **ids, "LISTS": "*i32", "COUNTS": "*i32", "OUT": ptr, "LSE": "*fp32",
               "STATS": "*i32", **strides("q", "k", "v", "o"), "stride_lh": I32, **sizes, "max_qtiles": I32,
               "max_ktiles": I32, "qk_scale": F32}
    bwd_sig = {"Q": ptr, "K": ptr, "V": ptr, "DOUT": ptr, "LSE": "*fp32", "DELTA": "*fp32", **ids,
               "LISTS": "*i32", "COUNTS": "*i32"}
    dkdv_sig = {**bwd_sig, "DK": ptr, "DV": ptr, **strides("q", "k", "v", "do", "dk", "dv"), "stride_lh": I32,
                **sizes, "max_ktiles": I32, "max_qtiles": I32, "softmax_scale": F32}
    dq_sig = {**bwd_sig, "DQ": ptr, **strides("q", "k", "v", "do", "dq"), "stride_lh": I32, **sizes,
              "max_qtiles": I32, "max_ktiles": I32, "softmax_scale": F32}
    pre_sig = {"OUT": ptr, "DOUT": ptr, "DLSE": "*fp32", "DELTA": "*fp32", **strides("o", "do"), "stride_lh": I32,
               "total_q": I32}
    base = f"{dt}_d{d}"
    pipelined = dt != "fp32"
    specs = []
    for target, smem, cfg in _targets(lambda cap: fwd_config(d, torch_dt, cap)):
        specs.append(_spec(f"prefill_fwd_{base}", fwd_kernel, fwd_sig,
                           dict(common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, COUNT=False), cfg, target, smem,
                           pipelined))
    for target, smem, (kc, qc) in _targets(lambda cap: bwd_configs(d, torch_dt, cap)):
        specs.append(_spec(f"prefill_bwd_dkdv_{base}", bwd_dkdv_kernel, dkdv_sig,
                           dict(common, BLOCK_M=kc.block_m, BLOCK_N=kc.block_n), kc, target, smem, pipelined))
        specs.append(_spec(f"prefill_bwd_dq_{base}", bwd_dq_kernel, dq_sig,
                           dict(common, BLOCK_M=qc.block_m, BLOCK_N=qc.block_n), qc, target, smem, pipelined))
    for target, smem in ((HOPPER, (HOPPER,)), (AMPERE, (AMPERE, ADA))):
        specs.append(_spec(f"prefill_bwd_preprocess_{base}", bwd_preprocess_kernel, pre_sig,
                           dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_T=preprocess_rows(bd), HAS_DLSE=True), None, target,
                           smem))
    return specs


_DECODE_INTS = ("stride_qb stride_qi stride_qh stride_kb stride_kn stride_kh stride_vb stride_vn stride_vh "
                "stride_sb stride_bt stride_ob stride_oi stride_oh stride_ps stride_pb stride_pi stride_ph "
                "stride_ls stride_lb stride_li Lq capacity block_size num_blocks row_tiles num_splits").split()
_MERGE_INTS = ("stride_ps stride_pb stride_pi stride_ph stride_ls stride_lb stride_li stride_ob stride_oi "
               "stride_oh Lq Hq capacity num_splits").split()


def _decode_signature(dt: str) -> dict:
    sig = {name: "*i32" for name in ("SEG", "BR", "CACHE_SEQLENS", "Q_SEQLENS", "BLOCK_TABLE")}
    sig.update({name: f"*{dt}" for name in ("Q", "K", "V", "OUT")})
    sig.update(O_PART="*fp32", LSE_PART="*fp32", qk_scale=F32, **{name: I32 for name in _DECODE_INTS})
    return sig


def _decode_specs(dt: str, d: int) -> list[dict]:
    """Serial decoding contiguous and unsplit, 16 branches paged and split, 64 branches contiguous and split: both
    values of PAGED and SPLIT, every BLOCK_M the launcher picks at GQA 4."""
    bd = block_d(d)
    sig = _decode_signature(dt)
    specs = []
    for rows, paged, split in ((4, False, False), (64, True, True), (256, False, True)):
        for target, smem, cfg in _targets(lambda cap: decode_config(rows, d, DTYPES[dt], cap)):
            specs.append(_spec(
                f"decode_{dt}_d{d}_rows{rows}{'_paged' if paged else ''}{'_split' if split else ''}", _decode_kernel,
                sig, dict(G=4, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGED=paged,
                          SPLIT=split, CAST_F32=dt == "fp32", DOT_PRECISION=dot_precision(DTYPES[dt])),
                cfg, target, smem, overlap=dt != "fp32"))
    merge_sig = {"O_PART": "*fp32", "LSE_PART": "*fp32", "OUT": f"*{dt}", "CACHE_SEQLENS": "*i32",
                 "Q_SEQLENS": "*i32", **{name: I32 for name in _MERGE_INTS}}
    for target, smem in ((HOPPER, (HOPPER,)), (AMPERE, (AMPERE, ADA))):
        for chunk in (16, CHUNK_S):  # the common chunk at one wave of splits, and the largest
            spec = _spec(f"decode_merge_{dt}_d{d}_s{chunk}", _merge_kernel, merge_sig,
                         dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_S=chunk), None, target, smem)
            specs.append(dict(spec, num_warps=merge_warps(d)))
    return specs


def tuned_specs(tables=None) -> list[dict]:
    """A decode spec for every entry of every committed tuned table (``tuned_tiles``), compiled for the table's
    capability (sm_80 for 80/86/89, held to that part's shared memory; sm_90 for 90 and up) with the overlap check:
    a sweep cannot commit tiles that spill, overflow shared memory or stop the copies overlapping compute."""
    specs = []
    for path, table in (tuned_tiles.committed_tables() if tables is None else tables):
        cap = table["capability"]
        target = HOPPER if cap >= HOPPER else AMPERE
        slug = os.path.basename(path)[: -len(".json")]
        for e in table["entries"]:
            dt, bd = e["dtype"], e["block_d"]
            cfg = Config(e["block_m"], e["block_n"], e["num_warps"], e["num_stages"])
            specs.append(_spec(
                f"tuned_{slug}_decode_{dt}_d{bd}_m{cfg.block_m}{'_paged' if e['paged'] else ''}", _decode_kernel,
                _decode_signature(dt), dict(G=4, HEAD_DIM=bd, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                            PAGED=e["paged"], SPLIT=True, CAST_F32=False,
                                            DOT_PRECISION=dot_precision(DTYPES[dt])),
                cfg, target, (cap,), overlap=True))
    return specs


def _aot_specs() -> list[dict]:
    specs = []
    for dt in DTYPES:
        for d in HEAD_SIZES:
            specs += _prefill_specs(dt, d) + _decode_specs(dt, d)
    return specs + tuned_specs()


AOT_SPECS = _aot_specs()
