"""The decoder's programs with vLLM sampling: the hooks of ``ParallelDecoder`` that :class:`VllmDecoder` replaces.

The decoder's programs (``aspd_kernels.decoder``) keep each request's sequence on the host in storage order with its
segment, branch and rotary position per slot and, once per step, ask for the logits of some slots. Here:

- a parallel section is one vLLM request per branch (the slots that branch sees: the text before the section and
  its own prompt, with their layout), sampled, stopped (``stop_token_ids``, ``max_tokens``) and seeded by vLLM,
  the ASPD grammar inside the branch applied in vLLM's sampler (:mod:`.grammar`); all branches of all requests of
  a round go to the engine together, and the prefix cache holds the shared prefix once;
- a run of serial text (the prompt's answer, the text after a section, the model-driven mode's serial text up to
  its next ``<|para|>``) is one vLLM request over the whole sequence in storage order with its layout: the prefix
  comes from the cache and, after a section, the branches are prefilled once under the branch mask and the
  remapped positions, exactly as the decoder laid them out;
- the returned tokens are placed where ``ParallelDecoder`` places them (:mod:`.replay`), so results, layouts,
  positions and forward-pass counts are the decoder's;
- the ``sequential`` strategy's sections step in lockstep instead (a branch token's position is its storage slot,
  which depends on how many siblings are still live at each step, which no whole-branch request can know): one
  engine-sampled token per live branch per step.

No log-probs cross the engine boundary on these paths. Where the host must see logits (a caller's
``logits_processor``; the plan mode's plan, under its stateful grammar), the rows are computed as one vLLM request
each over the slots the row sees, with every log-prob returned (``runs.LocalClient.row``): exact, and slow.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ..decoder.aspd import place_answer_token
from ..decoder.engine import ParallelDecoder
from ..decoder.request import Request
from . import grammar as G
from ..decoder.section_step import close_section, place_step
from .replay import place_branches, place_serial
from .runs import Counters, Job, Lazy, Round, Run, gather, visible


def _engine_samples(processor) -> bool:
    return processor is None


def _banned(bias: Tensor | None) -> list[int] | None:
    """The ids a 0/-inf bias ``[V]`` forbids (None: a bias the engine rule cannot express)."""
    if bias is None:
        return []
    if bias.dim() != 1 or not bool(((bias == 0) | (bias == float("-inf"))).all()):
        return None
    return (bias == float("-inf")).nonzero().flatten().tolist()


class EngineSampled(ParallelDecoder):
    """The hooks; the engine client (``self.client``: :class:`.runs.LocalClient` or :class:`.server.HttpClient`),
    its loop and limits come from the subclass."""

    _ids = itertools.count()
    extra_args: dict = {}
    counters: Counters  # the engine's per-request counts, summed (set per instance; replace it to count a call)

    def _extra(self, rule: dict) -> dict:
        return {**self.extra_args, **rule}

    def _room(self, n: int, prompt_len: int) -> int:
        """``n`` sampled tokens, capped where the request would pass vLLM's ``max_model_len`` (= max_seq_len + 1):
        a sequence that outgrows ``max_seq_len`` then raises where the decoder places the token, as the decoder's
        own engine does."""
        return max(1, min(n, self.max_seq_len + 1 - prompt_len))

    # ------------------------------------------------------------------ the driver's forward pass
    def _feed(self, asks: list[tuple[Request, object]]) -> list:
        """One round: every job (engine-sampled runs) of the round goes to the engine together; row asks get a
        :class:`Lazy` (computed only if a program samples them on the host)."""
        if self.client is None:
            raise RuntimeError("the engine is closed")
        out: list = [None] * len(asks)
        jobs = [(i, a[1]) for i, a in enumerate(asks) if isinstance(a[1], Job)]
        rows = [(i, a) for i, a in enumerate(asks) if not isinstance(a[1], Job)]
        rnd = Round([a for _, a in rows], self._rows_now)
        for k, (i, (req, want)) in enumerate(rows):
            out[i] = Lazy(rnd, k) if want else None
            req.fed = len(req.tokens)
            req.forward_passes += 1
        if jobs:
            runs = [r for _, j in jobs for r in j.runs]
            params = [j.params for _, j in jobs for _ in j.runs]
            toks = self._loop.run(gather(self.client.run(r, p, f"aspd-{next(self._ids)}", self.counters)
                                         for r, p in zip(runs, params)), self.timeout)
            k = 0
            for i, j in jobs:
                out[i] = toks[k:k + len(j.runs)]
                k += len(j.runs)
                j.runs[0].req.fed = len(j.runs[0].req.tokens)
        return out

    def _rows_now(self, asks: list[tuple[Request, list[int]]]) -> list[Tensor]:
        """The host path: the float32 log-probs ``[len(rows), V]`` of each ask, one vLLM request per row."""
        flat = [(req, r) for req, rows in asks for r in rows]
        got = self._loop.run(gather(self.client.row(req, r, self.vocab_size, f"row-{next(self._ids)}",
                                                    self.extra_args, self.counters)
                                    for req, r in flat), self.timeout)
        outs, k = [], 0
        for _, rows in asks:
            outs.append(torch.stack(got[k:k + len(rows)]))
            k += len(rows)
        return outs

    def _sample(self, req, logits, rows, params, gen, bias, processor) -> list[int]:
        if isinstance(logits, Lazy):
            logits = logits.tensor()
        return super()._sample(req, logits, rows, params, gen, bias, processor)

    # ------------------------------------------------------------------ a parallel section
    def _branch_loop(self, req: Request, logits, rows: list[int], limit: int, stop: set[int], keep: set[int],
                     close, params, gen, bias, processor, budget, progress, *, ends=None, eos=None,
                     limit_reason: str = "max_new_tokens"):
        ban = _banned(bias)
        # a caller's stop rule (stop strings, per-branch stop ids) is judged on the host after every token: the
        # exact per-row path, as for a caller's logits processor
        if not _engine_samples(processor) or ban is None or ends is not None:
            return (yield from super()._branch_loop(req, logits, rows, limit, stop, keep, close, params, gen, bias,
                                                    processor, budget, progress, ends=ends, eos=eos,
                                                    limit_reason=limit_reason))
        if isinstance(logits, Lazy):
            logits.claim()
        extra = self._extra(G.ban(ban) if ban else {})
        if req.counter.strategy == "sequential":
            return (yield from self._stepwise(req, rows, limit, stop, keep, close, params, extra, budget, progress,
                                              eos, limit_reason))
        cap = limit if budget is None else max(1, min(limit, budget[0]))
        runs = []
        for j, last in enumerate(rows, start=1):
            slots = visible(req, last)
            runs.append(Run(req, slots, self._room(cap, len(slots)), set(stop), extra,
                            seed_key=(req.row * 1_000_003 + last) * 64 + j))
        outs = yield Job(runs, params)
        return place_branches(req, outs, limit, stop, keep, close, budget, progress, eos, limit_reason)

    def _stepwise(self, req: Request, rows: list[int], limit: int, stop: set[int], keep: set[int], close, params,
                  extra: dict, budget, progress, eos: set[int] | None = None, limit_reason: str = "max_new_tokens"):
        """The ``sequential`` strategy's section: a branch token's position is its storage slot, which depends on
        the siblings still live at each step, so the branches advance in lockstep, one engine-sampled token per
        live branch per step (a request over the slots it sees), placed as the decoder places them."""
        out: list[list[int]] = [[] for _ in rows]
        live = list(range(1, len(rows) + 1))
        reasons: set[str] = set()
        while True:
            runs = [Run(req, visible(req, r), 1, set(), extra, seed_key=(req.row * 1_000_003 + r) * 64 + j)
                    for j, r in zip(live, rows)]
            toks = [t[0] for t in (yield Job(runs, params))]
            still = place_step(req, out, live, toks, limit, stop, keep, budget, reasons, eos, limit_reason)
            if progress is not None:
                progress(len(toks))
            if not still:
                break
            req.forward_passes += 1
            rows = [slot for _, slot in still]
            live = [j for j, _ in still]
        return close_section(req, out, keep, close, reasons)

    # ------------------------------------------------------------------ serial text
    def _serial_steps(self, req: Request, logits, last: int, n: int, stop: set[int], params, gen, processor,
                      progress):
        if not _engine_samples(processor):
            return (yield from super()._serial_steps(req, logits, last, n, stop, params, gen, processor, progress))
        if isinstance(logits, Lazy):
            logits.claim()
        if n == 0:
            return []
        toks = (yield Job([Run(req, list(range(last + 1)), self._room(n, last + 1), set(stop), self._extra({}),
                                   seed_key=req.row * 1_000_003 + last)],
                           params))[0]
        return place_serial(req, toks, n, stop, progress)

    def _aspd_program(self, req: Request, prompt: list[int], max_new_tokens: int, stop: set[int], params, gen,
                      grammar, processor, progress, width, max_branch_tokens):
        """``AspdMode._aspd_program`` with each serial run up to ``<|para|>`` (or a stop, or the budget) as one
        engine-sampled request under the serial grammar."""
        if not _engine_samples(processor):
            return (yield from super()._aspd_program(req, prompt, max_new_tokens, stop, params, gen, grammar,
                                                     processor, progress, width, max_branch_tokens))
        tk = grammar.tokens
        for t in prompt:
            last = req.place(t)
        logits = yield [last]
        req.t1 = self._sync()
        text = list(prompt)
        sections: list[list[list[int]]] = []
        suffix: list[int] = []
        budget = [max_new_tokens]
        while budget[0] > 0:
            if isinstance(logits, Lazy):
                logits.claim()
            run = Run(req, list(range(last + 1)), self._room(budget[0], last + 1), stop | {tk.para},
                      self._extra(G.serial(grammar)),
                      seed_key=req.row * 1_000_003 + last)
            toks = (yield Job([run], params))[0]
            para = False
            for t in toks:
                if req.room() < 1:
                    req.end("max_seq_len")
                    return req.result(sections, suffix, self._sync(), mode="aspd")
                last, ended = place_answer_token(req, t, text, suffix, budget, stop, progress)
                if ended:
                    return req.result(sections, suffix, self._sync(), mode="aspd")
                if t == tk.para:
                    para = True
                    break
                req.forward_passes += 1
            if not para:
                raise RuntimeError("the engine stopped a serial run before its stop rules")
            got = yield from self._section(req, text, grammar, max_branch_tokens, width, stop, params, gen,
                                           processor, budget, progress)
            if got is None:  # no room for the section: the answer ends on its <|para|>, as the decoder's does
                req.end("max_seq_len")
                break
            branches, last, logits = got
            sections.append(branches)
            suffix = []
            text = [tk.para_end, *tk.after_para]
        return req.result(sections, suffix, self._sync(), mode="aspd")
