"""Serial mode: plain autoregressive decoding over the static cache, and the serial steps the other modes end with
(the text after a section)."""
from __future__ import annotations

from typing import Callable, Generator, Sequence

import torch
from torch import Tensor

from .driver import Driver, LogitsProcessor, Program, positive, stop_set
from .request import Request
from .result import DecodeResult
from .sampling import SamplingParams


class SerialMode(Driver):
    @torch.inference_mode()
    def generate_serial(self, prompt_ids: Sequence[int] | Tensor, max_new_tokens: int,
                        eos_token_id: int | Sequence[int] | None = None, temperature: float = 0.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None, *,
                        logits_processor: LogitsProcessor | None = None,
                        progress: Callable[[int], None] | None = None) -> DecodeResult:
        """Plain autoregressive decoding (no sections) of ``prompt_ids`` (ints or int tensor, at least one token):
        the baseline parallel decoding is measured against and the path the identities compare branches with.
        ``result.suffix`` holds the up to ``max_new_tokens`` generated tokens (an ``eos_token_id`` included).
        Forward passes: ``len(suffix)`` (the last token is sampled, never fed). ``ValueError`` before decoding when
        ``len(prompt_ids) + max_new_tokens`` exceeds ``max_seq_len``."""
        positive("max_new_tokens", max_new_tokens)
        params = SamplingParams(temperature, top_k, top_p, seed)
        prompt = self._prompts("prompt_ids", [prompt_ids])[0]
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt_ids ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceed "
                             f"max_seq_len={self.max_seq_len}")
        req = self._requests(1, "same-sequential")[0]
        return self._drive([(req, self._serial_program(req, prompt, max_new_tokens, stop_set(eos_token_id), params,
                                                       params.generator(self.device), logits_processor,
                                                       progress))])[0]

    @torch.inference_mode()
    def generate_serial_batch(self, prompt_ids: Sequence[Sequence[int] | Tensor], max_new_tokens: int,
                              eos_token_id: int | Sequence[int] | None = None, temperature: float = 0.0,
                              top_k: int | None = None, top_p: float | None = None, seed: int | None = None, *,
                              logits_processor: LogitsProcessor | None = None,
                              progress: Callable[[int], None] | None = None) -> list[DecodeResult]:
        """:meth:`generate_serial` for several prompts at once (at most ``max_batch``), each in its own cache row,
        advanced by shared forward passes; a request that ends sits the later rounds out."""
        positive("max_new_tokens", max_new_tokens)
        params = SamplingParams(temperature, top_k, top_p, seed)
        prompts = self._prompts("prompt_ids", prompt_ids)
        stop, gen = stop_set(eos_token_id), params.generator(self.device)
        reqs = self._requests(len(prompts), "same-sequential")
        return self._drive([(r, self._serial_program(r, p, max_new_tokens, stop, params, gen, logits_processor,
                                                     progress)) for r, p in zip(reqs, prompts)])

    def _serial_program(self, req: Request, prompt: list[int], n: int, stop: set[int], params: SamplingParams,
                        gen, processor, progress) -> Program:
        for t in prompt:
            last = req.place(t)
        logits = yield [last]
        req.t1 = self._sync()
        out = yield from self._serial_steps(req, logits, last, n, stop, params, gen, processor, progress)
        return req.result([], out, self._sync(), mode="serial")

    def _serial_steps(self, req: Request, logits: Tensor, last: int, n: int, stop: set[int],
                      params: SamplingParams, gen, processor, progress) -> Generator[list[int], Tensor, list[int]]:
        """Sample up to ``n`` serial tokens from ``logits`` (those of slot ``last``), stopping after a token in
        ``stop``, or before a token the sequence has no slot for. Each is placed; the last one is never fed (no later
        token needs it). Returns the tokens; sets ``req.stop_reason`` (when ``n > 0``)."""
        out: list[int] = []
        for i in range(n):
            if req.room() < 1:
                req.end("max_seq_len")
                break
            t = self._sample(req, logits, [last], params, gen, None, processor)[0]
            out.append(t)
            last = req.place(t, sampled=True)
            if progress is not None:
                progress(1)
            if t in stop or i == n - 1:
                req.end("eos" if t in stop else "max_new_tokens")
                break
            logits = yield [last]
        return out
