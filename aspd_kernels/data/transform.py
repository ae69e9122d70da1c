"""ASPD's transformation stage: (prompt, serial answer) pairs -> ASPD-format training examples.

For each answer: find its lists (``structure.py``), refuse the sections whose items depend on each other or on
their order, or that a judge refuses (``rules.py``), build the ASPD-format ids (``aspd_text.py``), check that they
read back to the original text, and keep the answer as a parallel example (at least one section) or a serial one.

    python -m aspd_kernels.data.transform --in .aspd_data/serial.jsonl --out .aspd_data/aspd.jsonl

prints what ASPD reports: the share of answers made parallel, branches per section, and the share of answer tokens
inside branches (and why sections were refused).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

from .aspd_text import AFTER_PARA, answer_ids, data_tokens, read_back, section_style, to_json
from .rules import Judge, check_integrity, check_section, repeats
from .structure import Section, find_sections, render


@dataclass
class Example:
    """One transformed answer. ``pieces``: plain text and accepted sections; ``ids``: its ASPD-format ids (no
    prompt, no EOS); ``branch_tokens``: how many of them are inside branches (their ``<|branch|>``/``<|/branch|>``
    included); ``refused``: why candidate sections were kept serial."""

    id: object
    prompt: str
    text: str
    pieces: list
    ids: list[int]
    branch_tokens: int
    refused: list[str] = field(default_factory=list)
    trimmed: bool = False
    title_markers: bool = False

    @property
    def sections(self) -> list[Section]:
        return [p for p in self.pieces if isinstance(p, Section)]

    @property
    def parallel(self) -> bool:
        return bool(self.sections)

    def to_json(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "text": self.text, "parallel": self.parallel,
                "pieces": to_json(self.pieces), "answer_tokens": len(self.ids), "branch_tokens": self.branch_tokens,
                "branches": [len(s.items) for s in self.sections], "refused": self.refused, "trimmed": self.trimmed,
                "title_markers": self.title_markers}


def _merge(pieces: list) -> list:
    """Join neighbouring plain-text pieces (a refused section becomes text)."""
    out: list = []
    for p in pieces:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] += p
        elif not (isinstance(p, str) and not p):
            out.append(p)
    return out


def trim_unfinished(answer: str) -> str:
    """An answer cut by the token cap, without its last, unfinished line (and the whitespace before it)."""
    cut = answer.rstrip().rfind("\n")
    return answer[:cut].rstrip() if cut > 0 else ""


def cut_repetition(text: str) -> str:
    """``text`` cut before the first list item that repeats an earlier sibling (same title, or a body that
    :func:`~aspd_kernels.data.rules.repeats` an earlier one), when at least two items come before it: greedy
    decoding of a small model often loops, and a looping answer is poor training data, serial or parallel."""
    pieces, _ = find_sections(text)
    offset = 0
    for p in pieces:
        if isinstance(p, Section):
            for k in range(2, len(p.items)):
                it = p.items[k]
                if any(repeats(it.body, q.body) or _norm(it.title) == _norm(q.title) for q in p.items[:k]):
                    return text[:offset + len(p.sep.join(q.text for q in p.items[:k]))]
        offset += len(p if isinstance(p, str) else p.text)
    return text


def _norm(title: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", "", title).lower().split())


def transform(tokenizer, example_id, prompt: str, answer: str, *, finished: bool = True,
              judge: Judge | None = None, tokens=None, min_branches: int = 2,
              title_markers: bool = False) -> Example | None:
    """Transform one (prompt, answer) pair. ``tokenizer`` must hold the six ASPD tokens. ``finished=False``: the
    answer was cut by a token cap, so its last line is dropped first (None when nothing is left). A section with
    fewer than ``min_branches`` items stays plain text. ``title_markers``: each branch's title keeps its list
    marker (``aspd_text.branch_title``).

    Raises ``ValueError`` naming ``example_id`` for a prompt or answer that is not a non-empty string, and if the
    ASPD-format answer fails to read back to the text (a bug, never expected)."""
    where = f"example {example_id!r}"
    for name, value in (("prompt", prompt), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: {name} must be a non-empty string, got {value!r}")
    tokens = tokens if tokens is not None else data_tokens(tokenizer)
    text = answer.strip()
    if not finished:
        text = trim_unfinished(text)
        if not text:
            return None
    cut = cut_repetition(text)
    trimmed = not finished or cut != text
    text = cut
    pieces, refused = find_sections(text)
    kept: list = []
    for i, p in enumerate(pieces):
        if isinstance(p, Section):
            reasons = check_section(prompt, p, judge, min_branches)
            nxt = pieces[i + 1] if i + 1 < len(pieces) else None
            if isinstance(nxt, str) and not nxt.startswith(AFTER_PARA):
                reasons.append("the text after the list does not start on a new line")
            if reasons:
                refused += reasons
                p = p.text
        kept.append(p)
    kept = _merge(kept)
    if render(kept) != text:
        raise ValueError(f"{where}: the pieces do not cover the answer (structure bug)")
    ids = answer_ids(tokenizer, tokens, kept, title_markers)
    styles = [section_style(s, title_markers) for s in kept if isinstance(s, Section)]
    check_integrity(text, read_back(tokenizer, tokens, ids, styles), where)
    from ..layout import BranchLayout

    n_branch = int((BranchLayout.from_aspd_tokens(ids, tokens).branch > 0).sum()) if styles else 0
    return Example(example_id, prompt, text, kept, ids, n_branch, refused, trimmed=trimmed,
                   title_markers=title_markers)


def report(examples: list[Example]) -> dict:
    """ASPD's data figures over ``examples``."""
    sections = [s for e in examples for s in e.sections]
    n_tok = sum(len(e.ids) for e in examples)
    reasons = Counter(re.sub(r"\d+", "N", r.split(":")[0]) for e in examples for r in e.refused)
    return {
        "answers": len(examples),
        "parallel_answers": sum(e.parallel for e in examples),
        "parallel_share": sum(e.parallel for e in examples) / max(1, len(examples)),
        "sections": len(sections),
        "branches_per_section": sum(len(s.items) for s in sections) / max(1, len(sections)),
        "answer_tokens": n_tok,
        "branch_token_share": sum(e.branch_tokens for e in examples) / max(1, n_tok),
        "trimmed": sum(e.trimmed for e in examples),
        "refusals": dict(reasons.most_common(12)),
    }


