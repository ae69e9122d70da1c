"""The list format of the training-free plan mode (Yu et al.'s "parallel decoding within one sequence") and the
grammar that keeps a model's plan in that form while it is written.

A plan in Yu's default format, then its items as branches, then the conclusion (``|`` separates branches)::

    intro\\n####Title 1:......\\n####Title 2:......\\n####%%%%  ####Title 1: body\\n | ####Title 2: body\\n  ####%%%% conclusion
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Sequence

import torch
from torch import Tensor

# Yu et al.'s instruction, in our words: appended to the user's prompt by the CLI's --plan.
YU_INSTRUCTION = (
    "Answer format: when the answer has several independent parts (several documents, options, aspects or "
    "steps that do not depend on each other), first list them, one per line, each as '####' followed by its title, "
    "a colon ':' and '......' in place of its content; after the last one write '####%%%%'. Each part is then "
    "written in full, and after them the conclusion. Only independent parts start with '####'."
)


@dataclass(frozen=True)
class PlanFormat:
    """Token ids of a plan's list format (all tuples of ids; lists are accepted and converted).

    item_open:    starts an item, in the plan and in its branch (Yu: ``"####"``).
    title_end:    any one of these tokens ends an item's title (Yu: ``":"``).
    placeholder:  forced after each title in the plan (Yu: ``"......\\n"``); may be empty.
    plan_end:     written right after an ``item_open``, ends the plan (Yu: ``"%%%%"``).
    branch_stop:  tokens that end a branch and are dropped (Yu: the first token of ``"####"``: the model starting
                  the next item); EOS always ends a branch too, and is dropped.
    branch_close: placed at the end of every branch (Yu: ``"\\n"``); may be empty.
    conclusion:   serial text placed after the branches, before the conclusion is decoded (Yu: ``"####%%%%"``).
    max_title_tokens, max_items: the grammar ends a title with ``title_end[0]`` after this many tokens, and the
                  plan with ``plan_end`` after this many items, so that the list keeps its form.

    Item ``k``'s branch prompt is ``item_open + title_k + (its title_end token,)``.
    """

    item_open: tuple[int, ...]
    title_end: tuple[int, ...]
    placeholder: tuple[int, ...]
    plan_end: tuple[int, ...]
    branch_stop: tuple[int, ...] = ()
    branch_close: tuple[int, ...] = ()
    conclusion: tuple[int, ...] = ()
    max_title_tokens: int = 16
    max_items: int = 8

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.startswith("max_"):
                if getattr(self, f.name) < 1:
                    raise ValueError(f"PlanFormat.{f.name} must be >= 1, got {getattr(self, f.name)}")
                continue
            object.__setattr__(self, f.name, tuple(int(t) for t in getattr(self, f.name)))
        for name in ("item_open", "title_end", "plan_end"):
            if not getattr(self, name):
                raise ValueError(f"PlanFormat.{name} must hold at least one token id")

    def ids(self) -> list[int]:
        """Every token id the format names (for range checks)."""
        return [t for f in fields(self) if not f.name.startswith("max_") for t in getattr(self, f.name)]

    @classmethod
    def from_strings(cls, tokenizer, item_open: str = "####", title_end: Sequence[str] = (":",),
                     placeholder: str = "......\n", plan_end: str = "%%%%", branch_close: str = "\n",
                     conclusion: str | None = None, **limits: int) -> "PlanFormat":
        """Encode a format's strings with ``tokenizer`` (no template tokens). Defaults: Yu et al.'s format.
        ``title_end`` strings must each be one token; ``branch_stop`` is the first token of ``item_open``;
        ``conclusion`` defaults to the ids of ``item_open`` then those of ``plan_end`` (as the grammar writes them
        at the end of the plan)."""
        def enc(s: str) -> list[int]:
            return tokenizer.encode(s, add_special_tokens=False) if s else []

        ends = []
        for s in title_end:
            ids = enc(s)
            if len(ids) != 1:
                raise ValueError(f"title_end {s!r} must be one token of this tokenizer, got {ids}")
            ends.append(ids[0])
        opener = enc(item_open)
        return cls(item_open=opener, title_end=ends, placeholder=enc(placeholder), plan_end=enc(plan_end),
                   branch_stop=opener[:1], branch_close=enc(branch_close),
                   conclusion=opener + enc(plan_end) if conclusion is None else enc(conclusion), **limits)

    @classmethod
    def yu(cls, tokenizer, **limits: int) -> "PlanFormat":
        """Yu et al.'s format (``####Title:......`` items ended by ``####%%%%``) for ``tokenizer``."""
        return cls.from_strings(tokenizer, **limits)


