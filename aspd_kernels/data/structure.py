"""Finding parallelizable structure in a serial answer: numbered lists, bulleted lists, and runs of
"Title: text" paragraphs (bold-headed or plain), each item split into a title and a body.

An answer becomes a list of pieces: plain text (``str``) and :class:`Section` s. Every character of the answer is in
exactly one piece, so :func:`render` (the pieces read back in order) gives the answer again; the integrity rule
(``rules.py``) checks that through the ASPD tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# an item starts at the beginning of a line (no indentation: indented lines are sub-items of the item above)
_NUMBERED = re.compile(r"(\d{1,2})([.)]) ")
_BULLET = re.compile(r"([-*\u2022]) ")
# a paragraph that opens with a short title and a colon: "**Title**: text", "**Title:** text", "Title: text"
_TITLED = re.compile(r"(\*\*[^*\n]{1,80}\*\*:|\*\*[^*\n]{1,80}:\*\*|[A-Z][^:\n]{0,60}:) ")

MAX_TITLE_WORDS = 12
MAX_TITLE_CHARS = 80


@dataclass
class Item:
    """One list item. Its text in the answer is ``marker + title + ":" + body``."""

    marker: str  # "3. ", "- ", "" (titled paragraphs)
    title: str
    body: str

    @property
    def text(self) -> str:
        return f"{self.marker}{self.title}:{self.body}"


@dataclass
class Section:
    """A run of sibling items: ``kind`` ("numbered", "bullet", "titled"), the items, and ``sep``: the whitespace
    between two items (the same between every pair)."""

    kind: str
    items: list[Item]
    sep: str
    rejected: list[str] = field(default_factory=list)  # why the rules refused it (empty: accepted)

    @property
    def text(self) -> str:
        return self.sep.join(it.text for it in self.items)


Piece = "str | Section"


def starts_with_marker(text: str) -> bool:
    """Whether ``text`` opens on a list marker (``"3. "``, ``"2) "``, ``"- "``, ``"* "``, ``"\u2022 "``)."""
    return bool(_NUMBERED.match(text) or _BULLET.match(text))


def render(pieces: list) -> str:
    """The answer the pieces came from: plain text as it is, each section's items in order with their markers."""
    return "".join(p if isinstance(p, str) else p.text for p in pieces)


def split_title(content: str) -> tuple[str, str] | None:
    """``content`` (an item without its marker) as ``(title, body)`` around its first colon, or None when no short
    title opens it (no colon, an empty or multi-line title, a sentence before the colon, an empty body)."""
    i = content.find(":")
    if i <= 0:
        return None
    title, body = content[:i], content[i + 1:]
    if (len(title) > MAX_TITLE_CHARS or len(title.split()) > MAX_TITLE_WORDS or "\n" in title
            or title != title.strip() or re.search(r"[.!?]\s", title) or not body.strip()):
        return None
    return title, body


def _starts(text: str) -> list[tuple[int, str, str, int | None]]:
    """Every line start that opens an item: ``(offset, kind, marker, number)``."""
    out = []
    for m in re.finditer(r"(?m)^", text):
        i = m.start()
        line = text[i:]
        n = _NUMBERED.match(line)
        if n:
            out.append((i, "numbered", n.group(0), int(n.group(1))))
            continue
        b = _BULLET.match(line)
        if b:
            out.append((i, "bullet", b.group(0), None))
            continue
        # a titled paragraph opens after a blank line (or at the start of the answer)
        if (i == 0 or text[max(0, i - 2):i] == "\n\n") and _TITLED.match(line):
            out.append((i, "titled", "", None))
    return out


def _runs(starts: list, text: str) -> list[list]:
    """Group item starts into runs of siblings: same kind (same bullet character), numbers 1, 2, 3, ..."""
    runs: list[list] = []
    for s in starts:
        cur = runs[-1] if runs else None
        if cur:
            last = cur[-1]
            same = last[1] == s[1] and (s[1] != "bullet" or last[2] == s[2])
            if same and s[1] == "numbered":
                same = s[3] == last[3] + 1
            if same:
                cur.append(s)
                continue
        if s[1] == "numbered" and s[3] != 1:
            runs.append([])  # a list that does not start at 1 is not a run; keep the slot so it is not joined
            continue
        runs.append([s])
    return [r for r in runs if len(r) >= 2]


def _section(text: str, run: list) -> tuple[int, int, Section] | str:
    """The section a run of starts spans: ``(begin, end, section)``, or the reason it cannot be one."""
    kind = run[0][1]
    contents, seps = [], []
    for (a, _, marker, _), (b, _, _, _) in zip(run, run[1:]):
        chunk = text[a:b]
        body = chunk.rstrip()
        sep = chunk[len(body):]
        if not sep or sep.strip():
            return "items not separated by line breaks"
        seps.append(sep)
        contents.append((marker, body[len(marker):]))
    sep = seps[0]
    if any(s != sep for s in seps):
        return "items separated unevenly"
    if any(sep in c for _, c in contents):
        return "an item spans several paragraphs"
    a, marker = run[-1][0], run[-1][2]
    end = text.find(sep, a)
    end = len(text) if end < 0 else end
    contents.append((marker, text[a + len(marker):end].rstrip()))
    end = a + len(marker) + len(contents[-1][1])
    items = []
    for k, (marker, content) in enumerate(contents):
        tb = split_title(content)
        if tb is None:
            return f"item {k + 1} has no 'Title: text' head"
        items.append(Item(marker, *tb))
    return run[0][0], end, Section(kind, items, sep)


def find_sections(answer: str) -> tuple[list, list[str]]:
    """Split ``answer`` into pieces (plain text and candidate :class:`Section` s, in order). Returns the pieces
    and the reasons some runs of items were not taken as sections (kept as plain text)."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    pieces: list = []
    notes: list[str] = []
    pos = 0
    for run in _runs(_starts(answer), answer):
        if run[0][0] < pos:
            continue
        got = _section(answer, run)
        if isinstance(got, str):
            notes.append(got)
            continue
        a, b, sec = got
        if a > pos:
            pieces.append(answer[pos:a])
        pieces.append(sec)
        pos = b
    if pos < len(answer):
        pieces.append(answer[pos:])
    return pieces, notes
