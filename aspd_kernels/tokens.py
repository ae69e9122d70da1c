"""The six special tokens of ASPD's answer format, and the text its engine forces around them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class AspdTokens:
    """Ids of ASPD's special tokens. Format of a parallel answer (``docs/aspd_format.md``)::

        serial <|title|>T1<|/title|><|title|>T2<|/title|><|para|><|branch|>T1: ...<|/branch|><|branch|>T2: ...<|/branch|><|/para|>\\n serial

    ``title_sep``: ids the decoder places after a branch's title in its prompt (``<|branch|>`` + title +
    ``title_sep``); ``after_para``: ids it places after the ``<|/para|>`` that closes a section. ASPD's engine
    forces ``": "`` and ``"\\n"`` there, which :meth:`from_tokenizer` encodes by default; both are empty unless
    given, since their ids depend on the tokenizer.
    """

    branch: int
    branch_end: int
    title: int
    title_end: int
    para: int
    para_end: int
    title_sep: tuple[int, ...] = ()
    after_para: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # lists given by the caller become tuples: the dataclass is frozen and hashable
        object.__setattr__(self, "title_sep", tuple(int(t) for t in self.title_sep))
        object.__setattr__(self, "after_para", tuple(int(t) for t in self.after_para))

    @classmethod
    def qwen25(cls, title_sep: Sequence[int] = (), after_para: Sequence[int] = ()) -> "AspdTokens":
        """The ids ASPD's released Qwen2.5 checkpoints use (added after the base vocabulary, 151665..151670).
        Pass ``title_sep``/``after_para`` (or use :meth:`from_tokenizer`) for ASPD's ``": "`` and ``"\\n"``."""
        return cls(151665, 151666, 151667, 151668, 151669, 151670, tuple(title_sep), tuple(after_para))

    @classmethod
    def from_tokenizer(cls, tokenizer, title_sep: str = ": ", after_para: str = "\n") -> "AspdTokens":
        """Look the six tokens up in a tokenizer that has them (see ``aspd_kernels.hf.add_aspd_tokens``), and
        encode ``title_sep`` and ``after_para`` (ASPD's engine's ``": "`` and ``"\\n"`` by default; ``""`` for
        none) without template tokens."""
        ids = [tokenizer.convert_tokens_to_ids(t) for t in TOKEN_STRINGS]
        missing = [t for t, i in zip(TOKEN_STRINGS, ids) if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks the ASPD tokens {missing}")
        sep = tokenizer.encode(title_sep, add_special_tokens=False) if title_sep else []
        after = tokenizer.encode(after_para, add_special_tokens=False) if after_para else []
        return cls(*ids, title_sep=tuple(sep), after_para=tuple(after))

    def as_tuple(self) -> tuple[int, ...]:
        return (self.branch, self.branch_end, self.title, self.title_end, self.para, self.para_end)


TOKEN_STRINGS = ("<|branch|>", "<|/branch|>", "<|title|>", "<|/title|>", "<|para|>", "<|/para|>")
