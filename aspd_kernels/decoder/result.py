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
    branches:  per parallel section (``generate``, ``generate_plan``) or for the one section
               (``generate_branches``: a flat list), each branch's generated tokens in order, its end token (EOS /
               ``<|/branch|>``) included. Its shape depends on the mode: :attr:`sections` has one shape for all.
    suffix:    tokens generated after the (last) parallel section (``generate_plan``: the conclusion).
    plan:      ``generate_plan``'s stage-1 tokens (the plan, or the whole serial answer when none was written).
    width:     the fixed-length stride of each parallel section (None for other strategies).
    mode:      "serial", "branches", "aspd" or "plan": the method that made it.
    stop_reason: why decoding ended: "eos" (the model ended), "stop" (a branch stop rule or token ended the last
               branches), "max_new_tokens" (a token limit was reached), "max_seq_len" (the sequence ran out of
               slots; the result holds everything generated until then).
    plan_found: ``generate_plan`` only: False when the model wrote no complete plan, so the answer is serial
               (``sections == []``, the text in ``plan`` and ``suffix``); None for the other modes.
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
    mode: str = ""
    stop_reason: str = ""
    plan_found: bool | None = None

    @property
    def sections(self) -> list[list[list[int]]]:
        """Every parallel section, in order, each a list of its branches' generated tokens: the same shape for
        every mode (``generate_branches``: one section; ``generate_serial`` and a plan not found: none)."""
        if self.mode == "branches":
            return [self.branches] if self.branches else []
        return list(self.branches)

    @property
    def parallel(self) -> bool:
        """True when the answer has at least one parallel section."""
        return bool(self.sections)

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
