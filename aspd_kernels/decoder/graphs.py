"""CUDA graphs for decode steps: one graph per bucket of new-token counts (1, 2, 4, ..., 64), over every cache row
at once, replayed with each row's real count in ``q_seqlens`` so the padding rows (and the rows of requests that
sit the round out, with ``q_seqlens = 0``) are neither written to the cache nor attended from."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .cache import KVCache
from .model import Batch, Transformer

BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# (cache row, tokens, positions, segment ids, branch ids, cache length after the feed) of one request
Feed = tuple[int, list[int], list[int], list[int], list[int], int]


class DecodeGraphs:
    """Static input buffers + lazily captured graphs of ``model.step`` over the cache's ``B`` rows.

    ``run(feeds)`` returns the float32 logits ``[B, L, vocab]`` (a view of the graph's static output, valid until
    the next replay; row ``b`` holds its request's new tokens first) or None when the widest feed exceeds the
    largest bucket or capture failed (the caller then runs eagerly).
    """

    def __init__(self, model: Transformer, cache: KVCache, buckets: tuple[int, ...] = BUCKETS) -> None:
        self.model, self.cache = model, cache
        self.buckets = tuple(sorted(buckets))
        dev = cache.k.device
        bsz, cap = cache.k.shape[1], self.buckets[-1]
        self.tokens = torch.zeros((bsz, cap), dtype=torch.int64, device=dev)
        self.ids = torch.zeros((3, bsz, cap), dtype=torch.int32, device=dev)  # positions, segment, branch
        self.lens = torch.zeros((2, bsz), dtype=torch.int32, device=dev)  # cache_seqlens, q_seqlens
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = None
        self.disabled = False

    def _batch(self, b: int) -> Batch:
        return Batch(self.tokens[:, :b], self.ids[0, :, :b], self.ids[1, :, :b], self.ids[2, :, :b],
                     self.lens[0], self.lens[1])

    def _capture(self, b: int) -> None:
        batch = self._batch(b)
        # warm-up runs execute for real: with q_seqlens = 0 they write nothing into the cache
        self.lens.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model.step(batch, self.cache, check_values=False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model.step(batch, self.cache, check_values=False)
        self.pool = graph.pool()
        self.graphs[b] = (graph, out)

    def run(self, feeds: list[Feed]) -> Tensor | None:
        width = max(len(f[1]) for f in feeds)
        b = next((x for x in self.buckets if x >= width), None)
        if b is None or self.disabled:
            return None
        if b not in self.graphs:
            try:
                self._capture(b)
            except RuntimeError as e:  # an op path that is not capturable: stay eager from now on
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}", stacklevel=2)
                self.disabled = True
                return None
        bsz = self.tokens.shape[0]
        tok = torch.zeros((bsz, b), dtype=torch.int64)
        ids = torch.zeros((3, bsz, b), dtype=torch.int32)
        lens = torch.zeros((2, bsz), dtype=torch.int32)  # rows not fed: q_seqlens 0, nothing read or written
        for row, tokens, positions, segment, branch, cache_len in feeds:
            n = len(tokens)
            tok[row, :n] = torch.tensor(tokens)
            ids[:, row, :n] = torch.tensor([positions, segment, branch], dtype=torch.int32)
            lens[:, row] = torch.tensor([cache_len, n], dtype=torch.int32)
        self.tokens[:, :b].copy_(tok)
        self.ids[:, :, :b].copy_(ids)
        self.lens.copy_(lens)
        graph, out = self.graphs[b]
        graph.replay()
        return out
