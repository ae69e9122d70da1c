"""The part of the decoder every mode shares: the model, the static cache, the forward pass, and the driver that
runs the requests' programs in lockstep (SPEC section 6; ``docs/decoder.md``).

Storage order is feeding order. A sampled token is placed at the next slot and fed by the next forward pass, so
each forward pass carries: a prompt (prefill), or the branch prompts of a new section (all at once, contiguous), or
one token per live branch (interleaved), or the last tokens of the finished branches together with the serial
tokens that close the section. Nothing is ever recomputed: every slot is fed exactly once.

Each request's decoding is a generator ("program") that yields the slots whose logits it needs and receives them;
:meth:`Driver._drive` runs the programs of a batch in lockstep, one forward pass for all of them per round (each
request in its own cache row, with its own layout; a request with nothing to feed sits the round out with
``q_seqlens = 0``). The modes (serial, caller's branches, model-driven ASPD, plan) are programs over this.
"""
from __future__ import annotations

import operator
import time
from typing import Callable, Generator, Sequence

import torch
from torch import Tensor

from .cache import KVCache
from .graphs import DecodeGraphs
from .model import Batch, Transformer
from .request import Request
from .result import DecodeResult
from .sampling import SamplingParams, sample

LogitsProcessor = Callable[[Tensor, list[list[int]]], Tensor]
Program = Generator[list[int], "Tensor | None", DecodeResult]


class Driver:
    """A Llama-family model with a static KV cache and the forward pass over it; the modes subclass it.

    ``max_seq_len`` bounds the slots of one request; ``max_position`` (the rotary table's rows, from the model)
    the positions, which can exceed the slots with the fixed-length strategy; ``max_batch`` the requests decoded
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
        self.max_batch = max_batch
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.max_seq_len = max_seq_len
        self.max_position = model.cos_sin.shape[0]
        self.vocab_size = cfg.vocab_size
        self.cache = KVCache(cfg.num_layers, max_batch, max_seq_len, cfg.num_kv_heads, cfg.head_dim, self.dtype,
                             self.device)
        on_cuda = self.device.type == "cuda"
        # the engine builds every token, id, position and length on the host from its own checked state, so by
        # default nothing is read back from the device to check it; check_values=True re-checks them on the ops'
        # boundary once per forward (the first layer's call), never once per layer
        self.check_values = bool(check_values)
        if cuda_graphs is None:
            cuda_graphs = on_cuda and _capturable(self.device, cfg.head_dim)
        if cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.graphs = DecodeGraphs(model, self.cache) if cuda_graphs else None

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
        if self.graphs is not None:
            feeds = [(req.row, req.tokens[a:e], req.pos[a:e], req.seg[a:e], req.br[a:e], e)
                     for (req, _), (a, e) in zip(asks, spans)]
            full = self.graphs.run(feeds)
            if full is not None:
                outs = [full[req.row, [r - a for r in rows]] if rows else None
                        for (req, rows), (a, _) in zip(asks, spans)]
        if outs is None:
            outs = self._eager(asks, spans)
        for (req, _), (_, e) in zip(asks, spans):
            req.fed = e
            req.forward_passes += 1
        return outs

    def _eager(self, asks: list[tuple[Request, list[int]]], spans: list[tuple[int, int]]) -> list[Tensor | None]:
        bsz = self.cache.k.shape[1]
        width = max(e - a for a, e in spans)
        # built as Python lists and turned into three tensors at once: a per-request tensor and slice assignment
        # each cost a few aten calls, which at a tiny model's step is host time on the critical path
        tok = [[0] * width for _ in range(bsz)]
        ids = [[[0] * width for _ in range(bsz)] for _ in range(3)]  # positions, segment, branch
        lens = [[0] * bsz, [0] * bsz]  # rows not asking: q_seqlens 0, nothing read or written
        pick_b, pick_t = [], []
        for (req, rows), (a, e) in zip(asks, spans):
            b, n = req.row, e - a
            tok[b][:n] = req.tokens[a:e]
            ids[0][b][:n], ids[1][b][:n], ids[2][b][:n] = req.pos[a:e], req.seg[a:e], req.br[a:e]
            lens[0][b], lens[1][b] = e, n
            pick_b += [b] * len(rows)
            pick_t += [r - a for r in rows]
        dev = self.device
        tok_t = torch.tensor(tok, dtype=torch.int64, device=dev)
        ids_t = torch.tensor(ids, dtype=torch.int32, device=dev)
        lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
        h = self.model.hidden(Batch(tok_t, ids_t[0], ids_t[1], ids_t[2], lens_t[0], lens_t[1]), self.cache,
                              self.check_values)
        logits = self.model.logits(_rows_of(h, pick_b, pick_t)) if pick_b else None
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

    def _requests(self, n: int, strategy: str) -> list[Request]:
        if n > self.max_batch:
            raise ValueError(f"{n} requests exceed max_batch={self.max_batch}")
        reqs = [Request(self.max_seq_len, self.max_position, strategy, row=b) for b in range(n)]
        t0 = self._sync()
        for r in reqs:
            r.t0 = t0
        return reqs

    def _prompts(self, name: str, prompt_ids: Sequence[Sequence[int] | Tensor]) -> list[list[int]]:
        """Check one prompt per request (``name``, or ``name[i]`` in a batch): ids in the vocabulary, not empty."""
        n = len(prompt_ids)
        out = []
        for i, p in enumerate(prompt_ids):
            tag = name if n == 1 else f"{name}[{i}]"
            ids = check_ids(tag, p, self.vocab_size)
            if not ids:
                raise ValueError(f"{tag} must hold at least one token")
            if len(ids) >= self.max_seq_len:
                raise ValueError(f"{tag} holds {len(ids)} tokens, which leaves no slot under max_seq_len="
                                 f"{self.max_seq_len}")
            out.append(ids)
        return out


def _rows_of(h: Tensor, pick_b: list[int], pick_t: list[int]) -> Tensor:
    """``h[pick_b, pick_t]`` (``h [B, L, hidden]`` -> ``[len(pick_b), hidden]``); a view when the picks are one
    row's consecutive slots (every serial or single-request step), which skips an advanced-indexing gather."""
    b, t0 = pick_b[0], pick_t[0]
    if pick_b.count(b) == len(pick_b) and pick_t == list(range(t0, t0 + len(pick_t))):
        return h[b, t0:t0 + len(pick_t)]
    return h[pick_b, pick_t]


