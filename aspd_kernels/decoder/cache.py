"""The static KV cache: allocated once per decoder, written in place by ``rope_append_kv``."""
from __future__ import annotations

import torch


class KVCache:
    """Fixed buffers for ``num_layers`` layers of ``batch`` sequences of up to ``max_seq_len`` tokens.

    ``k, v``: ``[num_layers, batch, max_seq_len, Hkv, D]`` (``k[i]`` is layer i's contiguous cache, ``layers[i]``
    the pair of views ``(k[i], v[i])``);
    ``segment, branch``: int32 ``[batch, max_seq_len]``, shared by every layer: each layer's append writes the same
    ids, so one copy suffices. Slots at or beyond a sequence's length hold stale data that no op reads.
    """

    def __init__(self, num_layers: int, batch: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, batch, max_seq_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.segment = torch.zeros((batch, max_seq_len), dtype=torch.int32, device=device)
        self.branch = torch.zeros((batch, max_seq_len), dtype=torch.int32, device=device)
        self.max_seq_len = max_seq_len
        # each layer's (k, v) views, made once: indexing k[i] in every layer of every step is two aten calls
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.segment, self.branch))
