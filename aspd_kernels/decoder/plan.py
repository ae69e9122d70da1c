"""Plan mode (``generate_plan``): Yu et al.'s training-free parallel decoding for any instruct model, with no
re-prefill. Stage 1: the model writes a plan, a list in a :class:`PlanFormat` kept in form by :class:`PlanGrammar`.
Stage 2: every item becomes a branch (its prompt ``item_open + title + title_end``), all decoded in parallel in
one sequence. Stage 3: the conclusion, decoded serially over the branches' KV already in the cache, under the
branch mask and the remapped positions. Yu's engine re-prefills the branches with a causal mask for stage 3
(the branches then see each other and the decoded KV is thrown away); here nothing is fed twice."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .branches import BranchesMode
from .driver import LogitsProcessor, Program, positive, stop_set
from .plan_format import PlanFormat, PlanGrammar
from .request import Request
from .result import DecodeResult
from .sampling import SamplingParams


class PlanMode(BranchesMode):
    @torch.inference_mode()
    def generate_plan(
        self,
        prompt_ids: Sequence[int] | Tensor,
        plan: PlanFormat,
        max_plan_tokens: int = 256,
        max_branch_tokens: int = 256,
        max_conclusion_tokens: int = 256,
        eos_token_id: int | Sequence[int] | None = None,
        position_strategy: str = "same-sequential",
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        *,
        width: int | None = None,
        logits_processor: LogitsProcessor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> DecodeResult:
        """Plan, branches, conclusion in one sequence (see the module docstring and ``docs/decoder.md``).

        prompt_ids: ints or an int tensor, the prompt (with the format's instruction, e.g. ``YU_INSTRUCTION``;
            a prompt that ends with ``plan.item_open`` starts the plan at once).
        Stage 1 samples up to ``max_plan_tokens`` serial tokens under :class:`PlanGrammar`. If the plan is not
        complete by then, or the model ends (EOS) before writing one, the answer is serial: ``result.plan_found`` is
        False, ``result.branches`` is empty and ``result.plan`` holds the tokens. Else every item is a branch of up to ``max_branch_tokens``
        sampled tokens, ended by EOS or a ``plan.branch_stop`` token (both dropped) or the limit, then
        ``plan.branch_close`` is placed; ``plan.conclusion`` (serial) is fed with the branches' last tokens, and
        up to ``max_conclusion_tokens`` tokens are decoded (``plan.conclusion`` must then be non-empty).

        Forward passes: ``len(plan) + 1 + R + max(0, len(suffix) - 1)``, ``R`` the most tokens any branch sampled
        (its dropped stop token included). ``result.plan``: stage 1's tokens; ``result.branches``: ``[[branch
        tokens after the prompt, branch_close included] per item]``; ``result.suffix``: the conclusion.
        ``width`` (fixed-length only): default ``max_branch_tokens + len(branch_close) + longest prompt``.
        Slots: ``ValueError`` before decoding when ``len(prompt_ids) + max_plan_tokens`` exceeds ``max_seq_len``;
        once the plan is known, the branches' limit is lowered so that every branch, the conclusion and its
        ``max_conclusion_tokens`` fit (``result.stop_reason == "max_seq_len"`` when that cut a branch); a plan with
        no room for its branches ends the answer there (``branches == []``, same reason).
        """
        return self.generate_plan_batch([prompt_ids], plan, max_plan_tokens, max_branch_tokens,
                                        max_conclusion_tokens, eos_token_id, position_strategy, temperature, top_k,
                                        top_p, seed, width=width, logits_processor=logits_processor,
                                        progress=progress)[0]

    @torch.inference_mode()
    def generate_plan_batch(
        self,
        prompt_ids: Sequence[Sequence[int] | Tensor],
        plan: PlanFormat,
        max_plan_tokens: int = 256,
        max_branch_tokens: int = 256,
        max_conclusion_tokens: int = 256,
        eos_token_id: int | Sequence[int] | None = None,
        position_strategy: str = "same-sequential",
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        *,
        width: int | None = None,
        logits_processor: LogitsProcessor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[DecodeResult]:
        """:meth:`generate_plan` for several prompts at once, each in its own cache row, all advanced by shared
        forward passes (one request may write its plan while another decodes its branches)."""
        positive("max_plan_tokens", max_plan_tokens)
        positive("max_branch_tokens", max_branch_tokens)
        if max_conclusion_tokens < 0:
            raise ValueError(f"max_conclusion_tokens must be >= 0, got {max_conclusion_tokens}")
        if not isinstance(plan, PlanFormat):
            raise TypeError(f"plan must be a PlanFormat, got {type(plan).__name__}")
        bad = [t for t in plan.ids() if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"plan holds token ids outside [0, {self.vocab_size}): {bad[:5]}")
        if max_conclusion_tokens and not plan.conclusion:
            raise ValueError("max_conclusion_tokens > 0 needs plan.conclusion: the first token of the conclusion is "
                             "predicted from a serial token that sees every branch")
        params = SamplingParams(temperature, top_k, top_p, seed)
        prompts = self._prompts("prompt_ids", prompt_ids)
        for i, p in enumerate(prompts):
            if len(p) + max_plan_tokens > self.max_seq_len:
                tag = "prompt_ids" if len(prompts) == 1 else f"prompt_ids[{i}]"
                raise ValueError(f"{tag} ({len(p)} tokens) + max_plan_tokens ({max_plan_tokens}) exceed "
                                 f"max_seq_len={self.max_seq_len}")
        stop, gen = stop_set(eos_token_id), params.generator(self.device)
        limits = (max_plan_tokens, max_branch_tokens, max_conclusion_tokens)
        reqs = self._requests(len(prompts), position_strategy)
        return self._drive([(r, self._plan_program(r, p, plan, limits, stop, params, gen, logits_processor,
                                                   progress, width)) for r, p in zip(reqs, prompts)])

    def _plan_program(self, req: Request, prompt: list[int], fmt: PlanFormat, limits: tuple[int, int, int],
                      stop: set[int], params: SamplingParams, gen, processor, progress,
                      width: int | None) -> Program:
        max_plan, max_branch, max_conclusion = limits
        for t in prompt:
            last = req.place(t)
        logits = yield [last]
        req.t1 = self._sync()
        grammar = PlanGrammar(fmt, stop, self.vocab_size, self.device, prompt)
        written: list[int] = []
        # stage 1: the plan, serial, under the grammar
        while True:
            t = self._sample(req, logits, [last], params, gen, grammar.bias(), processor)[0]
            written.append(t)
            last = req.place(t, sampled=True)
            grammar.feed(t)
            if progress is not None:
                progress(1)
            if grammar.complete or t in stop or len(written) == max_plan:
                if not grammar.complete:
                    req.end("eos" if t in stop else "max_new_tokens")
                break
            logits = yield [last]
        prompts = [[*fmt.item_open, *title, end] for title, end in grammar.items] if grammar.complete else []
        # the slots the branches may take: what is left after their prompts, closes and the conclusion
        room = req.room() - sum(map(len, prompts)) - len(prompts) * len(fmt.branch_close) - len(fmt.conclusion) \
            - max_conclusion
        if grammar.complete and room < len(prompts):
            req.end("max_seq_len")
        if not grammar.complete or room < len(prompts):  # no plan (or no room for it): the answer is serial
            return req.result([], written, self._sync(), plan=written, mode="plan", plan_found=grammar.complete)
        # stage 2: one branch per item, prompts fed with the plan's last token
        need = max_branch + len(fmt.branch_close) + max(map(len, prompts))
        w = self._width(width, need, "max_branch_tokens + len(branch_close) + longest item prompt",
                        req.counter.strategy == "fixed-length")
        rows = self._open_branches(req, prompts, w)
        logits = yield rows
        fit = min(max_branch, room // len(prompts))
        branches = yield from self._branch_loop(req, logits, rows, fit, stop | set(fmt.branch_stop), set(),
                                                fmt.branch_close, params, gen, None, processor, None, progress,
                                                eos=stop, limit_reason="max_new_tokens" if fit == max_branch
                                                else "max_seq_len")
        # stage 3: the conclusion reads the branches where they are, in the cache
        req.close_section()
        for t in fmt.conclusion:
            last = req.place(t)
        conclusion: list[int] = []
        if max_conclusion or req.fed < len(req.tokens):
            logits = yield ([last] if max_conclusion else [])
            conclusion = yield from self._serial_steps(req, logits, last, max_conclusion, stop, params, gen,
                                                       processor, progress)
        return req.result([branches], conclusion, self._sync(), plan=written, mode="plan", plan_found=True)
