"""``remap_positions`` (SPEC section 3, "same-sequential") against computing the positions on the host in Python
(``BranchLayout.positions``, what an engine without the op does) and copying them to the device.

Bytes counted: segment and branch read (int32 each), positions written (int32): 12 bytes per token. No FLOP.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from aspd_kernels import remap_positions
from aspd_kernels.reference import positions_one

from .cases import build_layout
from .common import Context, add_ratios, package_backends
from .runner import time_impl

OP = "remap_positions"


@dataclass(frozen=True)
class PosCase:
    n: int
    k: int
    storage: str
    sweep: str

    def key(self) -> str:
        return f"N={self.n} K={self.k} {self.storage}"

    def as_dict(self) -> dict:
        return asdict(self)


def cases(ctx: Context) -> list[PosCase]:
    if ctx.grid == "full":
        out = [PosCase(n, 16, "interleaved", "tokens") for n in (1024, 4096, 16384, 32768, 65536, 131072)]
        return out + [PosCase(32768, k, "interleaved", "branches") for k in (4, 64)]
    if ctx.grid == "quick":
        return [PosCase(n, 16, "interleaved", "tokens") for n in (4096, 32768)]
    return [PosCase(n, 4, "interleaved", "tokens") for n in (1024, 8192)]


def run_case(ctx: Context, case: PosCase) -> list[dict]:
    seg, br, layout = build_layout(case.n, case.k, case.storage, decode=False)
    layout["sweep"] = case.sweep
    seg_l, br_l = seg.tolist(), br.tolist()
    dev = ctx.device
    seg, br = seg.to(dev), br.to(dev)
    common = dict(shape={"N": case.n}, layout=layout, nbytes=12 * case.n, flops=None, dtype=torch.int32)
    rows = []
    for name, why in package_backends("remap_positions", ctx):
        def setup(name=name):
            return {"fn": lambda: remap_positions(seg, br, check_values=False, backend=name)}
        rows.append(time_impl(ctx, OP, None if why else setup, why, backend=name, graph=name != "torch",
                              **common))

    def host():
        return {"fn": lambda: torch.tensor(positions_one(seg_l, br_l), dtype=torch.int32, device=dev)}

    rows.append(time_impl(ctx, OP, host, None, baseline="host_python", graph=False, **common))
    add_ratios(rows)
    return rows
