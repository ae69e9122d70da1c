"""What a decoding call returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layout import BranchLayout


@dataclass
class DecodeResult:
    """One request's decoded sequence with its layout and stats.

    sequence:  int64 [N] every token in KV-cache storage order (prompt, branch prompts, generated tokens, inserted
               ``<|/para|>``...). The last serial token sampled is listed at the slot it would take but never fed:
               no later token needs it.
    segment, branch, positions: int32 [N], the ids and rotary positions the decoder used for each slot.
    sampled:   bool [N], True where the decoder sampled the token (not given by the caller or inserted by the engine).
    branches:  per parallel section (``generate``) or for the one section (``generate_branches``), each branch's
               generated tokens in order, its end token (EOS / ``<|/branch|>``) included.
    suffix:    tokens generated after the (last) parallel section (``generate_plan``: the conclusion).
    plan:      ``generate_plan``'s stage-1 tokens (the plan, or the whole serial answer when none was written).
    width:     the fixed-length stride of each parallel section (None for other strategies).
    """

    sequence: torch.Tensor
    segment: torch.Tensor
    branch: torch.Tensor
    positions: torch.Tensor
    sampled: torch.Tensor
    layout: BranchLayout
    branches: list = field(default_factory=list)
    suffix: list[int] = field(default_factory=list)
    plan: list[int] = field(default_factory=list)
    forward_passes: int = 0
    position_strategy: str = "same-sequential"
    width: list[int] | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0

    @property
    def generated_tokens(self) -> int:
        return int(self.sampled.sum())

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall-clock, prefill included."""
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0
