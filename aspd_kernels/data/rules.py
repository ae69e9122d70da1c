"""The verification rules of the transformation stage: independence of a section's items, and the integrity of
the ASPD-format answer (it reads back to the original text).

Independence is judged on the text alone, conservatively: a section is refused when any item points at another
item or at the order of the items. An optional judge (any callable, e.g. :func:`aspd_kernels.data.judge.lm_judge`)
can refuse more.
"""
from __future__ import annotations

import re
from typing import Callable

from .structure import Section, find_sections

# phrases that point at another item, anywhere in an item
_CROSS_REF = re.compile(
    r"\b(as (mentioned|noted|discussed|stated|shown|described|explained|said)( (above|earlier|before|previously))?"
    r"|as above|see above|above[- ]mentioned|mentioned (above|earlier|before)"
    r"|the (previous|preceding|next|following|last|above|former|latter|first|second|third) "
    r"(step|steps|tip|tips|point|points|item|items|one|ones|section|idea|ideas|method|methods|way|ways|reason|"
    r"reasons|benefit|benefits)"
    r"|(step|tip|point|item|reason|number) (#?\d+|one|two|three|four|five)\b"
    r"|the (steps|tips|points|ideas) above|these steps|all of the above"
    r"|the other (tips|steps|points|ideas|ways|items|reasons))\b", re.IGNORECASE)
# words that place an item in a sequence, when they open the item's title or body
_ORDER_OPENING = re.compile(
    r"^\W*(first(ly)?|second(ly)?|third(ly)?|next|then|finally|lastly|last|also|another|additionally|"
    r"in addition|after that|afterwards|moreover|furthermore|besides|similarly|likewise|once (you|this|that))\b",
    re.IGNORECASE)
# a sentence inside an item that continues from the one before ("... . Then ...")
_ORDER_SENTENCE = re.compile(r"(^|[.!?:]\s+)(then|next|after that|afterwards|finally|lastly)\b", re.IGNORECASE)

Judge = Callable[[str, Section], bool]


def _trigrams(text: str) -> set[tuple[str, ...]]:
    w = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return {tuple(w[i:i + 3]) for i in range(max(0, len(w) - 2))} or {tuple(w)}


def repeats(a: str, b: str, threshold: float = 0.5) -> bool:
    """Whether two sibling texts repeat each other: at least ``threshold`` of the shorter one's word trigrams
    (lower case, punctuation dropped) occur in the other."""
    ta, tb = _trigrams(a), _trigrams(b)
    return len(ta & tb) >= threshold * min(len(ta), len(tb))


def repeated_pairs(texts: list[str], threshold: float = 0.5) -> list[tuple[int, int]]:
    """The pairs ``(j, k)``, ``j < k``, of ``texts`` that :func:`repeats` finds repeating each other."""
    return [(j, k) for j in range(len(texts)) for k in range(j + 1, len(texts))
            if repeats(texts[j], texts[k], threshold)]


def list_repeats(text: str, threshold: float = 0.5) -> bool:
    """Whether a list in ``text`` (any run of items :func:`structure.find_sections` finds, serial or read back from
    branches) repeats itself: two items with the same title (case ignored) or two bodies that :func:`repeats`.
    Greedy decoding of a small model loops, and a loop is likely text: the evaluation compares the log-likelihood
    of answers that do not."""
    for piece in find_sections(text)[0]:
        if isinstance(piece, Section):
            titles = [it.title.strip().lower() for it in piece.items]
            if len(set(titles)) < len(titles) or repeated_pairs([it.body for it in piece.items], threshold):
                return True
    return False


def dependence(section: Section) -> list[str]:
    """Why the items of ``section`` are not independent (empty: no sign they depend on each other or on their
    order). Checks each item's title and body; titles must also differ from each other, and bodies must not repeat each
    other (:func:`repeats`): parallel branches are meant to say different things."""
    reasons = []
    seen: dict[str, int] = {}
    for k, it in enumerate(section.items, start=1):
        key = " ".join(re.sub(r"[^\w\s]", "", it.title).lower().split())
        if key in seen:
            reasons.append(f"item {k} repeats the title of item {seen[key]}")
        seen.setdefault(key, k)
        for part, text in (("title", it.title), ("body", it.body)):
            m = _CROSS_REF.search(text)
            if m:
                reasons.append(f"item {k} {part} refers to another item: {m.group(0)!r}")
            m = _ORDER_OPENING.match(text)
            if m:
                reasons.append(f"item {k} {part} opens with an order word: {m.group(1)!r}")
        m = _ORDER_SENTENCE.search(it.body)
        if m:
            reasons.append(f"item {k} body continues a sequence: {m.group(2)!r}")
    for j, k in repeated_pairs([it.body for it in section.items]):
        reasons.append(f"item {k + 1} repeats item {j + 1}")
    return reasons


def check_section(prompt: str, section: Section, judge: Judge | None = None, min_branches: int = 2) -> list[str]:
    """All the reasons to refuse ``section`` as a parallel section (empty: accepted): fewer than ``min_branches``
    items (ASPD's selection: a two-item list gains little from parallel decoding), the independence rules, then
    ``judge(prompt, section)`` when given (False refuses)."""
    if min_branches < 2:
        raise ValueError(f"min_branches must be at least 2, got {min_branches}")
    reasons = [f"fewer than {min_branches} items"] if len(section.items) < min_branches else []
    reasons += dependence(section)
    if not reasons and judge is not None and not judge(prompt, section):
        reasons.append("the judge found the items dependent")
    return reasons


def check_integrity(original: str, read_back: str, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``read_back`` (the ASPD-format answer read in order) equals
    ``original``. Trailing whitespace is ignored: ASPD's engine always places ``"\\n"`` after ``<|/para|>``, so an
    answer that ends with a list reads back with one more line break."""
    if read_back.rstrip() != original.rstrip():
        a, b = original.rstrip(), read_back.rstrip()
        i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        raise ValueError(f"{where}: the ASPD-format answer does not read back to the original text: they differ "
                         f"at character {i} ({a[i:i + 30]!r} vs {b[i:i + 30]!r})")
