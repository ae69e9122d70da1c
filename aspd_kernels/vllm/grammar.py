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


def serial(tokens: AspdTokens) -> dict:
    """``extra_args`` entry: ASPD's serial-text rule for the six tokens of ``tokens``."""
    t = tokens
    return {SERIAL: [t.branch, t.branch_end, t.title, t.title_end, t.para, t.para_end]}


@lru_cache(maxsize=16)
def _grammar(six: tuple[int, ...], vocab: int, device: str) -> Grammar:
    b, be, ti, te, p, pe = six
    return Grammar(AspdTokens(branch=b, branch_end=be, title=ti, title_end=te, para=p, para_end=pe), vocab,
                   torch.device(device))


def _title_open(ids, title: int, title_end: int) -> tuple[bool, bool]:
    """(found, open): scanning ``ids`` back, is a ``<|title|>`` open (one met before any ``<|/title|>``)?"""
    for t in reversed(ids):
        if t == title_end:
            return True, False
        if t == title:
            return True, True
    return False, False


class AspdGrammar(AdapterLogitsProcessor):
    """Applies the ``extra_args["aspd_grammar"]`` rule of each request that carries one."""

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        extra = params.extra_args or {}
        ban, serial = extra.get(BAN), extra.get(SERIAL)
        if ban is not None and not (isinstance(ban, list) and all(isinstance(t, int) for t in ban)):
            raise ValueError(f"extra_args[{BAN!r}] must be a list of token ids, got {ban!r}")
        if serial is not None and not (isinstance(serial, list) and len(serial) == 6
                                       and all(isinstance(t, int) for t in serial)):
            raise ValueError(f"extra_args[{SERIAL!r}] must be the six ASPD token ids, got {serial!r}")
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
        six = tuple(extra[SERIAL])

        def apply_serial(prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            g = _grammar(six, logits.shape[-1], str(logits.device))
            last = output_ids[-1] if output_ids else (prompt_ids[-1] if prompt_ids else None)
            found, is_open = _title_open(output_ids, six[2], six[3])
            if not found:
                _, is_open = _title_open(prompt_ids, six[2], six[3])
            return logits + g.serial_bias(last, is_open).to(logits.dtype)

        return apply_serial
