"""Pieces (plain text and sections) to ASPD-format token ids, and ASPD-format ids read back to plain text.

The ids are built piece by piece, exactly as the model-driven decoder feeds them: a branch is ``<|branch|>`` +
the title's ids + ``tokens.title_sep`` (``":"``) + the body's ids + ``<|/branch|>``; a section closes with
``<|/para|>`` + ``tokens.after_para`` (``"\\n"``), and the text after it continues without that line break. So
training data and decoding agree token for token at every forced boundary.
"""
from __future__ import annotations

from typing import Sequence

from ..layout import BranchLayout
from ..tokens import AspdTokens
from .structure import Item, Section, starts_with_marker

TITLE_SEP, AFTER_PARA = ":", "\n"


def data_tokens(tokenizer) -> AspdTokens:
    """The six tokens of ``tokenizer`` (it must have them: ``aspd_kernels.hf.add_aspd_tokens``) with the forced
    text this pipeline uses: ``":"`` after a branch's title (the body's ids then start with their own space, as
    the tokenizer writes ``"Title: body"``) and ``"\\n"`` after ``<|/para|>``."""
    return AspdTokens.from_tokenizer(tokenizer, title_sep=TITLE_SEP, after_para=AFTER_PARA)


def _enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _dec(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), clean_up_tokenization_spaces=False) if ids else ""


def branch_title(it: Item, title_markers: bool = False) -> str:
    """What a branch's title holds: the item's title, or with ``title_markers`` its list marker too
    (``"2. Yoga blocks"``), so that the title list reads as a numbered outline and a branch opens on the very
    words a serial list item opens on."""
    return it.marker + it.title if title_markers else it.title


def answer_ids(tokenizer, tokens: AspdTokens, pieces: list, title_markers: bool = False) -> list[int]:
    """The ASPD-format ids of an answer given as pieces (``str`` and :class:`Section`); ``title_markers``: see
    :func:`branch_title`. The text right after a section must start with ``"\\n"`` (the forced ``after_para``);
    ``ValueError`` otherwise."""
    out: list[int] = []
    after_section = False
    for i, p in enumerate(pieces):
        if isinstance(p, str):
            if after_section:
                if not p.startswith(AFTER_PARA):
                    raise ValueError(f"pieces[{i}]: text after a section must start with {AFTER_PARA!r}")
                p = p[len(AFTER_PARA):]
            out += _enc(tokenizer, p)
            after_section = False
            continue
        if not isinstance(p, Section) or len(p.items) < 2:
            raise ValueError(f"pieces[{i}]: expected text or a Section of at least 2 items, got {p!r}")
        titles = [_enc(tokenizer, branch_title(it, title_markers)) for it in p.items]
        for t in titles:
            out += [tokens.title, *t, tokens.title_end]
        out.append(tokens.para)
        for it, t in zip(p.items, titles):
            out += [tokens.branch, *t, *tokens.title_sep, *_enc(tokenizer, it.body), tokens.branch_end]
        out += [tokens.para_end, *tokens.after_para]
        after_section = True
    return out


def default_style(n: int) -> tuple[list[str], str]:
    """How a decoded section is written out as text: ``"1. "``, ``"2. "``, ... and a blank line between items
    (the base model's own list style). A branch that opens on its own list marker (its title holds it,
    :func:`branch_title`) is written as it is (:func:`read_back`)."""
    return [f"{k}. " for k in range(1, n + 1)], "\n\n"


def read_back(tokenizer, tokens: AspdTokens, ids: Sequence[int],
              styles: Sequence[tuple[list[str], str]] | None = None) -> str:
    """Plain text of ASPD-format ``ids`` in reading order (branches contiguous: training data, or a decoded
    sequence sorted with ``aspd_kernels.hf.to_reading_order``): serial text without its ``<|title|>`` spans, each
    section's branches written as list items (``styles[i] = (markers, sep)`` for section ``i``, default
    :func:`default_style`), the special tokens dropped. Parses with ``BranchLayout.from_aspd_tokens`` first, so
    malformed ids raise its ``ValueError``."""
    ids = [int(t) for t in ids]
    lay = BranchLayout.from_aspd_tokens(ids, tokens)
    seg, br = lay.segment.tolist(), lay.branch.tolist()
    special = set(tokens.as_tuple())
    text: list[str] = []
    serial: list[int] = []
    branches: dict[int, list[int]] = {}
    in_title = False
    n_sec = 0

    def flush_section() -> None:
        nonlocal n_sec
        if not branches:
            return
        bodies = [_dec(tokenizer, branches[j]) for j in sorted(branches)]
        if styles is not None and n_sec < len(styles):
            markers, sep = styles[n_sec]
            markers = list(markers) + default_style(len(bodies))[0][len(markers):]
        else:
            markers, sep = default_style(len(bodies))
            markers = ["" if starts_with_marker(b) else m for m, b in zip(markers, bodies)]
        text.append(sep.join(m + b for m, b in zip(markers, bodies)))
        branches.clear()
        n_sec += 1

    for k, t in enumerate(ids):
        if br[k] > 0:
            if serial:
                text.append(_dec(tokenizer, serial))
                serial = []
            if k > 0 and br[k - 1] == 0 and seg[k - 1] != seg[k]:
                flush_section()  # a new section straight after another one's serial text
            if t not in special:
                branches.setdefault(br[k], []).append(t)
            else:
                branches.setdefault(br[k], [])
            continue
        if branches:
            flush_section()
        if t == tokens.title:
            in_title = True
        elif t == tokens.title_end:
            in_title = False
        elif t not in special and not in_title:
            serial.append(t)
    flush_section()
    if serial:
        text.append(_dec(tokenizer, serial))
    return "".join(text)


def section_style(sec: Section, title_markers: bool = False) -> tuple[list[str], str]:
    return ["" if title_markers else it.marker for it in sec.items], sec.sep


def to_json(pieces: list) -> list[dict]:
    return [{"text": p} if isinstance(p, str) else
            {"kind": p.kind, "sep": p.sep, "items": [[it.marker, it.title, it.body] for it in p.items]}
            for p in pieces]


def from_json(rows: list[dict]) -> list:
    return [r["text"] if "text" in r else Section(r["kind"], [Item(*it) for it in r["items"]], r["sep"])
            for r in rows]
