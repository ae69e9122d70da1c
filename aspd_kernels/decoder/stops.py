"""Stop rules of the caller's branches (``generate_branches``): stop token ids and stop strings, the same for every
branch or one list per branch. A branch that meets its rule stops with that token as its last (as with EOS);
its siblings go on."""
from __future__ import annotations

from typing import Any, Callable

from .driver import check_ids

StopRule = Callable[[int, list[int]], bool]


def _per_branch(name: str, value, k: int, is_item: Callable[[Any], bool]) -> list[list] | None:
    """``value`` as ``k`` lists, one per branch: an item or a sequence of items applies to every branch; a sequence
    of ``k`` sequences of items (None for none) gives each branch its own. None: no rule."""
    if value is None:
        return None
    if is_item(value):
        return [[value]] * k
    value = list(value)
    if all(is_item(v) for v in value):
        return [value] * k
    if all(v is None or (not is_item(v) and hasattr(v, "__iter__")) for v in value):
        if len(value) != k:
            raise ValueError(f"{name} gives {len(value)} per-branch lists for {k} branches")
        return [[] if v is None else list(v) for v in value]
    raise ValueError(f"{name} must be one list for every branch or one list per branch (of {k}), not a mix")


def stop_rule(stop_token_ids, stop_strings, tokenizer, k: int, vocab: int) -> StopRule | None:
    """The rule ``rule(j, tokens) -> bool`` (branch ``j`` from 1, its generated ``tokens`` so far) for ``k`` branches,
    or None when there is none. ``stop_token_ids``: ids; ``stop_strings``: text the branch's decoded tokens
    (``tokenizer.decode``) may not contain; each for all branches or per branch. ``ValueError`` naming the argument
    on bad input."""
    def is_id(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) or hasattr(v, "__index__") and not hasattr(v, "__len__")

    if hasattr(stop_token_ids, "tolist"):  # a tensor or an array of ids
        stop_token_ids = stop_token_ids.tolist()
    ids = _per_branch("stop_token_ids", stop_token_ids, k, is_id)
    strs = _per_branch("stop_strings", stop_strings, k, lambda v: isinstance(v, str))
    if ids is not None:
        shared = is_id(stop_token_ids) or all(is_id(v) for v in stop_token_ids)
        ids = [set(check_ids("stop_token_ids" if shared else f"stop_token_ids[{j}]", b, vocab))
               for j, b in enumerate(ids)]
    if strs is not None:
        if any(s == "" for b in strs for s in b):
            raise ValueError("stop_strings holds an empty string (every text contains it)")
        if not any(strs):
            strs = None
        elif tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise ValueError("stop_strings needs tokenizer= (anything with decode(ids) -> str) to read the branches")
    if ids is None and strs is None:
        return None

    def rule(j: int, tokens: list[int]) -> bool:
        if ids is not None and tokens and tokens[-1] in ids[j - 1]:
            return True
        if strs is not None and strs[j - 1]:
            text = tokenizer.decode(tokens)
            return any(s in text for s in strs[j - 1])
        return False

    return rule
