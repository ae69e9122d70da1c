"""Offline stand-ins for examples and tests: a byte-level tokenizer and a small ASPD-format dataset."""
from __future__ import annotations

import random

from ..tokens import TOKEN_STRINGS

EOS = "<|endoftext|>"

_TOPICS = {
    "cats": {"Food": "fish and chicken", "Sleep": "sixteen hours a day", "Sound": "a soft purr"},
    "rivers": {"Source": "springs in the hills", "Mouth": "the open sea", "Life": "trout and reeds"},
    "bread": {"Flour": "wheat or rye", "Yeast": "makes the dough rise", "Oven": "hot and dry"},
    "planets": {"Orbit": "an ellipse round the sun", "Size": "from Mercury to Jupiter", "Moons": "none to ninety"},
    "bikes": {"Frame": "steel or carbon", "Gears": "eleven at the back", "Brakes": "discs or rims"},
}


def byte_tokenizer(with_aspd_tokens: bool = True):
    """A fast tokenizer over the 256 bytes (exact round trip for any text), ``<|endoftext|>`` as EOS and padding,
    and the six ASPD tokens when asked. Built in memory: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS)
    if with_aspd_tokens:
        from .tokens import add_aspd_tokens

        add_aspd_tokens(tok)
    return tok


def aspd_answer(topic: str, aspects: list[str]) -> str:
    """ASPD-format answer: intro, titles, one branch per aspect, closing line."""
    facts = _TOPICS[topic]
    titles = "".join(f"<|title|>{a}<|/title|>" for a in aspects)
    branches = "".join(f"<|branch|>{a}: {facts[a]}.<|/branch|>" for a in aspects)
    return f"About {topic}:\n{titles}<|para|>{branches}<|/para|>\nThat is all."


def synthetic_dataset(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (prompt, response) pairs: a question about one of a few topics and an ASPD-format answer over 1-3 of
    its aspects, in random order. Small enough that a tiny model learns it in a few dozen steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choice(sorted(_TOPICS))
        aspects = rng.sample(sorted(_TOPICS[topic]), rng.randint(1, 3))
        out.append((f"Q: tell me about {topic}, {', '.join(aspects).lower()}.\nA: ", aspd_answer(topic, aspects)))
    return out


__all__ = ["EOS", "TOKEN_STRINGS", "aspd_answer", "byte_tokenizer", "synthetic_dataset"]
