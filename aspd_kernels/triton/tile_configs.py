"""Tile tables of the attention kernels, per GPU architecture, and per device where a tuned table exists
(``tuned_tiles``: ``tuned/<device>.json``, written by ``bench/tune_decode.py``; the tables here are the fallback).
No autotuning: block skipping builds its tile lists with the block size the kernel uses, and one fixed table
keeps CUDA-graph capture and torch.compile free of benchmarking runs.

Every entry is compiled ahead of time in CI for the target it serves (``aot_specs.py``, ``.ci/aot_compile_triton.py``)
with the JIT's alignment hints, and refused there if a fp16/bf16 kernel spills registers or any kernel needs more
shared memory than the part has. Capabilities: 90 (H100/H200, 227 KB of shared memory per block), 80 (A100, 163 KB),
86/89 (99 KB); anything older is treated as 80, anything newer as 90. float32 is a correctness path (IEEE dots,
twice the registers per element): its tiles are the smallest that keep its stack small, and its spills are
reported by CI, not refused.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from . import tuned_tiles

HOPPER, AMPERE, ADA = 90, 80, 89
AOT_CAPABILITIES = (HOPPER, AMPERE, ADA)  # the architectures whose table entries CI compiles and checks


@dataclass(frozen=True)
class Config:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


@functools.cache
def _capability_of_index(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def capability(device: torch.device) -> int:
    """``10 * major + minor`` of a CUDA device; 90 elsewhere (the interpreter uses its own tiles anyway)."""
    if device.type != "cuda":
        return HOPPER
    return _capability_of_index(torch.cuda.current_device() if device.index is None else device.index)


def _small_smem(cap: int) -> bool:
    """sm_86/sm_89: 99 KB of shared memory per block, against 163 KB (sm_80) and 227 KB (sm_90)."""
    return cap in (86, 87, 89)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of every ``tl.dot``: IEEE for float32 operands, whose contract is full fp32 (TF32, the
    compiled default, keeps 10 mantissa bits: ~1e-3 relative error); fp16/bf16 operands ignore it. CI refuses a TF32
    dot on float32 operands (``.ci/triton_resources.py``)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(head_dim: int) -> int:
    """The head dimension padded to a power of two, at least 16 (the K extent of a ``tl.dot``); the kernels mask
    the lanes ``>= head_dim`` on every load and store."""
    return max(triton.next_power_of_2(head_dim), 16)


def fwd_config(head_dim: int, dtype: torch.dtype, cap: int = HOPPER) -> Config:
    """Prefill forward tiles. A tall query tile amortises the K/V reads; on sm_80/sm_89 the 4-warp tiles of sm_90
    spill (32-64 B of stack at 255 registers, compiled 2026-11-25), so they take 8 warps (D <= 64) or a 32-key tile
    (D = 128) instead. D = 256 and float32 shrink the tiles.

    Three stages everywhere in 16 bits (issue 21): with the tile index fetched one iteration ahead
    (``_fwd_tiles``) the async wait at the loop top leaves one tile's copies in flight; two stages leave none
    (compiled, sm_90 and sm_80). sm_90 at D = 128 is FlexAttention's H100 default for bf16, 128 x 64, 8 warps:
    132 KB, 208 registers, no stack."""
    bd = block_d(head_dim)
    if dtype == torch.float32:  # IEEE fp32 dots: 7 KB of stack at 64 x 32 x 4 warps, 0-0.9 KB at 32 x 32
        return Config(32, 32, 4, 2) if bd <= 128 else Config(32, 16, 4, 2)  # width 256: 68 KB, fits 99 KB parts
    if bd <= 64:
        return Config(128, 64, 4, 3) if cap >= HOPPER else Config(128, 64, 8, 3)
    if bd <= 128:
        return Config(128, 64, 8, 3) if cap >= HOPPER else Config(128, 32, 8, 3)
    # width 256: 4 warps spilled 88-136 B; 3 stages of 32 keys need 103 KB, over the 99 KB parts, so 16 there
    return Config(64, 16 if _small_smem(cap) else 32, 8, 3)


def bwd_configs(head_dim: int, dtype: torch.dtype, cap: int = HOPPER) -> tuple[Config, Config]:
    """(dK/dV tiles, dQ tiles). The dK/dV program holds two fp32 ``[BLOCK_N, D]`` accumulators plus its K and V
    tiles, so at D=128 its query tile shrinks to 32 rows (64 rows spill); it computes in the transposed order (key
    tile as the M dimension of every dot), so 32-row query tiles still run on wgmma. The dQ program holds one
    accumulator. 16-bit tiles take 3 stages (the tile index of both loops is fetched one iteration ahead, so the
    copies of the next tile overlap compute; at 2 the async wait at the loop top left none in flight)."""
    bd = block_d(head_dim)
    if dtype == torch.float32:
        if bd > 128:  # 32 x 32 tiles need 131-135 KB of shared memory at width 256; 16 x 16 fit 99 KB parts
            return (Config(16, 16, 4, 1),) * 2
        return (Config(32, 32, 8, 1),) * 2 if bd > 64 else (Config(32, 32, 4, 1),) * 2
    if bd <= 64:
        return Config(64, 64, 4, 3), Config(64, 64, 4, 3)
    if bd <= 128:  # dQ: 3 stages of 64 keys need 105 KB, over the 99 KB parts, so 32 there
        return Config(32, 64, 8, 3), Config(64, 32 if _small_smem(cap) else 64, 8, 3)
    return Config(32, 32, 8, 3), Config(32, 32, 4, 3)  # dK/dV at 4 warps spilled 16-48 B at width 256


def decode_config(rows: int, head_dim: int, dtype: torch.dtype, cap: int = HOPPER) -> Config:
    """Decode tiles for ``rows`` query rows per KV head (new tokens x GQA group): every row in one tile up to 128
    (64 at a padded width of 256), ``tl.dot`` needs >= 16. Registers and shared memory grow with the padded width,
    so D = 80 is tiled as 128.

    Stages (issue 21): decode streams the cache once, so its speed is the bytes in flight per SM. With 4 stages
    the loop keeps 2 tiles' copies in flight while it computes on the third (the async wait at the loop top leaves
    8 copy groups in flight, a tile issuing 4; 3 stages leave one tile, and ``.ci/aot_compile_triton.py`` asserts
    at least one): 64 KB in flight at 64 keys x 128 x bf16. The 99 KB parts (sm_86/89) take 3 stages, with
    16-key tiles at width 256.
    128-row tiles (K = 64 at GQA 4) take 64 keys, as the other tiles: 165 KB, 190 registers, no stack at 4 stages
    and 8 warps on sm_90 (132 KB, 197 registers on sm_80), where 32 keys moved 16 KB per iteration.

    Compiled 2026-11-25 (shared memory, stack): 64 rows x 128 with 4 warps spilled 8-24 B on sm_80 (triton 3.7)
    and 16 B on sm_90 (triton 3.6, the GPU image's), hence 8 warps from 64 x 128 up; float32 tiles (4-byte K/V,
    IEEE dots) needed up to 205 KB and spilled 8 KB at 128 rows, hence 32 rows and 32 keys (16 at width 256), two
    stages."""
    bd = block_d(head_dim)
    if dtype == torch.float32:
        return Config(min(max(16, triton.next_power_of_2(rows)), 32), 32 if bd <= 128 else 16, 4, 2)
    block_m = min(max(16, triton.next_power_of_2(rows)), 64 if bd > 128 else 128)
    block_n = 32 if bd > 128 else 64
    warps = 8 if block_m * bd >= 64 * 128 else 4
    if _small_smem(cap):
        stages = 3
        if bd > 128:  # 3 stages of 32 x 256 keys need 102-104 KB
            block_n = 16
    else:
        stages = 4
    if cap < HOPPER and bd <= 16 and block_m <= 16:
        warps = 2  # 4 warps spilled 8 B on sm_80 at 3 and 4 stages; 2 do not (and cross fewer warps)
    return Config(block_m, block_n, warps, stages)


def decode_config_for(rows: int, head_dim: int, dtype: torch.dtype, device: torch.device, paged: bool) -> Config:
    """``decode_config`` for ``device``'s capability, with ``block_n``, warps and stages replaced by the device's
    tuned table where it has an entry for (decode, dtype, padded width, row bucket, paged). Shapes and the device
    only: the same tiles on every step."""
    cap = capability(device)
    cfg = decode_config(rows, head_dim, dtype, cap)
    entry = tuned_tiles.lookup("decode", dtype, block_d(head_dim), cfg.block_m, paged, device, cap)
    if entry is None:
        return cfg
    return Config(cfg.block_m, entry["block_n"], entry["num_warps"], entry["num_stages"])
