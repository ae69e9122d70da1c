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


class Grammar:
    """ASPD's six-token grammar as precomputed additive masks ``[V]`` (0 allowed, -inf forbidden).

    Serial text: ``<|branch|>``, ``<|/branch|>``, ``<|/para|>`` never; after ``<|/title|>`` only ``<|title|>`` or
    ``<|para|>``; ``<|para|>`` only right after a ``<|/title|>`` (so at least one title exists); ``<|/title|>`` only
    inside an open title and ``<|title|>`` not inside one. Inside a branch: ``<|branch|>``, ``<|title|>``,
    ``<|/title|>``, ``<|para|>``, ``<|/para|>`` never (as ASPD's engine; ``from_aspd_tokens`` rejects them there).
    """

    def __init__(self, tokens: AspdTokens, vocab_size: int, device: torch.device) -> None:
        bad = [t for t in tokens.as_tuple() if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"ASPD token ids {bad} lie outside the vocabulary [0, {vocab_size})")
        self.tokens = tokens
        t = tokens
        self._v, self._dev = vocab_size, device
        serial_never = (t.branch, t.branch_end, t.para_end)
        self.serial = self._forbid(serial_never + (t.para, t.title_end))
        self.in_title = self._forbid(serial_never + (t.para, t.title))
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

    def serial_bias(self, last: int | None, title_open: bool) -> Tensor:
        """Mask for the next serial token after ``last`` (None at the start)."""
        if last == self.tokens.title_end:
            return self.after_title
        return self.in_title if title_open else self.serial
