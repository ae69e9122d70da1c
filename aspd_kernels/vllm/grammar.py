"""The ASPD grammar inside vLLM's sampler: a V1 logits processor (vLLM's public plugin interface; entry point
``vllm.logits_processors: aspd_grammar``, or ``logits_processors=[FQCN]`` / ``vllm serve --logits-processors
aspd_kernels.vllm.grammar:AspdGrammar``), so that a branch or a run of serial text is one vLLM request sampled by
vLLM itself under the same masks as ``ParallelDecoder``'s :class:`~aspd_kernels.decoder.sampling.Grammar`.

A request opts in through one ``SamplingParams.extra_args`` key (flat int lists, so a server's ``vllm_xargs``
carries them too):

- ``aspd_ban: [ids]``: those ids never (inside a branch: ``<|branch|>``, ``<|title|>``, ``<|/title|>``,
  ``<|para|>``, ``<|/para|>``);
- ``aspd_serial: [branch, branch_end, title, title_end, para, para_end]``: ASPD's serial-text rule, which depends
  on the last token and on whether a title is open, both read from the request's prompt and output so far.

Requests without either key are untouched.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from ..decoder.sampling import Grammar
from ..tokens import AspdTokens

BAN, SERIAL = "aspd_ban", "aspd_serial"
FQCN = "aspd_kernels.vllm.grammar:AspdGrammar"


def installed() -> bool:
    """Whether the package's entry point registers the processor (an installed package; a bare source checkout
    must pass :data:`FQCN` to the engine, which :class:`VllmDecoder` and ``server.serve_args`` do)."""
    from importlib.metadata import entry_points

    return any(e.value.replace(" ", "") == FQCN for e in entry_points(group="vllm.logits_processors"))


def ban(ids) -> dict:
    """``extra_args`` entry: never sample ``ids``."""
    return {BAN: sorted({int(t) for t in ids})}


def serial(grammar: Grammar) -> dict:
    """``extra_args`` entry: ``grammar``'s serial-text rule: the six token ids, ``max_title_tokens``, then the stop
    ids a title may not hold."""
    t = grammar.tokens
    return {SERIAL: [t.branch, t.branch_end, t.title, t.title_end, t.para, t.para_end, grammar.max_title_tokens,
                     *grammar.stop_ids]}


@lru_cache(maxsize=16)
def _grammar(rule: tuple[int, ...], vocab: int, device: str) -> Grammar:
    b, be, ti, te, p, pe, max_title, *stops = rule
    return Grammar(AspdTokens(branch=b, branch_end=be, title=ti, title_end=te, para=p, para_end=pe), vocab,
                   torch.device(device), stops, max_title)


class AspdGrammar(AdapterLogitsProcessor):
    """Applies the ``extra_args["aspd_grammar"]`` rule of each request that carries one."""

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        extra = params.extra_args or {}
        ban, serial = extra.get(BAN), extra.get(SERIAL)
        if ban is not None and not (isinstance(ban, list) and all(isinstance(t, int) for t in ban)):
            raise ValueError(f"extra_args[{BAN!r}] must be a list of token ids, got {ban!r}")
        if serial is not None and not (isinstance(serial, list) and len(serial) >= 7
                                       and all(isinstance(t, int) for t in serial)):
            raise ValueError(f"extra_args[{SERIAL!r}] must be the six ASPD token ids, max_title_tokens and the stop "
                             f"ids, got {serial!r}")
        if ban is not None and serial is not None:
            raise ValueError(f"extra_args: {BAN!r} and {SERIAL!r} are exclusive")

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams):
        extra = params.extra_args or {}
        if extra.get(BAN) is not None:
            ids = torch.tensor(extra[BAN], dtype=torch.long)

            def apply_ban(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
                logits[ids.to(logits.device)] = float("-inf")
                return logits

            return apply_ban
        if extra.get(SERIAL) is None:
            return None
        rule = tuple(extra[SERIAL])

        def apply_serial(prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            g = _grammar(rule, logits.shape[-1], str(logits.device))
            ids = list(prompt_ids) + list(output_ids)
            if not ids:
                return logits + g.serial_bias(None, False).to(logits.dtype)
            return logits + g.serial_bias_after(ids).to(logits.dtype)

        return apply_serial
