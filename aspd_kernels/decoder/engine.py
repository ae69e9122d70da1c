"""``ParallelDecoder``: serial text and parallel sections decoded in ONE sequence over one static KV cache (SPEC §6).

Storage order is feeding order. A sampled token is placed at the next slot and fed by the next forward pass, so
each forward pass carries: a prompt (prefill), or the branch prompts of a new section (all at once, contiguous), or
one token per live branch (interleaved), or the last tokens of the finished branches together with the serial
tokens that close the section (the suffix, or ``<|/para|>``). A branch that emits its end token is fed once more,
in the next forward pass, and then adds nothing; nothing is ever recomputed. Rotary positions come from a counter
that follows SPEC §3 for the chosen strategy.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..layout import BranchLayout
from ..reference import STRATEGIES
from ..tokens import AspdTokens
from .cache import KVCache
from .graphs import DecodeGraphs
from .model import Batch, Transformer
from .result import DecodeResult
from .sampling import Grammar, SamplingParams, sample
from .weights import build, parse_dtype, read_directory, read_module

LogitsProcessor = Callable[[Tensor, list[list[int]]], Tensor]


class _Positions:
    """SPEC §3's counter ``c``, advanced token by token as the decoder places them."""

    def __init__(self, strategy: str) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"position_strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.c = 0
        self.lengths: dict[int, int] = {}
        self.width = 0

    def serial(self, slot: int) -> int:
        if self.strategy == "sequential":
            return slot
        self.c += 1
        return self.c - 1

    def open(self, num_branches: int, width: int) -> None:
        self.lengths = {j: 0 for j in range(1, num_branches + 1)}
        self.width = width

    def branch(self, j: int, slot: int) -> int:
        t = self.lengths[j]
        self.lengths[j] = t + 1
        if self.strategy == "sequential":
            return slot
        if self.strategy == "fixed-length":
            if t >= self.width:
                raise ValueError(f"branch {j} outgrew the fixed-length width {self.width}")
            return self.c + (j - 1) * self.width + t
        return self.c + t

    def close(self) -> None:
        if self.strategy == "same-sequential":
            self.c += sum(self.lengths.values())
        elif self.strategy == "same-max":
            self.c += max(self.lengths.values())
        elif self.strategy == "fixed-length":
            self.c += len(self.lengths) * self.width


class _Run:
    """One request: the host-side record of every slot (token, ids, position) and how many are in the cache."""

    def __init__(self, dec: "ParallelDecoder", strategy: str) -> None:
        self.dec = dec
        self.fed = 0
        self.tokens: list[int] = []
        self.seg: list[int] = []
        self.br: list[int] = []
        self.pos: list[int] = []
        self.sampled: list[bool] = []
        self.layout = BranchLayout()
        self.counter = _Positions(strategy)
        self.section = -1
        self.parallel = False
        self.section_start = 0
        self.forward_passes = 0
        self.widths: list[int] = []

    def place(self, token: int, j: int = 0, sampled: bool = False) -> int:
        """Put ``token`` at the next slot (serial if ``j == 0``, else branch ``j`` of the open section)."""
        slot = len(self.tokens)
        if slot >= self.dec.max_seq_len:
            raise ValueError(f"the sequence outgrew max_seq_len={self.dec.max_seq_len}")
        if j == 0:
            if self.parallel:
                self.close_section()
            if not self.br or self.br[-1] != 0:
                self.section += 1
            pos = self.counter.serial(slot)
            self.layout.append_serial(1)
        else:
            pos = self.counter.branch(j, slot)
            self.layout.append_branch(j, 1)
        if pos >= self.dec.max_position:
            raise ValueError(f"position {pos} exceeds the rotary table ({self.dec.max_position} rows; raise "
                             "max_position)")
        self.tokens.append(int(token))
        self.seg.append(self.section)
        self.br.append(j)
        self.pos.append(pos)
        self.sampled.append(sampled)
        return slot

    def open_section(self, num_branches: int, width: int) -> None:
        self.section += 1
        self.parallel = True
        self.section_start = len(self.tokens)
        self.layout.open_parallel()
        self.counter.open(num_branches, width)
        if self.counter.strategy == "fixed-length":
            self.widths.append(width)

    def close_section(self) -> None:
        self.parallel = False
        self.layout.close_parallel()
        self.counter.close()

    def history(self, slot: int) -> list[int]:
        """The tokens slot ``slot`` sees (SPEC §2), in storage order, itself included."""
        s, b = self.seg[slot], self.br[slot]
        return [self.tokens[k] for k in range(slot + 1) if self.seg[k] != s or self.br[k] == b]

    def forward(self, rows: Sequence[int] = ()) -> Tensor | None:
        """Feed every placed, unfed slot in one forward pass; logits float32 ``[len(rows), V]`` of the slots
        ``rows`` (absolute slot indices among those fed), or None when no row is asked for."""
        a, e = self.fed, len(self.tokens)
        if e == a:
            raise RuntimeError("forward with nothing to feed")
        logits = self.dec._forward(self.tokens[a:e], self.pos[a:e], self.seg[a:e], self.br[a:e], a,
                                   [r - a for r in rows])
        self.fed = e
        self.forward_passes += 1
        return logits

    def result(self, branches: list, suffix: list[int], t0: float, t1: float, t2: float) -> DecodeResult:
        lay = self.layout
        seg, br = torch.tensor(self.seg, dtype=torch.int32), torch.tensor(self.br, dtype=torch.int32)
        # the layout helper and the decoder's own bookkeeping must agree slot for slot
        assert torch.equal(lay.segment, seg) and torch.equal(lay.branch, br), "layout bookkeeping diverged"
        return DecodeResult(
            sequence=torch.tensor(self.tokens, dtype=torch.int64), segment=seg, branch=br,
            positions=torch.tensor(self.pos, dtype=torch.int32), sampled=torch.tensor(self.sampled),
            layout=lay, branches=branches, suffix=suffix, forward_passes=self.forward_passes,
            position_strategy=self.counter.strategy,
            width=self.widths if self.counter.strategy == "fixed-length" else None,
            prefill_s=t1 - t0, decode_s=t2 - t1, total_s=t2 - t0,
        )


