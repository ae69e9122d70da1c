"""``BranchLayout``: the per-token (segment, branch) metadata of one sequence, built once or grown while decoding."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .reference import dense_mask as _dense_mask
from .reference import positions_one
from .tokens import AspdTokens


class BranchLayout:
    """Section ids and branch ids of one sequence in storage order (SPEC sections 1-3).

    Build it from a section list, from ASPD-format tokens, or grow it while decoding::

        lay = BranchLayout.from_sections([("serial", 12), ("parallel", [5, 7, 3]), ("serial", 4)])
        lay = BranchLayout.from_aspd_tokens(ids, AspdTokens.qwen25())
        lay = BranchLayout(); lay.append_serial(12); lay.open_parallel(); lay.append_step([1, 2, 3]); lay.close_parallel()

    ``segment`` and ``branch`` are int32 tensors ``[N]``; ``positions(strategy)`` the rotary ids; ``dense_mask()``
    the ``[N, N]`` boolean mask (for tests and engines that want one: the kernels never build it).
    """

    def __init__(self) -> None:
        self._segment: list[int] = []
        self._branch: list[int] = []
        self._open = False  # inside a parallel section
        self._section = -1

    # ----------------------------------------------------------------- builders
    @classmethod
    def from_sections(cls, sections: Iterable[tuple[str, int | Sequence[int]]], storage: str = "contiguous"
                      ) -> "BranchLayout":
        """``sections``: ``("serial", n)`` or ``("parallel", [L_1, ..., L_K])`` in order. ``storage``:
        "contiguous" (branch after branch) or "interleaved" (one token per live branch per step, a finished branch
        adding no more)."""
        if storage not in ("contiguous", "interleaved"):
            raise ValueError(f"storage must be 'contiguous' or 'interleaved', got {storage!r}")
        lay = cls()
        for i, item in enumerate(sections):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"sections[{i}] must be a (kind, size) pair, got {item!r}")
            kind, size = item
            if kind == "serial":
                if not isinstance(size, int) or size < 0:
                    raise ValueError(f"sections[{i}]: a serial section needs a length >= 0, got {size!r}")
                lay.append_serial(size)
            elif kind == "parallel":
                lengths = list(size)
                if not lengths or any(not isinstance(n, int) or n < 0 for n in lengths):
                    raise ValueError(f"sections[{i}]: a parallel section needs branch lengths >= 0, got {size!r}")
                lay.open_parallel()
                if storage == "contiguous":
                    for j, n in enumerate(lengths, start=1):
                        lay.append_branch(j, n)
                else:
                    for step in range(max(lengths)):
                        lay.append_step([j for j, n in enumerate(lengths, start=1) if n > step])
                lay.close_parallel()
            else:
                raise ValueError(f"sections[{i}]: kind must be 'serial' or 'parallel', got {kind!r}")
        return lay

    @classmethod
    def from_aspd_tokens(cls, ids: Sequence[int] | torch.Tensor, tokens: AspdTokens) -> "BranchLayout":
        """Parse one sequence in ASPD's format (``ids``: ints or an int tensor of any shape, read flattened).

        Tokens from a ``<|branch|>`` to its ``<|/branch|>`` (both included) form one branch; consecutive branches
        form one parallel section, which ends at its last ``<|/branch|>``. Tokens between two branches of a
        section stay with the branch before them; tokens after the last ``<|/branch|>`` (``<|/para|>`` or
        anything else) are serial, as ASPD's training collator has them. Everything else is serial.
        See ``docs/aspd_format.md`` for worked cases.

        Raises ``ValueError`` naming the position ``ids[i]`` for a ``<|branch|>`` inside an open branch, a
        ``<|/branch|>`` outside one, a ``<|title|>``, ``<|/title|>``, ``<|para|>`` or ``<|/para|>`` inside a
        branch, and a branch still open at the end of the sequence.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        ids = list(ids)
        inside_forbidden = {tokens.title: "<|title|>", tokens.title_end: "<|/title|>", tokens.para: "<|para|>",
                            tokens.para_end: "<|/para|>"}
        # branch_follows[i]: from slot i on, a <|branch|> comes before anything that ends a section; a token
        # outside a branch with it set sits between two branches. One backward pass keeps the parse linear.
        branch_follows = [False] * (len(ids) + 1)
        enders = (tokens.para_end, tokens.para, tokens.title, tokens.branch_end)
        for i in range(len(ids) - 1, -1, -1):
            t = ids[i]
            branch_follows[i] = t == tokens.branch or (t not in enders and branch_follows[i + 1])
        lay = cls()
        opened = -1  # position of the open branch's <|branch|>, -1 outside a branch
        k = 0
        for pos, t in enumerate(ids):
            if opened >= 0:
                if t == tokens.branch:
                    raise ValueError(f"ids[{pos}]: <|branch|> opens a branch inside an open branch "
                                     f"(opened at ids[{opened}])")
                if t in inside_forbidden:
                    raise ValueError(f"ids[{pos}]: {inside_forbidden[t]} inside a branch (opened at ids[{opened}])")
                lay.append_branch(k, 1)
                if t == tokens.branch_end:
                    opened = -1
            elif t == tokens.branch:
                if not lay._open:
                    lay.open_parallel()
                    k = 0
                k += 1
                opened = pos
                lay.append_branch(k, 1)
            elif t == tokens.branch_end:
                raise ValueError(f"ids[{pos}]: <|/branch|> outside a branch")
            elif lay._open and branch_follows[pos]:  # t is not <|branch|>: it sits between two branches
                lay.append_branch(k, 1)
            else:
                lay.append_serial(1)  # closes the section if one is open
        if opened >= 0:
            raise ValueError(f"ids[{opened}]: <|branch|> is never closed (the sequence ends inside the branch)")
        if lay._open:
            lay.close_parallel()
        return lay

    # ------------------------------------------------------------- incremental
    def append_serial(self, n: int = 1) -> None:
        """``n`` serial tokens; closes an open parallel section first."""
        if self._open:
            self.close_parallel()
        if n == 0:
            return
        if not self._segment or self._branch[-1] != 0 or self._segment[-1] != self._section:
            self._section += 1
        self._segment += [self._section] * n
        self._branch += [0] * n

    def open_parallel(self) -> None:
        """Start a new parallel section (closing any open one)."""
        self._section += 1
        self._open = True

    def append_branch(self, j: int, n: int = 1) -> None:
        """``n`` tokens of branch ``j >= 1`` of the open parallel section."""
        if not self._open:
            raise ValueError("append_branch: no parallel section is open (call open_parallel first)")
        if j < 1:
            raise ValueError(f"branch ids start at 1, got {j}")
        self._segment += [self._section] * n
        self._branch += [j] * n

    def append_step(self, live: Iterable[int]) -> None:
        """One decoding step: one token for each branch id in ``live``, in that order."""
        for j in live:
            self.append_branch(j, 1)

    def close_parallel(self) -> None:
        self._open = False

    # ----------------------------------------------------------------- views
    def __len__(self) -> int:
        return len(self._segment)

    @property
    def is_parallel_open(self) -> bool:
        return self._open

    @property
    def segment(self) -> torch.Tensor:
        return torch.tensor(self._segment, dtype=torch.int32)

    @property
    def branch(self) -> torch.Tensor:
        return torch.tensor(self._branch, dtype=torch.int32)

    def positions(self, strategy: str = "same-sequential", width: int | None = None) -> torch.Tensor:
        """int32 ``[N]`` rotary positions (SPEC section 3)."""
        return torch.tensor(positions_one(self._segment, self._branch, strategy, width), dtype=torch.int32)

    def dense_mask(self) -> torch.Tensor:
        """bool ``[N, N]``: row = query, column = key."""
        return _dense_mask(self.segment, self.branch)

    def branch_lengths(self) -> dict[int, dict[int, int]]:
        """``{segment: {branch: length}}`` of the parallel sections."""
        out: dict[int, dict[int, int]] = {}
        for s, b in zip(self._segment, self._branch):
            if b:
                out.setdefault(s, {}).setdefault(b, 0)
                out[s][b] += 1
        return out

    def __repr__(self) -> str:
        sections = len(set(self._segment))
        return f"BranchLayout(tokens={len(self)}, sections={sections}, open={self._open})"
