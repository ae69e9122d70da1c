"""An optional independence judge for the transformation stage: any local causal LM answers a yes/no question
about a section's items (``transform(..., judge=lm_judge(model, tokenizer))``)."""
from __future__ import annotations

import torch

from .structure import Section

QUESTION = ("Here is a question and the items of a list that answers it.\n\nQuestion: {prompt}\n\nItems:\n{items}\n\n"
            "Can each item be written without reading the others (they do not refer to each other or depend on "
            "their order)? Answer yes or no.")


def lm_judge(model, tokenizer, threshold: float = 0.0):
    """A judge ``(prompt, section) -> bool``: True when the model's logit of "yes" beats that of "no" by more than
    ``threshold`` at the start of its answer (chat template when the tokenizer has one)."""
    def first_id(words):
        return [tokenizer.encode(w, add_special_tokens=False)[0] for w in words]

    yes, no = first_id(["yes", "Yes"]), first_id(["no", "No"])

    @torch.no_grad()
    def judge(prompt: str, section: Section) -> bool:
        items = "\n".join(f"- {it.title}:{it.body}" for it in section.items)
        text = QUESTION.format(prompt=prompt, items=items)
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        logits = model(input_ids=ids).logits[0, -1].float()
        return bool(logits[yes].max() - logits[no].max() > threshold)

    return judge