def _ids(name: str, ids, vocab: int) -> list[int]:
    if isinstance(ids, Tensor):
        ids = ids.reshape(-1).tolist()
    ids = [int(t) for t in ids]
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{name} holds token ids outside [0, {vocab}): {bad[:5]}")
    return ids


class ParallelDecoder:
    """A Llama-family model with a static KV cache, decoding serial text and parallel sections in one sequence.

    Build with :meth:`from_hf`. ``max_seq_len`` bounds the slots of one request; ``max_position`` the rotary
    positions (they can exceed the slots with the fixed-length strategy). Batch 1: one request per call.
    """

    def __init__(self, model: Transformer, *, max_seq_len: int = 4096, cuda_graphs: bool | None = None,
                 check_values: bool | None = None) -> None:
        self.model = model
        cfg = model.config
        if cfg.sliding_window is not None and max_seq_len > cfg.sliding_window:
            raise ValueError(f"the model uses a sliding window of {cfg.sliding_window} tokens, which the ops do not "
                             f"implement: use max_seq_len <= {cfg.sliding_window}")
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.max_seq_len = max_seq_len
        self.max_position = model.cos_sin.shape[0]
        self.vocab_size = cfg.vocab_size
        self.cache = KVCache(cfg.num_layers, 1, max_seq_len, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device)
        on_cuda = self.device.type == "cuda"
        # value checks read the device (a sync per op); the engine validates its own inputs on the host
        self.check_values = (not on_cuda) if check_values is None else check_values
        if cuda_graphs is None:
            cuda_graphs = on_cuda and _capturable(self.device)
        if cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.graphs = DecodeGraphs(model, self.cache) if cuda_graphs else None

    @classmethod
    def from_hf(cls, model_or_path, *, device: torch.device | str | None = None,
                dtype: torch.dtype | str | None = None, max_seq_len: int = 4096, max_position: int | None = None,
                cuda_graphs: bool | None = None, check_values: bool | None = None) -> "ParallelDecoder":
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
        return cls(model, max_seq_len=max_seq_len, cuda_graphs=cuda_graphs, check_values=check_values)

    # ------------------------------------------------------------------ forward
    def _forward(self, tokens: list[int], positions: list[int], segment: list[int], branch: list[int],
                 start: int, rows: list[int]) -> Tensor | None:
        end = start + len(tokens)
        if self.graphs is not None:
            out = self.graphs.run(tokens, positions, segment, branch, end)
            if out is not None:
                return out[rows] if rows else None
        dev = self.device
        i32 = dict(dtype=torch.int32, device=dev)
        b = Batch(torch.tensor([tokens], dtype=torch.int64, device=dev), torch.tensor([positions], **i32),
                  torch.tensor([segment], **i32), torch.tensor([branch], **i32), torch.tensor([end], **i32),
                  torch.tensor([len(tokens)], **i32))
        h = self.model.hidden(b, self.cache, self.check_values)[0]
        return self.model.logits(h[rows]) if rows else None

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _sample(self, run: _Run, logits: Tensor, rows: list[int], params: SamplingParams,
                gen: torch.Generator | None, bias: Tensor | None, processor: LogitsProcessor | None) -> list[int]:
        if processor is not None:
            logits = processor(logits, [run.history(r) for r in rows])
        # the one host sync per step: which branches are still live decides the next step's shape
        return sample(logits, params, gen, bias).tolist()

    def _branch_loop(self, run: _Run, logits: Tensor, rows: list[int], limit: int, stop: set[int],
                     params: SamplingParams, gen, bias: Tensor | None, processor: LogitsProcessor | None,
                     budget: list[int] | None, progress: Callable[[int], None] | None) -> list[list[int]]:
        """Decode the open section's branches from their first logits until each stops. Returns each branch's
        generated tokens; the last ones are placed but left for the caller's closing forward pass."""
        k = len(rows)
        out: list[list[int]] = [[] for _ in range(k)]
        live = list(range(1, k + 1))
        while True:
            toks = self._sample(run, logits, rows, params, gen, bias, processor)
            cut = False
            if budget is not None:
                budget[0] -= len(toks)
                cut = budget[0] <= 0
            rows, still = [], []
            for j, t in zip(live, toks):
                out[j - 1].append(t)
                slot = run.place(t, j, sampled=True)
                if not cut and t not in stop and len(out[j - 1]) < limit:
                    still.append(j)
                    rows.append(slot)
            if progress is not None:
                progress(len(toks))
            if not still:
                return out
            logits = run.forward(rows)
            live = still

    # ------------------------------------------------------------ public API
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
        v = self.vocab_size
        prefix = _ids("prefix_ids", prefix_ids, v)
        prompts = [_ids(f"branch_prompts[{j}]", p, v) for j, p in enumerate(branch_prompts)]
        suffix_in = _ids("suffix_ids", suffix_ids if suffix_ids is not None else [], v)
        params = SamplingParams(temperature, top_k, top_p, seed)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("branch_prompts must hold at least one branch, each prompt at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_suffix_tokens and not suffix_in:
            raise ValueError("max_suffix_tokens > 0 needs suffix_ids: the first serial token after the section "
                             "is predicted from a serial token that sees every branch")
        need = len(prefix) + sum(map(len, prompts)) + len(prompts) * max_new_tokens + len(suffix_in) \
            + max_suffix_tokens
        if need > self.max_seq_len:
            raise ValueError(f"this request may need {need} slots, more than max_seq_len={self.max_seq_len}")
        longest = max(map(len, prompts))
        if width is None:
            width = max_new_tokens + longest
        elif width < max_new_tokens + longest:
            raise ValueError(f"width={width} is below max_new_tokens + longest prompt = {max_new_tokens + longest}")
        stop = _stop_set(eos_token_id)
        gen = params.generator(self.device)

        run = _Run(self, position_strategy)
        t0 = self._sync()
        for t in prefix:
            run.place(t)
        if prefix:
            run.forward()
        run.open_section(len(prompts), width)
        rows = []
        for j, p in enumerate(prompts, start=1):
            for t in p:
                slot = run.place(t, j)
            rows.append(slot)
        logits = run.forward(rows)
        t1 = self._sync()
        branches = self._branch_loop(run, logits, rows, max_new_tokens, stop, params, gen, None,
                                     logits_processor, None, progress)
        run.close_section()
        suffix: list[int] = []
        last = None
        for t in suffix_in:
            last = run.place(t)
        logits = run.forward([last] if max_suffix_tokens else [])
        for i in range(max_suffix_tokens):
            t = self._sample(run, logits, [last], params, gen, None, logits_processor)[0]
            suffix.append(t)
            last = run.place(t, sampled=True)
            if progress is not None:
                progress(1)
            if t in stop or i == max_suffix_tokens - 1:
                break
            logits = run.forward([last])
        return run.result(branches, suffix, t0, t1, self._sync())

    @torch.inference_mode()
    def generate_serial(self, prompt_ids: Sequence[int] | Tensor, max_new_tokens: int,
                        eos_token_id: int | Sequence[int] | None = None, temperature: float = 0.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None, *,
                        logits_processor: LogitsProcessor | None = None,
                        progress: Callable[[int], None] | None = None) -> DecodeResult:
        """Plain autoregressive decoding (no sections): the baseline parallel decoding is measured against and the
        path the identities compare branches with. ``result.suffix`` holds the generated tokens."""
        return self._serial(prompt_ids, max_new_tokens, _stop_set(eos_token_id),
                            SamplingParams(temperature, top_k, top_p, seed), None, logits_processor, progress,
                            "same-sequential", None, 0)

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
        """
        grammar = Grammar(tokens, self.vocab_size, self.device)
        return self._serial(prompt_ids, max_new_tokens, _stop_set(eos_token_id),
                            SamplingParams(temperature, top_k, top_p, seed), grammar, logits_processor, progress,
                            position_strategy, width, max_branch_tokens)

    def _serial(self, prompt_ids, max_new_tokens: int, stop: set[int], params: SamplingParams,
                grammar: Grammar | None, processor, progress, strategy: str, width: int | None,
                max_branch_tokens: int) -> DecodeResult:
        prompt = _ids("prompt_ids", prompt_ids, self.vocab_size)
        if not prompt:
            raise ValueError("prompt_ids must hold at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if grammar is not None and max_branch_tokens < 1:
            raise ValueError(f"max_branch_tokens must be >= 1, got {max_branch_tokens}")
        gen = params.generator(self.device)
        run = _Run(self, strategy)
        t0 = self._sync()
        for t in prompt:
            last = run.place(t)
        logits = run.forward([last])
        t1 = self._sync()
        text = list(prompt)  # the current serial section, where titles are looked for
        sections: list[list[list[int]]] = []
        suffix: list[int] = []
        budget = [max_new_tokens]
        while budget[0] > 0:
            bias = None
            if grammar is not None:
                bias = grammar.serial_bias(text[-1] if text else None, _title_open(text, grammar.tokens))
            t = self._sample(run, logits, [last], params, gen, bias, processor)[0]
            budget[0] -= 1
            suffix.append(t)
            text.append(t)
            last = run.place(t, sampled=True)
            if progress is not None:
                progress(1)
            if t in stop or budget[0] <= 0:
                break
            if grammar is not None and t == grammar.tokens.para:
                branches, last, logits = self._section(run, text, grammar, max_branch_tokens, strategy, width,
                                                       stop, params, gen, processor, budget, progress)
                sections.append(branches)
                suffix = []
                text = [grammar.tokens.para_end]
                continue
            logits = run.forward([last])
        branches = sections if grammar is not None else []
        return run.result(branches, suffix, t0, t1, self._sync())

    def _section(self, run: _Run, text: list[int], grammar: Grammar, limit: int, strategy: str, width: int | None,
                 stop: set[int], params, gen, processor, budget: list[int], progress
                 ) -> tuple[list[list[int]], int, Tensor]:
        """One parallel section after a sampled ``<|para|>`` (placed, not fed). Returns the branches' tokens and
        the slot and logits of the closing ``<|/para|>``."""
        tk = grammar.tokens
        titles = _titles(text, tk)
        if not titles:
            raise RuntimeError("<|para|> without a title: the grammar should have prevented it")
        prompts = [[tk.branch] + title for title in titles]
        longest = max(map(len, prompts))
        w = width if width is not None else limit + longest
        if w < limit + longest and strategy == "fixed-length":
            raise ValueError(f"width={w} is below max_branch_tokens + longest branch prompt = {limit + longest}")
        run.open_section(len(prompts), w)
        rows = []
        for j, p in enumerate(prompts, start=1):
            for t in p:
                slot = run.place(t, j)
            rows.append(slot)
        logits = run.forward(rows)  # the <|para|> (serial, placed before) rides along
        out = self._branch_loop(run, logits, rows, limit, stop | {tk.branch_end}, params, gen, grammar.branch,
                                processor, budget, progress)
        slot = run.place(tk.para_end)
        return out, slot, run.forward([slot])


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
