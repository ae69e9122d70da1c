"""What :class:`~aspd_kernels.vllm.engine.VllmDecoder` sends to vLLM: a *run* is one vLLM request over some slots
of a decoder request (their tokens, with their segment, branch and rotary position as the layout), sampled,
stopped and seeded by vLLM; a *job* is the runs a program needs at once (one per branch of a section, or the one
serial run after it); :class:`Lazy` stands for the logits of rows the decoder asked for, computed only if a program
really samples from them on the host (the fallback path), all rows of a round together.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..decoder.request import Request
from ..decoder.sampling import SamplingParams
from .layout import encode


@dataclass
class Run:
    """One vLLM request over ``slots`` of ``req`` (in that order), up to ``max_tokens`` sampled tokens, stopped
    after a token in ``stop`` (kept in the output); ``extra``: more ``extra_args`` (the grammar rule). With
    ``plain`` (token ids) instead of a request: those tokens as plain text, no layout."""

    req: Request | None
    slots: list[int]
    max_tokens: int
    stop: set[int]
    extra: dict = field(default_factory=dict)
    seed_key: int = 0
    plain: list[int] | None = None
    min_tokens: int = 0

    def prompt(self) -> tuple[list[int], dict[str, Any]]:
        if self.plain is not None:
            return list(self.plain), dict(self.extra)
        r, s = self.req, self.slots
        extra = encode([r.seg[k] for k in s], [r.br[k] for k in s], [r.pos[k] for k in s])
        return [r.tokens[k] for k in s], {**extra, **self.extra}


@dataclass
class Job:
    """Runs a program yields to the driver, sampled under ``params``; it receives their sampled tokens, one list
    per run."""

    runs: list[Run]
    params: SamplingParams


def vllm_params(p: SamplingParams, run: Run, extra: dict, logprobs: int | None = None):
    """vLLM's ``SamplingParams`` for ``run`` under the decoder's sampling ``p``. The seed of a seeded run is
    derived from ``p.seed`` and the run's own key, so a call repeats itself and no two runs share a stream."""
    from vllm import SamplingParams as VP
    from vllm.sampling_params import RequestOutputKind

    seed = None if p.seed is None else (p.seed * 1_000_003 + run.seed_key) % (1 << 62)
    return VP(max_tokens=run.max_tokens, min_tokens=run.min_tokens, temperature=p.temperature, top_k=p.top_k or 0,
              top_p=1.0 if p.top_p is None else p.top_p, seed=seed, stop_token_ids=sorted(run.stop),
              ignore_eos=True, detokenize=False, skip_special_tokens=False, logprobs=logprobs,
              output_kind=RequestOutputKind.FINAL_ONLY, extra_args=extra)


@dataclass
class Counters:
    """What the engine reports per request, summed: requests, prompt tokens, prompt tokens served from the prefix
    cache (``RequestOutput.num_cached_tokens``), sampled tokens. Tokens the engine computed = ``prompt_tokens -
    cached_tokens + sampled_tokens - requests`` (each request's last sampled token is never fed)."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    sampled_tokens: int = 0

    def add(self, final, prompt_len: int, sampled: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_len
        self.cached_tokens += int(final.num_cached_tokens or 0)
        self.sampled_tokens += sampled

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens + self.sampled_tokens - self.requests


class Round:
    """The row asks of one driver round. ``compute(asks)`` returns each ask's logits (the engine's per-row
    log-probs); it runs once, for every ask no program claimed, when the first :class:`Lazy` is read."""

    def __init__(self, asks: list[tuple[Request, list[int]]],
                 compute: Callable[[list[tuple[Request, list[int]]]], list[Tensor | None]]) -> None:
        self.asks, self.compute = asks, compute
        self.claimed: set[int] = set()
        self.out: dict[int, Tensor | None] | None = None

    def get(self, i: int) -> Tensor:
        if i in self.claimed:
            raise RuntimeError("these logits were claimed by an engine-sampled run")
        if self.out is None:
            todo = [k for k in range(len(self.asks)) if k not in self.claimed]
            self.out = dict(zip(todo, self.compute([self.asks[k] for k in todo])))
        return self.out[i]


class Lazy:
    """The logits ``[len(rows), V]`` of one ask of a :class:`Round`: :meth:`tensor` computes them (with the rest
    of the round); :meth:`claim` says a run will sample these rows inside the engine instead."""

    def __init__(self, round_: Round, i: int) -> None:
        self.round, self.i = round_, i

    def tensor(self) -> Tensor:
        return self.round.get(self.i)

    def claim(self) -> None:
        self.round.claimed.add(self.i)


def visible(req: Request, r: int) -> list[int]:
    """The slots slot ``r`` of ``req`` sees (SPEC section 2), in storage order, itself included: all a request
    for its row needs (the branch mask would hide the rest)."""
    s, b = req.seg[r], req.br[r]
    return [k for k in range(r + 1) if req.seg[k] != s or req.br[k] == b]


class LocalClient:
    """The decoder's engine calls on an in-process ``AsyncLLM`` (``engine``); :class:`.server.HttpClient` is the
    same over HTTP."""

    def __init__(self, engine) -> None:
        self.engine = engine

    async def run(self, run: Run, params: SamplingParams, request_id: str, counters: Counters) -> list[int]:
        """The tokens vLLM samples for ``run`` (a stop token included)."""
        from vllm.inputs import TokensPrompt

        tokens, extra = run.prompt()
        final = None
        sp = vllm_params(params, run, extra)
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=tokens), sp, request_id=request_id):
            final = out
        toks = list(final.outputs[0].token_ids)
        counters.add(final, len(tokens), len(toks))
        return toks

    async def row(self, req: Request, r: int, vocab: int, request_id: str, extra: dict,
                  counters: Counters) -> Tensor:
        """The float32 log-probs ``[V]`` after slot ``r`` of ``req``, every one returned (the host path): a request
        over the slots ``r`` sees, ``max_tokens=1``."""
        from vllm import SamplingParams as VP
        from vllm.inputs import TokensPrompt

        tokens, lay = Run(req, visible(req, r), 1, set()).prompt()
        sp = VP(max_tokens=1, temperature=0.0, logprobs=-1, detokenize=False, extra_args={**extra, **lay})
        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=tokens), sp, request_id=request_id):
            final = out
        counters.add(final, len(tokens), 1)
        lp = final.outputs[0].logprobs[0]
        row = torch.full((vocab,), float("-inf"), dtype=torch.float32)
        row[torch.tensor(list(lp.keys()), dtype=torch.int64)] = torch.tensor([v.logprob for v in lp.values()],
                                                                            dtype=torch.float32)
        return row

    async def close(self) -> None:
        pass


async def gather(coros) -> list:
    return list(await asyncio.gather(*coros))