def check_ids(name: str, ids: Sequence[int] | Tensor, vocab: int) -> list[int]:
    """``ids`` as a list of ints, each in ``[0, vocab)``; else ``ValueError`` naming ``name`` (text where ids belong
    included: encode it with the tokenizer first)."""
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{name} must be token ids (ints or an int tensor), got the text {ids[:40]!r}: encode it "
                         "with the tokenizer first")
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of token ids, got dtype {ids.dtype}")
        ids = ids.reshape(-1).tolist()
    try:
        ids = [_index(t) for t in ids]
    except TypeError as e:
        raise ValueError(f"{name} must be a sequence of token ids (ints or an int tensor): {e}") from None
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{name} holds token ids outside [0, {vocab}): {bad[:5]}")
    return ids


def _index(t) -> int:
    if isinstance(t, (bool, str, bytes)):  # operator.index takes a bool; a str element is text where an id belongs
        raise TypeError(f"got {type(t).__name__} {t!r} where a token id belongs")
    try:
        return operator.index(t)
    except TypeError:
        raise TypeError(f"got {type(t).__name__} {t!r} where a token id belongs") from None


def stop_set(eos: int | Sequence[int] | None, name: str = "eos_token_id") -> set[int]:
    """The stop ids ``eos`` (an id, a sequence of ids, or None) as a set; else ``ValueError`` naming ``name``."""
    if eos is None:
        return set()
    if isinstance(eos, Tensor):
        eos = eos.reshape(-1).tolist()
    if not isinstance(eos, (str, bytes)) and not hasattr(eos, "__iter__"):
        eos = [eos]
    try:
        return {_index(t) for t in eos} if not isinstance(eos, (str, bytes)) else {_index(eos)}
    except TypeError as e:
        raise ValueError(f"{name} must be a token id or a sequence of token ids: {e}") from None


def positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _capturable(device: torch.device, head_dim: int) -> bool:
    """CUDA graphs need ops without host syncs: the Triton or CUDA backend, not the torch fallback (which ``auto``
    also takes for a head size no GPU backend runs)."""
    from .._checks import head_dim_refusals
    from .._dispatch import resolve

    refusals = head_dim_refusals("q", head_dim)
    try:
        return all(resolve(op, device, refusals=refusals) != "torch"
                   for op in ("rope_append_kv", "branch_attention_with_kvcache"))
    except ValueError:
        return False
