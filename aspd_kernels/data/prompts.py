"""The prompt set of the real-model ASPD pipeline: templates x topics of our own making (no public benchmark's
questions), many inviting lists, some not, with a fixed held-out split the training never sees.

``build_prompts()`` is deterministic; ``prompts.jsonl`` beside this file is its committed output (one JSON object
a line: ``id``, ``prompt``, ``list`` (bool: the template invites a list), ``split`` ("train" or "heldout")).
``python -m aspd_kernels.data.prompts`` rewrites it and prints the counts.
"""
from __future__ import annotations

import json
import os
import random
from typing import Iterable

PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.jsonl")

# (template, invites a list). {n} is filled with 3..5, {x} with a topic phrase.
TEMPLATES: tuple[tuple[str, bool], ...] = (
    ("Give {n} tips for {x}.", True),
    ("List {n} ways to get better at {x}.", True),
    ("What are {n} reasons to start {x}?", True),
    ("Give me {n} common mistakes people make when {x}.", True),
    ("List {n} benefits of {x}.", True),
    ("Suggest {n} ideas to make {x} more fun.", True),
    ("Name {n} things a beginner should know about {x}.", True),
    ("What are {n} simple ways to save money on {x}?", True),
    ("Give {n} pieces of advice for someone who wants to try {x}.", True),
    ("List {n} tools or items that help with {x}.", True),
    ("What are {n} questions to ask yourself before {x}?", True),
    ("Give {n} ways to stay motivated while {x}.", True),
    ("List the main pros and cons of {x}.", True),
    ("Give some tips for {x}.", True),
    ("What are the most important things to know about {x}?", True),
    ("Describe in one paragraph why people enjoy {x}.", False),
    ("Write a short story about a person who loves {x}.", False),
    ("In two sentences, what is {x}?", False),
    ("Write a haiku about {x}.", False),
    ("Explain to a child what {x} means.", False),
    ("Write a short, friendly message inviting a friend to try {x}.", False),
    ("Is {x} hard to learn? Answer briefly.", False),
)

# topic phrases that read after "for", "of", "about", "when", "start" ... (gerunds and activities)
TOPICS: tuple[str, ...] = (
    "gardening", "cooking at home", "running", "learning a new language", "saving money", "studying for exams",
    "traveling on a budget", "public speaking", "writing a resume", "baking bread", "cycling to work",
    "keeping a journal", "learning to swim", "playing chess", "camping", "hiking in the mountains",
    "painting with watercolors", "taking photos", "learning the guitar", "working from home", "meal planning",
    "reading more books", "drinking more water", "sleeping better", "meditating", "doing yoga",
    "decluttering a home", "raising a puppy", "caring for a cat", "growing tomatoes", "starting a small business",
    "job interviews", "learning to code", "making new friends", "moving to a new city", "planning a wedding",
    "hosting a dinner party", "teaching kids to read", "volunteering", "recycling", "composting",
    "birdwatching", "fishing", "knitting", "woodworking", "learning to draw", "writing poetry", "running a blog",
    "managing stress", "time management", "cleaning the kitchen", "organizing a closet", "packing for a trip",
    "driving in the snow", "riding a motorcycle", "learning to dance", "playing basketball", "playing soccer",
    "rock climbing", "skiing", "surfing", "ice skating", "building a budget", "buying a used car",
    "renting an apartment", "making coffee", "brewing tea", "eating healthy", "lifting weights", "stretching",
    "taking care of houseplants", "learning history", "visiting museums", "writing letters", "making pizza",
    "shopping for groceries", "cooking rice", "making soup", "learning math", "doing homework",
    "starting a podcast", "making a video", "staying safe online", "choosing a laptop", "saving energy at home",
)


def build_prompts(heldout: int = 132, seed: int = 20) -> list[dict]:
    """Every template x topic pair with ``{n}`` drawn from 3..5, shuffled with ``seed``; the first ``heldout``
    of them (half list-inviting, half not where possible) form the held-out split. Returns dicts with ``id``,
    ``prompt``, ``list``, ``split``."""
    rng = random.Random(seed)
    rows = []
    for ti, (tmpl, is_list) in enumerate(TEMPLATES):
        for xi, topic in enumerate(TOPICS):
            rows.append({"prompt": tmpl.format(n=rng.choice((3, 4, 5)), x=topic), "list": is_list,
                         "key": (ti, xi)})
    rng.shuffle(rows)
    want_list, want_other = heldout * 2 // 3, heldout - heldout * 2 // 3
    for r in rows:
        if r["list"] and want_list > 0:
            r["split"], want_list = "heldout", want_list - 1
        elif not r["list"] and want_other > 0:
            r["split"], want_other = "heldout", want_other - 1
        else:
            r["split"] = "train"
    out = []
    for i, r in enumerate(sorted(rows, key=lambda r: (r["split"] != "heldout", rows.index(r)))):
        out.append({"id": i, "prompt": r["prompt"], "list": r["list"], "split": r["split"]})
    return out


def write_prompts(rows: Iterable[dict], path: str = PROMPTS_FILE) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def load_prompts(split: str | None = None, path: str = PROMPTS_FILE) -> list[dict]:
    """The committed prompt set (``split``: "train", "heldout" or None for both), in id order."""
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be 'train', 'heldout' or None, got {split!r}")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


if __name__ == "__main__":
    rows = build_prompts()
    write_prompts(rows)
    n_h = sum(r["split"] == "heldout" for r in rows)
    print(f"{len(rows)} prompts ({len(rows) - n_h} train, {n_h} held out; "
          f"{sum(r['list'] for r in rows)} invite lists) -> {PROMPTS_FILE}")
