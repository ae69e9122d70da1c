"""Caller's-branches mode (``generate_branches``): a prefix, branch prompts given by the caller, decoded in parallel
in one sequence, then serial text over the whole section; and the branch loop every parallel mode runs."""
from __future__ import annotations

from typing import Callable, Generator, Sequence

import torch
from torch import Tensor

from .driver import LogitsProcessor, Program, check_ids, positive, stop_set
from .request import Request
from .result import DecodeResult
from .section_step import close_section, place_step
from .sampling import SamplingParams
from .serial import SerialMode
from .stops import StopRule, stop_rule


class BranchesMode(SerialMode):
    @torch.inference_mode()
    def generate_branches(
        self,
        prefix_ids: Sequence[int] | Tensor,
        branch_prompts: Sequence[Sequence[int] | Tensor],
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
        suffix_ids: Sequence[int] | Tensor | None = None,
        max_suffix_tokens: int = 0,
        position_strategy: str = "same-sequential",
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        *,
        stop_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        stop_strings: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        tokenizer=None,
        width: int | None = None,
        logits_processor: LogitsProcessor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> DecodeResult:
        """Prefill ``prefix_ids`` (serial), then all ``branch_prompts`` in one forward pass, then one token per live
        branch per forward pass until each emits ``eos_token_id`` (kept as its last token) or has
        ``max_new_tokens``; then ``suffix_ids`` (serial, fed with the branches' last tokens) and up to
        ``max_suffix_tokens`` serial tokens over it all. Ids are ints or int tensors in ``[0, vocab)``.

        Stop rules per branch (a branch that meets one stops, that token kept as its last; its siblings go on):
        ``stop_token_ids`` (ids) and ``stop_strings`` (text its decoded tokens may not contain; needs
        ``tokenizer``, anything with ``decode(ids) -> str``), each one list for every branch or one list per branch
        (None for none), e.g. ``stop_strings="\\n"`` for one line per branch. A branch with a rule equals decoding
        ``prefix + its prompt`` alone up to the first token that meets it.

        Forward passes: ``[prefix] + 1 + max_j len(branches[j]) + max(0, len(suffix) - 1)``.
        ``width`` (fixed-length only): the stride per branch, default ``max_new_tokens + longest prompt``.
        ``logits_processor(logits [R, V], histories)`` may rewrite the logits; ``histories[r]`` are the tokens row
        r sees. ``progress(n)`` is called after each step with the tokens it sampled.
        """
        return self.generate_branches_batch(
            [prefix_ids], [branch_prompts], max_new_tokens, eos_token_id, None if suffix_ids is None else [suffix_ids],
            max_suffix_tokens, position_strategy, temperature, top_k, top_p, seed, stop_token_ids=stop_token_ids,
            stop_strings=stop_strings, tokenizer=tokenizer, width=width, logits_processor=logits_processor,
            progress=progress)[0]

    @torch.inference_mode()
    def generate_branches_batch(
        self,
        prefix_ids: Sequence[Sequence[int] | Tensor],
        branch_prompts: Sequence[Sequence[Sequence[int] | Tensor]],
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
        suffix_ids: Sequence[Sequence[int] | Tensor | None] | None = None,
        max_suffix_tokens: int = 0,
        position_strategy: str = "same-sequential",
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        *,
        stop_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        stop_strings: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        tokenizer=None,
        width: int | None = None,
        logits_processor: LogitsProcessor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[DecodeResult]:
        """:meth:`generate_branches` for several requests at once (``prefix_ids[i]``, ``branch_prompts[i]``,
        ``suffix_ids[i]``), each in its own cache row with its own layout, all advanced by shared forward passes.
        Greedy results equal the one-request calls'; per-branch stop rules apply to every request."""
        if isinstance(prefix_ids, (str, bytes)) or isinstance(branch_prompts, (str, bytes)):
            raise ValueError("prefix_ids and branch_prompts must be token ids, not text: encode it with the tokenizer "
                             "first")
        n = len(prefix_ids)
        if len(branch_prompts) != n or (suffix_ids is not None and len(suffix_ids) != n):
            raise ValueError("prefix_ids, branch_prompts (and suffix_ids) need one entry per request")
        params = SamplingParams(temperature, top_k, top_p, seed)
        positive("max_new_tokens", max_new_tokens)
        stop = stop_set(eos_token_id)
        gen = params.generator(self.device)
        reqs = self._requests(n, position_strategy)
        programs = []
        for i, req in enumerate(reqs):
            tag = "" if n == 1 else f"[{i}]"
            v = self.vocab_size
            prefix = check_ids(f"prefix_ids{tag}", prefix_ids[i], v)
            if isinstance(branch_prompts[i], (str, bytes, Tensor)) and (not isinstance(branch_prompts[i], Tensor)
                                                                         or branch_prompts[i].dim() != 2):
                raise ValueError(f"branch_prompts{tag} must be a list of token-id lists, one per branch, got "
                                 f"{type(branch_prompts[i]).__name__}")
            prompts = [check_ids(f"branch_prompts{tag}[{j}]", p, v) for j, p in enumerate(branch_prompts[i])]
            s = None if suffix_ids is None else suffix_ids[i]
            suffix_in = check_ids(f"suffix_ids{tag}", s if s is not None else [], v)
            if not prompts or any(len(p) == 0 for p in prompts):
                raise ValueError(f"branch_prompts{tag} must hold at least one branch, each prompt at least one "
                                 "token")
            if max_suffix_tokens and not suffix_in:
                raise ValueError("max_suffix_tokens > 0 needs suffix_ids: the first serial token after the section "
                                 "is predicted from a serial token that sees every branch")
            need = len(prefix) + sum(map(len, prompts)) + len(prompts) * max_new_tokens + len(suffix_in) \
                + max_suffix_tokens
            if need > self.max_seq_len:
                raise ValueError(f"request{tag} may need {need} slots (prefix_ids {len(prefix)} + branch_prompts "
                                 f"{sum(map(len, prompts))} + {len(prompts)} branches x max_new_tokens "
                                 f"{max_new_tokens} + suffix_ids {len(suffix_in)} + max_suffix_tokens "
                                 f"{max_suffix_tokens}), more than max_seq_len={self.max_seq_len}")
            w = self._width(width, max_new_tokens + max(map(len, prompts)), "max_new_tokens + longest prompt")
            rule = stop_rule(stop_token_ids, stop_strings, tokenizer, len(prompts), v)
            programs.append((req, self._branches_program(req, prefix, prompts, max_new_tokens, stop, suffix_in,
                                                         max_suffix_tokens, w, params, gen, logits_processor,
                                                         progress, rule)))
        return self._drive(programs)

    def _branches_program(self, req: Request, prefix: list[int], prompts: list[list[int]], max_new_tokens: int,
                          stop: set[int], suffix_in: list[int], max_suffix_tokens: int, width: int,
                          params: SamplingParams, gen, processor, progress, rule: StopRule | None) -> Program:
        for t in prefix:
            req.place(t)
        if prefix:
            yield []
        rows = self._open_branches(req, prompts, width)
        logits = yield rows
        req.t1 = self._sync()
        branches = yield from self._branch_loop(req, logits, rows, max_new_tokens, stop, stop, (), params, gen,
                                                None, processor, None, progress, ends=rule)
        req.close_section()
        last = None
        for t in suffix_in:
            last = req.place(t)
        logits = yield ([last] if max_suffix_tokens else [])
        suffix = yield from self._serial_steps(req, logits, last, max_suffix_tokens, stop, params, gen, processor,
                                               progress)
        return req.result(branches, suffix, self._sync(), mode="branches")

    @staticmethod
    def _width(width: int | None, need: int, what: str, check: bool = True) -> int:
        """The fixed-length stride: ``width`` if given, else ``need`` (the most slots a branch may take); with
        ``check``, a ``width`` below ``need`` raises ``ValueError`` (only fixed-length positions depend on it)."""
        if width is None:
            return need
        if check and width < need:
            raise ValueError(f"width={width} is below {what} = {need}")
        return width

    @staticmethod
    def _open_branches(req: Request, prompts: list[list[int]], width: int) -> list[int]:
        """Open a parallel section and place each branch prompt (contiguously); the slots of their last tokens."""
        req.open_section(len(prompts), width)
        rows = []
        for j, p in enumerate(prompts, start=1):
            for t in p:
                slot = req.place(t, j)
            rows.append(slot)
        return rows

    def _branch_loop(self, req: Request, logits: Tensor, rows: list[int], limit: int, stop: set[int],
                     keep: set[int], close: Sequence[int], params: SamplingParams, gen, bias: Tensor | None,
                     processor: LogitsProcessor | None, budget: list[int] | None, progress, *,
                     ends: StopRule | None = None, eos: set[int] | None = None,
                     limit_reason: str = "max_new_tokens") -> Generator[list[int], Tensor, list[list[int]]]:
        """Decode the open section's branches from their first logits (those of slots ``rows``) until each stops.

        A branch stops on a token in ``stop``, when ``ends(j, its tokens)`` is true (that token kept), at ``limit``
        sampled tokens, or when ``budget[0]`` (sampled tokens left to the whole request) runs out. A stop token in
        ``keep`` stays as the branch's last token; one not in ``keep`` is dropped (never placed: the branch ends on
        its previous token, already in the cache). Then every branch that does not end on a ``keep`` token gets
        ``close`` appended (not sampled). Returns each branch's tokens after its prompt; the last ones are placed but
        left for the caller's closing forward pass. Sets ``req.stop_reason`` to the most severe of the branches'
        reasons: ``limit_reason`` (the limit; "max_seq_len" when the caller lowered it to fit the slots), then
        "max_new_tokens" (the budget), then "stop" (``ends``, or a ``stop`` token not in ``eos``), then "eos"."""
        out: list[list[int]] = [[] for _ in rows]
        live = list(range(1, len(rows) + 1))
        reasons: set[str] = set()
        while True:
            toks = self._sample(req, logits, rows, params, gen, bias, processor)
            still = place_step(req, out, live, toks, limit, stop, keep, budget, reasons, eos, limit_reason, ends)
            if progress is not None:
                progress(len(toks))
            if not still:
                break
            rows = [slot for _, slot in still]
            live = [j for j, _ in still]
            logits = yield rows
        return close_section(req, out, keep, close, reasons)
