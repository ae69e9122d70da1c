"""Model-driven mode (``generate``): an ASPD-trained model opens parallel sections itself with the six tokens of
``AspdTokens``; the engine turns each ``<|title|>T<|/title|>`` into a branch and closes every branch and section."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..tokens import AspdTokens
from .branches import BranchesMode
from .driver import LogitsProcessor, Program, positive, stop_set
from .request import Request
from .result import DecodeResult
from .sampling import MAX_TITLE_TOKENS, Grammar, SamplingParams



def place_answer_token(req: Request, t: int, text: list[int], suffix: list[int], budget: list[int], stop: set[int],
                       progress) -> tuple[int, bool]:
    """Place ``t``, a sampled serial token of a model-driven answer (appended to ``text`` and ``suffix``, one off
    ``budget[0]``); returns its slot and whether the answer ends on it (a ``stop`` token or the budget spent), with
    ``req.stop_reason`` then set. Both engines (this one and the vLLM replay) place serial answer tokens here."""
    budget[0] -= 1
    suffix.append(t)
    text.append(t)
    last = req.place(t, sampled=True)
    if progress is not None:
        progress(1)
    if t in stop or budget[0] <= 0:
        req.end("eos" if t in stop else "max_new_tokens")
        return last, True
    return last, False

class AspdMode(BranchesMode):
    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Sequence[int] | Tensor,
        max_new_tokens: int,
        tokens: AspdTokens,
        eos_token_id: int | Sequence[int] | None = None,
        max_branch_tokens: int = 256,
        position_strategy: str = "same-sequential",
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        *,
        width: int | None = None,
        logits_processor: LogitsProcessor | None = None,
        progress: Callable[[int], None] | None = None,
        max_title_tokens: int = MAX_TITLE_TOKENS,
    ) -> DecodeResult:
        """The model-driven engine. Serial decoding until ``<|para|>``; one branch per ``<|title|>T<|/title|>`` of
        the current serial text, prompt ``<|branch|> T`` + ``tokens.title_sep`` (fed with the ``<|para|>`` in one
        forward pass); branches decoded in parallel until each emits ``<|/branch|>``, EOS or
        ``max_branch_tokens``. Every branch ends with ``<|/branch|>``: an EOS inside a branch is taken as one, and
        a branch cut by a limit gets one appended. Then ``<|/para|>`` + ``tokens.after_para`` (serial) are fed
        with the branches' last tokens and serial decoding resumes over the same cache. The six-token grammar is
        enforced (see :class:`~aspd_kernels.decoder.sampling.Grammar`; inside a title no EOS, and after
        ``max_title_tokens`` title tokens only ``<|/title|>``), so the answer, read branch by branch
        (stable sort of the slots by ``(segment, branch)``), parses back through ``BranchLayout.from_aspd_tokens``
        to the decoder's layout.

        ``max_new_tokens`` bounds the sampled tokens (serial and branch), checked after each forward pass.
        ``width`` (fixed-length only): the stride, default ``max_branch_tokens + 1 + longest branch prompt`` per
        section. ``result.branches``: one list per parallel section, each branch's tokens after its prompt (its
        ``<|/branch|>`` included); ``result.suffix``: the tokens sampled after the last section.
        When the sequence runs out of slots, decoding stops there and the result holds what was generated, with
        ``result.stop_reason == "max_seq_len"`` (a branch limit is lowered so that its section still closes).
        """
        return self.generate_batch([prompt_ids], max_new_tokens, tokens, eos_token_id, max_branch_tokens,
                                   position_strategy, temperature, top_k, top_p, seed, width=width,
                                   logits_processor=logits_processor, progress=progress,
                                   max_title_tokens=max_title_tokens)[0]

    @torch.inference_mode()
    def generate_batch(
        self,
        prompt_ids: Sequence[Sequence[int] | Tensor],
        max_new_tokens: int,
        tokens: AspdTokens,
        eos_token_id: int | Sequence[int] | None = None,
        max_branch_tokens: int = 256,
        position_strategy: str = "same-sequential",
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        *,
        width: int | None = None,
        logits_processor: LogitsProcessor | None = None,
        progress: Callable[[int], None] | None = None,
        max_title_tokens: int = MAX_TITLE_TOKENS,
    ) -> list[DecodeResult]:
        """:meth:`generate` for several prompts at once, each in its own cache row: one request may be in a
        parallel section while another decodes serially, all advanced by shared forward passes."""
        positive("max_new_tokens", max_new_tokens)
        positive("max_branch_tokens", max_branch_tokens)
        bad = [t for t in tokens.title_sep + tokens.after_para if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"tokens.title_sep/after_para hold ids outside [0, {self.vocab_size}): {bad[:5]}")
        params = SamplingParams(temperature, top_k, top_p, seed)
        prompts = self._prompts("prompt_ids", prompt_ids)
        stop, gen = stop_set(eos_token_id), params.generator(self.device)
        grammar = Grammar(tokens, self.vocab_size, self.device, stop, max_title_tokens)
        reqs = self._requests(len(prompts), position_strategy)
        return self._drive([(r, self._aspd_program(r, p, max_new_tokens, stop, params, gen, grammar,
                                                   logits_processor, progress, width, max_branch_tokens))
                            for r, p in zip(reqs, prompts)])

    def _aspd_program(self, req: Request, prompt: list[int], max_new_tokens: int, stop: set[int],
                      params: SamplingParams, gen, grammar: Grammar, processor, progress, width: int | None,
                      max_branch_tokens: int) -> Program:
        tk = grammar.tokens
        for t in prompt:
            last = req.place(t)
        logits = yield [last]
        req.t1 = self._sync()
        text = list(prompt)  # the current serial section, where titles are looked for
        sections: list[list[list[int]]] = []
        suffix: list[int] = []
        budget = [max_new_tokens]
        while budget[0] > 0:
            if req.room() < 1:
                req.end("max_seq_len")
                break
            bias = grammar.serial_bias_after(text)
            t = self._sample(req, logits, [last], params, gen, bias, processor)[0]
            last, ended = place_answer_token(req, t, text, suffix, budget, stop, progress)
            if ended:
                break
            if t == tk.para:
                got = yield from self._section(req, text, grammar, max_branch_tokens, width, stop, params, gen,
                                               processor, budget, progress)
                if got is None:  # no room for the section: the answer ends on its <|para|>
                    req.end("max_seq_len")
                    break
                branches, last, logits = got
                sections.append(branches)
                suffix = []
                text = [tk.para_end, *tk.after_para]
                continue
            logits = yield [last]
        return req.result(sections, suffix, self._sync(), mode="aspd")

    def _section(self, req: Request, text: list[int], grammar: Grammar, limit: int, width: int | None,
                 stop: set[int], params, gen, processor, budget: list[int], progress):
        """One parallel section after a sampled ``<|para|>`` (placed, not fed). Returns the branches' tokens and
        the slot and logits of the last serial token placed after the closing ``<|/para|>``; None (nothing placed)
        when the sequence has no room for a section with at least one token per branch. The branches' limit is
        lowered so that the section and its closing text fit in ``max_seq_len``."""
        tk = grammar.tokens
        titles = _titles(text, tk)
        if not titles:
            raise RuntimeError("<|para|> without a title: the grammar should have prevented it")
        prompts = [[tk.branch, *title, *tk.title_sep] for title in titles]
        need = limit + 1 + max(map(len, prompts))  # + 1: the <|/branch|> a cut branch gets
        w = self._width(width, need, "max_branch_tokens + 1 + longest branch prompt",
                        req.counter.strategy == "fixed-length")
        # slots for the branches: what is left after their prompts, a <|/branch|> each and the closing serial text
        room = req.room() - sum(map(len, prompts)) - len(prompts) - 1 - len(tk.after_para)
        if room < len(prompts):
            return None
        fit = min(limit, room // len(prompts))
        rows = self._open_branches(req, prompts, w)
        logits = yield rows  # the <|para|> (serial, placed before) rides along
        end = tk.branch_end
        out = yield from self._branch_loop(req, logits, rows, fit, stop | {end}, {end}, (end,), params, gen,
                                           grammar.branch, processor, budget, progress, eos=stop,
                                           limit_reason="max_new_tokens" if fit == limit else "max_seq_len")
        for t in (tk.para_end, *tk.after_para):
            slot = req.place(t)
        return out, slot, (yield [slot])


def _titles(text: list[int], tk: AspdTokens) -> list[list[int]]:
    """The token spans between each ``<|title|>`` and its ``<|/title|>`` in ``text``."""
    out, cur = [], None
    for t in text:
        if t == tk.title:
            cur = []
        elif t == tk.title_end and cur is not None:
            out.append(cur)
            cur = None
        elif cur is not None:
            cur.append(t)
    return out
