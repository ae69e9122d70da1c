"""The six special tokens of ASPD's answer format."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AspdTokens:
    """Ids of ASPD's special tokens. Format of a parallel answer::

        serial <|title|>T1<|/title|><|title|>T2<|/title|><|para|><|branch|>T1 ...<|/branch|><|branch|>T2 ...<|/branch|><|/para|> serial
    """

    branch: int
    branch_end: int
    title: int
    title_end: int
    para: int
    para_end: int

    @classmethod
    def qwen25(cls) -> "AspdTokens":
        """The ids ASPD's released Qwen2.5 checkpoints use (added after the base vocabulary, 151665..151670)."""
        return cls(151665, 151666, 151667, 151668, 151669, 151670)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "AspdTokens":
        """Look the six tokens up in a tokenizer that has them (see ``aspd_kernels.hf.add_aspd_tokens``)."""
        ids = [tokenizer.convert_tokens_to_ids(t) for t in TOKEN_STRINGS]
        missing = [t for t, i in zip(TOKEN_STRINGS, ids) if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks the ASPD tokens {missing}")
        return cls(*ids)

    def as_tuple(self) -> tuple[int, ...]:
        return (self.branch, self.branch_end, self.title, self.title_end, self.para, self.para_end)


TOKEN_STRINGS = ("<|branch|>", "<|/branch|>", "<|title|>", "<|/title|>", "<|para|>", "<|/para|>")
