"""``ParallelDecoder``: serial text and parallel sections decoded in ONE sequence over one static KV cache (SPEC §6).

Storage order is feeding order. A sampled token is placed at the next slot and fed by the next forward pass, so
each forward pass carries: a prompt (prefill), or the branch prompts of a new section (all at once, contiguous), or
one token per live branch (interleaved), or the last tokens of the finished branches together with the serial
tokens that close the section (the suffix, or ``<|/para|>``). A branch that emits its end token is fed once more,
in the next forward pass, and then adds nothing; nothing is ever recomputed. Rotary positions come from a counter
that follows SPEC §3 for the chosen strategy.

Each request's decoding is a generator ("program") that yields the slots whose logits it needs and receives them;
a driver runs the programs of a batch in lockstep, one forward pass for all of them per round (each request in its
own cache row, with its own layout; a request with nothing to feed sits the round out with ``q_seqlens = 0``).
"""
from __future__ import annotations

import time
from typing import Callable, Generator, Sequence

import torch
from torch import Tensor

from ..tokens import AspdTokens
from .cache import KVCache
from .graphs import DecodeGraphs
from .model import Batch, Transformer
from .request import Request
from .result import DecodeResult
from .sampling import Grammar, SamplingParams, sample
from .weights import build, parse_dtype, read_directory, read_module

LogitsProcessor = Callable[[Tensor, list[list[int]]], Tensor]
Program = Generator[list[int], "Tensor | None", DecodeResult]