def format_report(r: dict) -> str:
    lines = ["| figure | value |", "|---|---|",
             f"| answers | {r['answers']} |",
             f"| made parallel | {r['parallel_answers']} ({100 * r['parallel_share']:.1f}%) |",
             f"| parallel sections | {r['sections']} |",
             f"| branches per section | {r['branches_per_section']:.2f} |",
             f"| answer tokens inside branches | {100 * r['branch_token_share']:.1f}% of {r['answer_tokens']} |",
             f"| answers cut (token cap: last line dropped; a looping list: cut before the repeat) | "
             f"{r['trimmed']} |"]
    lines += [f"| refused: {k} | {v} |" for k, v in r["refusals"].items()]
    return "\n".join(lines)


def load_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aspd_kernels.data.transform", description=__doc__.split("\n\n")[0])
    p.add_argument("--in", dest="src", default=".aspd_data/serial.jsonl")
    p.add_argument("--out", default=".aspd_data/aspd.jsonl")
    p.add_argument("--model", default="smollm2", help="its tokenizer (the six tokens are added)")
    p.add_argument("--min-branches", type=int, default=2, help="a list with fewer items stays plain text")
    p.add_argument("--title-markers", action="store_true",
                   help="branch titles keep their list marker ('2. Title'): the title list reads as an outline")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from ..hf.tokens import add_aspd_tokens
    from ..models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    add_aspd_tokens(tok)
    out = []
    for row in load_jsonl(args.src):
        ex = transform(tok, row.get("id"), row.get("prompt"), row.get("answer"), finished=row.get("finished", True),
                       min_branches=args.min_branches, title_markers=args.title_markers)
        if ex is not None:
            out.append(ex)
    with open(args.out, "w") as f:
        for ex in out:
            f.write(json.dumps(ex.to_json()) + "\n")
    print(format_report(report(out)))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
