"""Token selection with torch ops only (no host sync): greedy, temperature, top-k, top-p, seeded; grammar masks are
additive ``-inf`` biases on the logits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from ..tokens import AspdTokens


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy (argmax). ``top_k``/``top_p`` filter before sampling; ``seed`` seeds a
    generator on the logits' device."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.temperature == 0 or self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           bias: Tensor | None = None) -> Tensor:
    """``logits float [R, V]`` -> int64 ``[R]``. ``bias [V]`` or ``[R, V]`` (0 / -inf) is added first."""
    if bias is not None:
        logits = logits + bias
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        cum = srt.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the mass before it already reaches top_p; the first token always stays
        drop = (cum - srt.softmax(dim=-1)) >= params.top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential-race trick): no multinomial, no host sync
    e = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / e).argmax(dim=-1)


MAX_TITLE_TOKENS = 32


def open_title(ids: list[int], tokens: AspdTokens) -> int | None:
    """How many tokens follow the ``<|title|>`` still open at the end of ``ids`` (None: no title is open)."""
    for k in range(len(ids) - 1, -1, -1):
        if ids[k] == tokens.title_end:
            return None
        if ids[k] == tokens.title:
            return len(ids) - 1 - k
    return None


class Grammar:
    """ASPD's six-token grammar as precomputed additive masks ``[V]`` (0 allowed, -inf forbidden).

    Serial text: ``<|branch|>``, ``<|/branch|>``, ``<|/para|>`` never; after ``<|/title|>`` only ``<|title|>`` or
    ``<|para|>``; ``<|para|>`` only right after a ``<|/title|>`` (so at least one title exists); ``<|/title|>`` only
    inside an open title and ``<|title|>`` not inside one. Inside a title no ``stop_ids`` (an answer that ends in an
    open title reads back without that title's text), and after ``max_title_tokens`` title tokens only
    ``<|/title|>``: a small model sometimes writes an item's body into its title. Inside a branch: ``<|branch|>``,
    ``<|title|>``, ``<|/title|>``, ``<|para|>``, ``<|/para|>`` never (as ASPD's engine; ``from_aspd_tokens`` rejects
    them there).
    """

    def __init__(self, tokens: AspdTokens, vocab_size: int, device: torch.device, stop_ids: Iterable[int] = (),
                 max_title_tokens: int = MAX_TITLE_TOKENS) -> None:
        bad = [t for t in tokens.as_tuple() if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"ASPD token ids {bad} lie outside the vocabulary [0, {vocab_size})")
        if max_title_tokens < 1:
            raise ValueError(f"max_title_tokens must be >= 1, got {max_title_tokens}")
        self.tokens = tokens
        t = tokens
        self._v, self._dev = vocab_size, device
        self.stop_ids = tuple(sorted({int(i) for i in stop_ids if 0 <= int(i) < vocab_size}))
        self.max_title_tokens = max_title_tokens
        serial_never = (t.branch, t.branch_end, t.para_end)
        self.serial = self._forbid(serial_never + (t.para, t.title_end))
        self.in_title = self._forbid(serial_never + (t.para, t.title) + self.stop_ids)
        self.close_title = self._allow((t.title_end,))
        self.after_title = self._allow((t.title, t.para))
        self.branch = self._forbid((t.branch, t.title, t.title_end, t.para, t.para_end))

    def _forbid(self, ids: Iterable[int]) -> Tensor:
        m = torch.zeros(self._v, dtype=torch.float32, device=self._dev)
        m[list(ids)] = float("-inf")
        return m

    def _allow(self, ids: Iterable[int]) -> Tensor:
        m = torch.full((self._v,), float("-inf"), dtype=torch.float32, device=self._dev)
        m[list(ids)] = 0.0
        return m

    def serial_bias(self, last: int | None, title_open: bool, title_len: int = 0) -> Tensor:
        """Mask for the next serial token after ``last`` (None at the start); ``title_len``: the open title's tokens
        so far."""
        if last == self.tokens.title_end:
            return self.after_title
        if title_open:
            return self.close_title if title_len >= self.max_title_tokens else self.in_title
        return self.serial

    def serial_bias_after(self, ids: list[int]) -> Tensor:
        """:meth:`serial_bias` for the serial text ``ids`` (non-empty) so far."""
        n = open_title(ids, self.tokens)
        return self.serial_bias(ids[-1], n is not None, n or 0)
