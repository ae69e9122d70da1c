"""One training example from an ASPD-format answer: ids, labels, layout and position ids."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..layout import BranchLayout
from ..remap_positions import remap_positions
from ..tokens import AspdTokens

IGNORE_INDEX = -100


def build_example(prompt_ids: Sequence[int] | Tensor, response_ids: Sequence[int] | Tensor, tokens: AspdTokens, *,
                  strategy: str = "same-sequential", width: int | None = None,
                  cross_branch_labels: bool = False) -> dict[str, Tensor]:
    """Turn ``prompt + response`` (response in ASPD's format, branches stored contiguously::

        serial <|title|>T1<|/title|><|title|>T2<|/title|><|para|>
               <|branch|>T1 ...<|/branch|><|branch|>T2 ...<|/branch|><|/para|> serial

    ) into one training example. Returns 1-D tensors of length ``N = len(prompt) + len(response)``:

    - ``input_ids`` int64;
    - ``labels`` int64: the ids, with ``-100`` over the prompt (as ASPD's LlamaFactory collator) and over the first
      token (nothing predicts it, so packed neighbours never leak into the loss);
    - ``segment``, ``branch`` int32 (``BranchLayout.from_aspd_tokens`` over prompt and response);
    - ``position_ids`` int64 (``remap_positions`` with ``strategy``/``width``; ASPD's ``normal`` is the default).

    transformers shifts labels inside the model: slot ``t`` is trained to predict ``labels[t + 1]``. Across a branch
    boundary that pairs tokens that never follow each other while decoding: the end of branch ``j`` "predicts" the
    ``<|branch|>`` of branch ``j + 1``, and the last branch "predicts" the ``<|/para|>`` the engine appends. ASPD's
    collator trains those pairs anyway (``cross_branch_labels=True``); by default their labels are ``-100`` instead.
    """
    prompt = torch.as_tensor(prompt_ids, dtype=torch.int64).reshape(-1)
    response = torch.as_tensor(response_ids, dtype=torch.int64).reshape(-1)
    ids = torch.cat([prompt, response])
    if ids.numel() == 0:
        raise ValueError("build_example: prompt and response are both empty")
    layout = BranchLayout.from_aspd_tokens(ids, tokens)
    segment, branch = layout.segment, layout.branch
    positions = remap_positions(segment, branch, strategy, width=width)

    labels = ids.clone()
    labels[: prompt.numel()] = IGNORE_INDEX
    labels[0] = IGNORE_INDEX
    if not cross_branch_labels and ids.numel() > 1:
        prev_seg, prev_br = segment[:-1], branch[:-1]
        # slot t-1 is a branch token of another run than slot t: t's generation predecessor is not t-1
        foreign = (prev_br > 0) & ((branch[1:] != prev_br) | (segment[1:] != prev_seg))
        labels[1:][foreign] = IGNORE_INDEX
    return {
        "input_ids": ids,
        "labels": labels,
        "segment": segment,
        "branch": branch,
        "position_ids": positions.to(torch.int64),
    }


def encode_example(tokenizer, prompt: str, response: str, tokens: AspdTokens | None = None, *,
                   append_eos: bool = True, **kwargs) -> dict[str, Tensor]:
    """:func:`build_example` from text: both parts tokenised without template tokens, ``eos_token_id`` appended to
    the response when ``append_eos`` and the tokenizer has one. ``tokens`` default: looked up in ``tokenizer``."""
    tokens = tokens if tokens is not None else AspdTokens.from_tokenizer(tokenizer)
    p = tokenizer.encode(prompt, add_special_tokens=False)
    r = tokenizer.encode(response, add_special_tokens=False)
    if append_eos and tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    return build_example(p, r, tokens, **kwargs)