FREE, OPEN, TITLE, DONE = "free", "open", "title", "done"


class PlanGrammar:
    """The plan's grammar while stage 1 is sampled, as additive masks ``[V]`` (0 allowed, -inf forbidden).

    States: ``free`` text until the text ends with ``item_open`` (the prompt counts: a prompt ending with it
    starts the plan); ``open`` right after it: ``plan_end`` (once an item exists) or a title's first token;
    ``title`` until a ``title_end`` token, then ``placeholder + item_open`` are forced; ``done`` once ``plan_end``
    is complete. EOS (``stop``) is allowed only in free text; ``title_end`` never starts a title.
    ``bias()`` gives the mask for the next token, ``feed(t)`` advances; ``items`` holds ``(title, end token)``.
    """

    def __init__(self, fmt: PlanFormat, stop: Iterable[int], vocab_size: int, device: torch.device,
                 prompt: Sequence[int] = ()) -> None:
        self.fmt, self.stop = fmt, tuple(stop)
        self._v, self._dev = vocab_size, device
        self._masks: dict[tuple, Tensor] = {}
        self.text = list(prompt[-len(fmt.item_open):]) if prompt else []
        self.state = OPEN if self._ends_with_open() else FREE
        self.items: list[tuple[list[int], int]] = []
        self.title: list[int] = []
        self.forced: list[int] = []

    def _ends_with_open(self) -> bool:
        n = len(self.fmt.item_open)
        return len(self.text) >= n and tuple(self.text[-n:]) == self.fmt.item_open

    def _mask(self, allow: bool, ids: Sequence[int]) -> Tensor:
        key = (allow, tuple(ids))
        if key not in self._masks:
            m = torch.full((self._v,), float("-inf") if allow else 0.0, dtype=torch.float32, device=self._dev)
            m[list(ids)] = 0.0 if allow else float("-inf")
            self._masks[key] = m
        return self._masks[key]

    def bias(self) -> Tensor | None:
        f = self.fmt
        if self.forced:
            return self._mask(True, self.forced[:1])
        if self.state == OPEN:
            if len(self.items) >= f.max_items:
                return self._mask(True, f.plan_end[:1])
            return self._mask(False, self.stop + f.title_end + (() if self.items else f.plan_end[:1]))
        if self.state == TITLE:
            if len(self.title) >= f.max_title_tokens:
                return self._mask(True, f.title_end[:1])
            return self._mask(False, self.stop)
        return None

    def feed(self, t: int) -> None:
        f = self.fmt
        self.text.append(t)
        if self.forced:
            if t != self.forced[0]:
                raise RuntimeError(f"the plan grammar forced {self.forced[0]}, got {t}")
            self.forced.pop(0)
            if not self.forced and self.state == FREE and self._ends_with_open():
                self.state = OPEN
            return
        if self.state == FREE:
            if self._ends_with_open():
                self.state = OPEN
        elif self.state == OPEN:
            if t == f.plan_end[0] and self.items:
                self.state, self.forced = DONE, list(f.plan_end[1:])
            else:
                self.state, self.title = TITLE, [t]
        elif self.state == TITLE:
            if t in f.title_end:
                self.items.append((self.title, t))
                self.state, self.title = FREE, []
                self.forced = list(f.placeholder + f.item_open)
            else:
                self.title.append(t)

    @property
    def complete(self) -> bool:
        """The plan is finished: ``plan_end`` written in full."""
        return self.state == DONE and not self.forced
