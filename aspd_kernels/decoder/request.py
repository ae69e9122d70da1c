"""One request's host-side record: every slot's token, ids and rotary position, in storage (= feeding) order."""
from __future__ import annotations

import torch

from ..layout import BranchLayout
from ..reference import STRATEGIES
from .result import DecodeResult


class Positions:
    """SPEC §3's counter ``c``, advanced token by token as the decoder places them."""

    def __init__(self, strategy: str) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"position_strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.c = 0
        self.lengths: dict[int, int] = {}
        self.width = 0

    def serial(self, slot: int) -> int:
        if self.strategy == "sequential":
            return slot
        self.c += 1
        return self.c - 1

    def open(self, num_branches: int, width: int) -> None:
        self.lengths = {j: 0 for j in range(1, num_branches + 1)}
        self.width = width

    def branch(self, j: int, slot: int) -> int:
        t = self.lengths[j]
        self.lengths[j] = t + 1
        if self.strategy == "sequential":
            return slot
        if self.strategy == "fixed-length":
            if t >= self.width:
                raise ValueError(f"branch {j} outgrew the fixed-length width {self.width}")
            return self.c + (j - 1) * self.width + t
        return self.c + t

    def close(self) -> None:
        if self.strategy == "same-sequential":
            self.c += sum(self.lengths.values())
        elif self.strategy == "same-max":
            self.c += max(self.lengths.values())
        elif self.strategy == "fixed-length":
            self.c += len(self.lengths) * self.width


class Request:
    """A request in row ``row`` of the decoder's cache. Slots ``[0, fed)`` are in the cache; slots placed after
    them wait for the next forward pass. ``max_seq_len`` bounds the slots, ``max_position`` the rotary positions
    (the decoder's limits; the request knows nothing else of the decoder, which feeds it)."""

    def __init__(self, max_seq_len: int, max_position: int, strategy: str, row: int = 0) -> None:
        self.max_seq_len, self.max_position = max_seq_len, max_position
        self.row = row
        self.fed = 0
        self.tokens: list[int] = []
        self.seg: list[int] = []
        self.br: list[int] = []
        self.pos: list[int] = []
        self.sampled: list[bool] = []
        self.layout = BranchLayout()
        self.counter = Positions(strategy)
        self.section = -1
        self.parallel = False
        self.forward_passes = 0
        self.widths: list[int] = []
        self.t0 = self.t1 = 0.0
        self.stop_reason = ""  # why the last stage ended: set by the decoding loops (DecodeResult.stop_reason)

    def end(self, reason: str) -> None:
        """Record why a stage ended; "max_seq_len" (text was cut for lack of slots) is never overwritten."""
        if self.stop_reason != "max_seq_len":
            self.stop_reason = reason

    def room(self) -> int:
        """Slots left before ``max_seq_len``."""
        return self.max_seq_len - len(self.tokens)

    def place(self, token: int, j: int = 0, sampled: bool = False) -> int:
        """Put ``token`` at the next slot (serial if ``j == 0``, else branch ``j`` of the open section)."""
        slot = len(self.tokens)
        if slot >= self.max_seq_len:
            raise ValueError(f"the sequence outgrew max_seq_len={self.max_seq_len}")
        if j == 0:
            if self.parallel:
                self.close_section()
            if not self.br or self.br[-1] != 0:
                self.section += 1
            pos = self.counter.serial(slot)
            self.layout.append_serial(1)
        else:
            pos = self.counter.branch(j, slot)
            self.layout.append_branch(j, 1)
        if pos >= self.max_position:
            raise ValueError(f"position {pos} exceeds the rotary table ({self.max_position} rows; raise "
                             "max_position)")
        self.tokens.append(int(token))
        self.seg.append(self.section)
        self.br.append(j)
        self.pos.append(pos)
        self.sampled.append(sampled)
        return slot

    def open_section(self, num_branches: int, width: int) -> None:
        self.section += 1
        self.parallel = True
        self.layout.open_parallel()
        self.counter.open(num_branches, width)
        if self.counter.strategy == "fixed-length":
            self.widths.append(width)

    def close_section(self) -> None:
        self.parallel = False
        self.layout.close_parallel()
        self.counter.close()

    def history(self, slot: int) -> list[int]:
        """The tokens slot ``slot`` sees (SPEC §2), in storage order, itself included."""
        s, b = self.seg[slot], self.br[slot]
        return [self.tokens[k] for k in range(slot + 1) if self.seg[k] != s or self.br[k] == b]

    def result(self, branches: list, suffix: list[int], t2: float, plan: list[int] | None = None, *,
               mode: str = "", plan_found: bool | None = None) -> DecodeResult:
        lay = self.layout
        seg, br = torch.tensor(self.seg, dtype=torch.int32), torch.tensor(self.br, dtype=torch.int32)
        # the layout helper and the decoder's own bookkeeping must agree slot for slot
        assert torch.equal(lay.segment, seg) and torch.equal(lay.branch, br), "layout bookkeeping diverged"
        return DecodeResult(
            sequence=torch.tensor(self.tokens, dtype=torch.int64), segment=seg, branch=br,
            positions=torch.tensor(self.pos, dtype=torch.int32), sampled=torch.tensor(self.sampled, dtype=torch.bool),
            layout=lay, branches=branches, suffix=suffix, plan=plan or [], forward_passes=self.forward_passes,
            position_strategy=self.counter.strategy,
            width=self.widths if self.counter.strategy == "fixed-length" else None,
            prefill_s=self.t1 - self.t0, decode_s=t2 - self.t1, total_s=t2 - self.t0,
            mode=mode, stop_reason=self.stop_reason, plan_found=plan_found,
        )