class ParallelDecoder:
    """A Llama-family model with a static KV cache, decoding serial text and parallel sections in one sequence.

    Build with :meth:`from_hf`. ``max_seq_len`` bounds the slots of one request; ``max_position`` the rotary
    positions (they can exceed the slots with the fixed-length strategy); ``max_batch`` the requests decoded
    together by the ``*_batch`` methods (each has its own cache row).
    """

    def __init__(self, model: Transformer, *, max_seq_len: int = 4096, max_batch: int = 1,
                 cuda_graphs: bool | None = None, check_values: bool | None = None) -> None:
        self.model = model
        cfg = model.config
        if cfg.sliding_window is not None and max_seq_len > cfg.sliding_window:
            raise ValueError(f"the model uses a sliding window of {cfg.sliding_window} tokens, which the ops do not "
                             f"implement: use max_seq_len <= {cfg.sliding_window}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.max_seq_len = max_seq_len
        self.max_position = model.cos_sin.shape[0]
        self.vocab_size = cfg.vocab_size
        self.cache = KVCache(cfg.num_layers, max_batch, max_seq_len, cfg.num_kv_heads, cfg.head_dim, self.dtype,
                             self.device)
        on_cuda = self.device.type == "cuda"
        # value checks read the device (a sync per op); the engine validates its own inputs on the host
        self.check_values = (not on_cuda) if check_values is None else check_values
        if cuda_graphs is None:
            cuda_graphs = on_cuda and max_batch == 1 and _capturable(self.device)
        if cuda_graphs and (not on_cuda or max_batch != 1):
            raise ValueError("cuda_graphs=True needs the model on a CUDA device and max_batch=1")
        self.graphs = DecodeGraphs(model, self.cache) if cuda_graphs else None

    @classmethod
    def from_hf(cls, model_or_path, *, device: torch.device | str | None = None,
                dtype: torch.dtype | str | None = None, max_seq_len: int = 4096, max_position: int | None = None,
                max_batch: int = 1, cuda_graphs: bool | None = None,
                check_values: bool | None = None) -> "ParallelDecoder":
        """From a local Hugging Face directory (``config.json`` + safetensors) or an in-memory ``transformers``
        causal LM (its tensors are shared when device and dtype already match).

        device: default the model's device (in-memory) or CUDA when available (directory).
        dtype: default the in-memory model's dtype, else the config's ``dtype``/``torch_dtype``.
        max_position: rows of the rotary table (default ``max_seq_len``).
        """
        if isinstance(model_or_path, str) or hasattr(model_or_path, "__fspath__"):
            dev = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
            cfg, state = read_directory(str(model_or_path), dev)
            default_dtype = None
        else:
            cfg, state = read_module(model_or_path)
            p = next(model_or_path.parameters())
            dev = torch.device(device if device is not None else p.device)
            default_dtype = p.dtype
        model = build(cfg, state, device=dev, dtype=parse_dtype(dtype) or default_dtype,
                      max_position=max_position or max_seq_len)
        return cls(model, max_seq_len=max_seq_len, max_batch=max_batch, cuda_graphs=cuda_graphs,
                   check_values=check_values)

    # ------------------------------------------------------------------ forward
    def _feed(self, asks: list[tuple[Request, list[int]]]) -> list[Tensor | None]:
        """One forward pass over the unfed slots of each asking request; per request the float32 logits
        ``[len(rows), V]`` of its slots ``rows`` (None when it asks for none)."""
        spans = []
        for req, _ in asks:
            a, e = req.fed, len(req.tokens)
            if e == a:
                raise RuntimeError("a forward pass with nothing to feed")
            spans.append((a, e))
        outs = None
        if self.graphs is not None and len(asks) == 1:
            (req, rows), (a, e) = asks[0], spans[0]
            full = self.graphs.run(req.tokens[a:e], req.pos[a:e], req.seg[a:e], req.br[a:e], e)
            if full is not None:
                outs = [full[[r - a for r in rows]] if rows else None]
        if outs is None:
            outs = self._eager(asks, spans)
        for (req, _), (_, e) in zip(asks, spans):
            req.fed = e
            req.forward_passes += 1
        return outs

    def _eager(self, asks: list[tuple[Request, list[int]]], spans: list[tuple[int, int]]) -> list[Tensor | None]:
        bsz = self.cache.k.shape[1]
        width = max(e - a for a, e in spans)
        tok = torch.zeros((bsz, width), dtype=torch.int64)
        ids = torch.zeros((3, bsz, width), dtype=torch.int32)
        lens = torch.zeros((2, bsz), dtype=torch.int32)  # rows not asking: q_seqlens 0, nothing read or written
        pick_b, pick_t = [], []
        for (req, rows), (a, e) in zip(asks, spans):
            b, n = req.row, e - a
            tok[b, :n] = torch.tensor(req.tokens[a:e])
            ids[:, b, :n] = torch.tensor([req.pos[a:e], req.seg[a:e], req.br[a:e]], dtype=torch.int32)
            lens[:, b] = torch.tensor([e, n], dtype=torch.int32)
            pick_b += [b] * len(rows)
            pick_t += [r - a for r in rows]
        dev = self.device
        tok, ids, lens = tok.to(dev), ids.to(dev), lens.to(dev)
        h = self.model.hidden(Batch(tok, ids[0], ids[1], ids[2], lens[0], lens[1]), self.cache, self.check_values)
        logits = self.model.logits(h[pick_b, pick_t]) if pick_b else None
        outs, k = [], 0
        for _, rows in asks:
            outs.append(logits[k:k + len(rows)] if rows else None)
            k += len(rows)
        return outs

    def _drive(self, programs: list[tuple[Request, Program]]) -> list[DecodeResult]:
        """Run each request's program to completion, one batched forward pass per round for all that ask."""
        results: list[DecodeResult | None] = [None] * len(programs)
        asks: dict[int, tuple[Request, list[int]]] = {}

        def advance(i: int, value) -> None:
            req, prog = programs[i]
            try:
                asks[i] = (req, prog.send(value))
            except StopIteration as stop:
                results[i] = stop.value
                asks.pop(i, None)

        for i in range(len(programs)):
            advance(i, None)
        while asks:
            order = sorted(asks)
            outs = self._feed([asks[i] for i in order])
            for i, out in zip(order, outs):
                advance(i, out)
        return results  # type: ignore[return-value]

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _sample(self, req: Request, logits: Tensor, rows: list[int], params: SamplingParams,
                gen: torch.Generator | None, bias: Tensor | None, processor: LogitsProcessor | None) -> list[int]:
        if processor is not None:
            logits = processor(logits, [req.history(r) for r in rows])
        # the one host sync per step: which branches are still live decides the next step's shape
        return sample(logits, params, gen, bias).tolist()

    # ------------------------------------------------------------ programs
    def _branch_loop(self, req: Request, logits: Tensor, rows: list[int], limit: int, stop: set[int],
                     params: SamplingParams, gen, bias: Tensor | None, processor: LogitsProcessor | None,
                     budget: list[int] | None, progress) -> Generator[list[int], Tensor, list[list[int]]]:
        """Decode the open section's branches from their first logits until each stops. Returns each branch's
        generated tokens; the last ones are placed but left for the caller's closing forward pass."""
        out: list[list[int]] = [[] for _ in rows]
        live = list(range(1, len(rows) + 1))
        while True:
            toks = self._sample(req, logits, rows, params, gen, bias, processor)
            cut = False
            if budget is not None:
                budget[0] -= len(toks)
                cut = budget[0] <= 0
            rows, still = [], []
            for j, t in zip(live, toks):
                out[j - 1].append(t)
                slot = req.place(t, j, sampled=True)
                if not cut and t not in stop and len(out[j - 1]) < limit:
                    still.append(j)
                    rows.append(slot)
            if progress is not None:
                progress(len(toks))
            if not still:
                return out
            logits = yield rows
            live = still

    def _branches_program(self, req: Request, prefix: list[int], prompts: list[list[int]], max_new_tokens: int,
                          stop: set[int], suffix_in: list[int], max_suffix_tokens: int, width: int,
                          params: SamplingParams, gen, processor, progress) -> Program:
        for t in prefix:
            req.place(t)
        if prefix:
            yield []
        req.open_section(len(prompts), width)
        rows = []
        for j, p in enumerate(prompts, start=1):
            for t in p:
                slot = req.place(t, j)
            rows.append(slot)
        logits = yield rows
        req.t1 = self._sync()
        branches = yield from self._branch_loop(req, logits, rows, max_new_tokens, stop, params, gen, None,
                                                processor, None, progress)
        req.close_section()
        suffix: list[int] = []
        last = None
        for t in suffix_in:
            last = req.place(t)
        logits = yield ([last] if max_suffix_tokens else [])
        for i in range(max_suffix_tokens):
            t = self._sample(req, logits, [last], params, gen, None, processor)[0]
            suffix.append(t)
            last = req.place(t, sampled=True)
            if progress is not None:
                progress(1)
            if t in stop or i == max_suffix_tokens - 1:
                break
            logits = yield [last]
        return req.result(branches, suffix, self._sync())

    def _serial_program(self, req: Request, prompt: list[int], max_new_tokens: int, stop: set[int],
                        params: SamplingParams, gen, grammar: Grammar | None, processor, progress,
                        width: int | None, max_branch_tokens: int) -> Program:
        for t in prompt:
            last = req.place(t)
        logits = yield [last]
        req.t1 = self._sync()
        text = list(prompt)  # the current serial section, where titles are looked for
        sections: list[list[list[int]]] = []
        suffix: list[int] = []
        budget = [max_new_tokens]
        while budget[0] > 0:
            bias = None
            if grammar is not None:
                bias = grammar.serial_bias(text[-1], _title_open(text, grammar.tokens))
            t = self._sample(req, logits, [last], params, gen, bias, processor)[0]
            budget[0] -= 1
            suffix.append(t)
            text.append(t)
            last = req.place(t, sampled=True)
            if progress is not None:
                progress(1)
            if t in stop or budget[0] <= 0:
                break
            if grammar is not None and t == grammar.tokens.para:
                branches, last, logits = yield from self._section(req, text, grammar, max_branch_tokens, width,
                                                                  stop, params, gen, processor, budget, progress)
                sections.append(branches)
                suffix = []
                text = [grammar.tokens.para_end]
                continue
            logits = yield [last]
        return req.result(sections if grammar is not None else [], suffix, self._sync())

    def _section(self, req: Request, text: list[int], grammar: Grammar, limit: int, width: int | None,
                 stop: set[int], params, gen, processor, budget: list[int], progress):
        """One parallel section after a sampled ``<|para|>`` (placed, not fed). Returns the branches' tokens and
        the slot and logits of the closing ``<|/para|>``."""
        tk = grammar.tokens
        titles = _titles(text, tk)
        if not titles:
            raise RuntimeError("<|para|> without a title: the grammar should have prevented it")
        prompts = [[tk.branch] + title for title in titles]
        need = limit + max(map(len, prompts))
        w = width if width is not None else need
        if w < need and req.counter.strategy == "fixed-length":
            raise ValueError(f"width={w} is below max_branch_tokens + longest branch prompt = {need}")
        req.open_section(len(prompts), w)
        rows = []
        for j, p in enumerate(prompts, start=1):
            for t in p:
                slot = req.place(t, j)
            rows.append(slot)
        logits = yield rows  # the <|para|> (serial, placed before) rides along
        out = yield from self._branch_loop(req, logits, rows, limit, stop | {tk.branch_end}, params, gen,
                                           grammar.branch, processor, budget, progress)
        slot = req.place(tk.para_end)
        return out, slot, (yield [slot])

    # ------------------------------------------------------------ public API
    def _requests(self, n: int, strategy: str) -> list[Request]:
        if n > self.cache.k.shape[1]:
            raise ValueError(f"{n} requests exceed max_batch={self.cache.k.shape[1]}")
        reqs = [Request(self, strategy, row=b) for b in range(n)]
        t0 = self._sync()
        for r in reqs:
            r.t0 = t0
        return reqs

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
        width: int | None = None,
        logits_processor: LogitsProcessor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> DecodeResult:
        """Prefill ``prefix_ids`` (serial), then all ``branch_prompts`` in one forward pass, then one token per live
        branch per forward pass until each emits ``eos_token_id`` or has ``max_new_tokens``; then ``suffix_ids``
        (serial, fed with the branches' last tokens) and up to ``max_suffix_tokens`` serial tokens over it all.

        Forward passes: ``[prefix] + 1 + max_j len(branches[j]) + max(0, len(suffix) - 1)``.
        ``width`` (fixed-length only): the stride per branch, default ``max_new_tokens + longest prompt``.
        ``logits_processor(logits [R, V], histories)`` may rewrite the logits; ``histories[r]`` are the tokens row
        r sees. ``progress(n)`` is called after each step with the tokens it sampled.
        """
        return self.generate_branches_batch(
            [prefix_ids], [branch_prompts], max_new_tokens, eos_token_id, None if suffix_ids is None else [suffix_ids],
            max_suffix_tokens, position_strategy, temperature, top_k, top_p, seed, width=width,
            logits_processor=logits_processor, progress=progress)[0]

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
        width: int | None = None,
        logits_processor: LogitsProcessor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[DecodeResult]:
        """:meth:`generate_branches` for several requests at once (``prefix_ids[i]``, ``branch_prompts[i]``,
        ``suffix_ids[i]``), each in its own cache row with its own layout, all advanced by shared forward passes.
        Greedy results equal the one-request calls'."""
        n = len(prefix_ids)
        if len(branch_prompts) != n or (suffix_ids is not None and len(suffix_ids) != n):
            raise ValueError("prefix_ids, branch_prompts (and suffix_ids) need one entry per request")
        params = SamplingParams(temperature, top_k, top_p, seed)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stop = _stop_set(eos_token_id)
        gen = params.generator(self.device)
        reqs = self._requests(n, position_strategy)
        programs = []
        for i, req in enumerate(reqs):
            tag = "" if n == 1 else f"[{i}]"
            v = self.vocab_size
            prefix = _ids(f"prefix_ids{tag}", prefix_ids[i], v)
            prompts = [_ids(f"branch_prompts{tag}[{j}]", p, v) for j, p in enumerate(branch_prompts[i])]
            s = None if suffix_ids is None else suffix_ids[i]
            suffix_in = _ids(f"suffix_ids{tag}", s if s is not None else [], v)
            if not prompts or any(len(p) == 0 for p in prompts):
                raise ValueError(f"branch_prompts{tag} must hold at least one branch, each prompt at least one "
                                 "token")
            if max_suffix_tokens and not suffix_in:
                raise ValueError("max_suffix_tokens > 0 needs suffix_ids: the first serial token after the section "
                                 "is predicted from a serial token that sees every branch")
            need = len(prefix) + sum(map(len, prompts)) + len(prompts) * max_new_tokens + len(suffix_in) \
                + max_suffix_tokens
            if need > self.max_seq_len:
                raise ValueError(f"request{tag} may need {need} slots, more than max_seq_len={self.max_seq_len}")
            w = max_new_tokens + max(map(len, prompts))
            if width is not None:
                if width < w:
                    raise ValueError(f"width={width} is below max_new_tokens + longest prompt = {w}")
                w = width
            programs.append((req, self._branches_program(req, prefix, prompts, max_new_tokens, stop, suffix_in,
                                                   max_suffix_tokens, w, params, gen, logits_processor, progress)))
        return self._drive(programs)

    @torch.inference_mode()
    def generate_serial(self, prompt_ids: Sequence[int] | Tensor, max_new_tokens: int,
                        eos_token_id: int | Sequence[int] | None = None, temperature: float = 0.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None, *,
                        logits_processor: LogitsProcessor | None = None,
                        progress: Callable[[int], None] | None = None) -> DecodeResult:
        """Plain autoregressive decoding (no sections): the baseline parallel decoding is measured against and the
        path the identities compare branches with. ``result.suffix`` holds the generated tokens."""
        return self._serial_batch([prompt_ids], max_new_tokens, eos_token_id, None, "same-sequential",
                                  SamplingParams(temperature, top_k, top_p, seed), None, 0, logits_processor,
                                  progress)[0]

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
    ) -> DecodeResult:
        """The model-driven engine: serial decoding until ``<|para|>``; one branch per ``<|title|>T<|/title|>`` of
        the current serial text, prompt ``<|branch|> T`` (fed with the ``<|para|>`` in one forward pass); branches
        decoded in parallel until each emits ``<|/branch|>`` (or EOS, or ``max_branch_tokens``); then ``<|/para|>``
        is appended (fed with the branches' last tokens) and serial decoding resumes over the same cache.
        The six-token grammar is enforced (see :class:`~aspd_kernels.decoder.sampling.Grammar`).

        ``max_new_tokens`` bounds the sampled tokens (serial and branch), checked after each forward pass.
        ``width`` (fixed-length only): the stride, default ``max_branch_tokens + longest branch prompt`` per section.
        ``result.branches``: one list per parallel section; ``result.suffix``: the tokens sampled after the last.
        Raises ``ValueError`` if the sequence outgrows ``max_seq_len``.
        """
        return self.generate_batch([prompt_ids], max_new_tokens, tokens, eos_token_id, max_branch_tokens,
                                   position_strategy, temperature, top_k, top_p, seed, width=width,
                                   logits_processor=logits_processor, progress=progress)[0]

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
    ) -> list[DecodeResult]:
        """:meth:`generate` for several prompts at once, each in its own cache row: one request may be in a
        parallel section while another decodes serially, all advanced by shared forward passes."""
        if max_branch_tokens < 1:
            raise ValueError(f"max_branch_tokens must be >= 1, got {max_branch_tokens}")
        grammar = Grammar(tokens, self.vocab_size, self.device)
        return self._serial_batch(prompt_ids, max_new_tokens, eos_token_id, grammar, position_strategy,
                                  SamplingParams(temperature, top_k, top_p, seed), width, max_branch_tokens,
                                  logits_processor, progress)

    def _serial_batch(self, prompt_ids, max_new_tokens: int, eos, grammar: Grammar | None, strategy: str,
                      params: SamplingParams, width: int | None, max_branch_tokens: int, processor,
                      progress) -> list[DecodeResult]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        n = len(prompt_ids)
        prompts = [_ids("prompt_ids" if n == 1 else f"prompt_ids[{i}]", p, self.vocab_size)
                   for i, p in enumerate(prompt_ids)]
        if any(not p for p in prompts):
            raise ValueError("prompt_ids must hold at least one token")
        stop, gen = _stop_set(eos), params.generator(self.device)
        reqs = self._requests(n, strategy)
        return self._drive([(r, self._serial_program(r, p, max_new_tokens, stop, params, gen, grammar, processor,
                                                     progress, width, max_branch_tokens))
                            for r, p in zip(reqs, prompts)])


def _ids(name: str, ids, vocab: int) -> list[int]:
    if isinstance(ids, Tensor):
        ids = ids.reshape(-1).tolist()
    ids = [int(t) for t in ids]
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{name} holds token ids outside [0, {vocab}): {bad[:5]}")
    return ids


def _stop_set(eos) -> set[int]:
    if eos is None:
        return set()
    if isinstance(eos, int):
        return {eos}
    return {int(t) for t in eos}


def _title_open(text: list[int], tk: AspdTokens) -> bool:
    for t in reversed(text):
        if t == tk.title_end:
            return False
        if t == tk.title:
            return True
    return False


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


def _capturable(device: torch.device) -> bool:
    """CUDA graphs need ops without host syncs: the Triton or CUDA backend, not the torch fallback."""
    from .._dispatch import resolve

    try:
        return all(resolve(op, device) != "torch" for op in ("rope_append_kv", "branch_attention_with_kvcache"))
    except ValueError:
        return False
