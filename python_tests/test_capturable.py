"""A decode step must be capturable by a CUDA graph: nothing on its path may read a device value on the host
(``.item()``, ``int(t)``, ``.tolist()``, a data-dependent shape). A capture would fail on the first such read --
and the decoder would fall back to eager decoding with a warning, silently losing the graphs' speed.

No GPU is needed to prove it: the same path runs on the ``meta`` device, where tensors have shapes but no values,
so any host read raises. The controls show that each check really sees a host read when there is one.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from test_decoder_helpers import decoder, tiny_model

from aspd_kernels.decoder.cache import KVCache
from aspd_kernels.decoder.graphs import DecodeGraphs

# the package re-exports functions under the modules' names: take the modules themselves
triton_decode = importlib.import_module("aspd_kernels.triton.branch_attention_with_kvcache")
triton_rope = importlib.import_module("aspd_kernels.triton.rope_append_kv")

META = torch.device("meta")


def _meta_decoder_step(bucket: int, batch: int = 1):
    """(model on meta, cache of ``batch`` rows on meta, the graph's static Batch for ``bucket`` new tokens)."""
    model = decoder(tiny_model("qwen2"), max_seq_len=64).model
    cfg = model.config
    meta_model = model.to(META)
    cache = KVCache(cfg.num_layers, batch, 64, cfg.num_kv_heads, cfg.head_dim, torch.float32, META)
    graphs = DecodeGraphs(meta_model, cache, buckets=(1, 2, 4, 8))
    return meta_model, cache, graphs._batch(bucket)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bucket", [1, 8])
def test_decode_step_reads_no_device_value(bucket, rows):
    """Batched decoding too (max_batch > 1): the graph of every bucket covers all cache rows."""
    model, cache, batch = _meta_decoder_step(bucket, rows)
    out = model.step(batch, cache, check_values=False)  # what DecodeGraphs captures
    assert out.device == META and out.shape == (rows, bucket, model.config.vocab_size)


def test_control_meta_step_sees_the_value_checks():
    """check_values=True reads cache_seqlens on the host: on meta that must raise, or the test above proves
    nothing."""
    model, cache, batch = _meta_decoder_step(4)
    with pytest.raises(RuntimeError, match="meta"):
        model.step(batch, cache, check_values=True)


class _Launches:
    """Stands in for a ``@triton.jit`` kernel: records the grid and the arguments of each launch."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
        return launch


def _decode_inputs(paged: bool):
    b, lq, hq, hkv, d, cap, page = 2, 8, 8, 2, 64, 256, 16
    q = torch.empty(b, lq, hq, d, dtype=torch.bfloat16, device=META)
    if paged:
        k = torch.empty(b * cap // page, page, hkv, d, dtype=torch.bfloat16, device=META)
        ids = torch.empty(b * cap // page, page, dtype=torch.int32, device=META)
        table = torch.empty(b, cap // page, dtype=torch.int32, device=META)
    else:
        k = torch.empty(b, cap, hkv, d, dtype=torch.bfloat16, device=META)
        ids = torch.empty(b, cap, dtype=torch.int32, device=META)
        table = None
    lens = torch.empty(b, dtype=torch.int32, device=META)
    return q, k, ids, lens, table


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_triton_decode_launch_reads_no_device_value(monkeypatch, paged, splits):
    """The Triton wrapper picks tiles, splits and the grid from shapes only: the same launch on every replay."""
    launches = _Launches()
    monkeypatch.setattr(triton_decode, "_decode_kernel", launches)
    monkeypatch.setattr(triton_decode, "_merge_kernel", launches)
    q, k, ids, lens, table = _decode_inputs(paged)
    out = triton_decode.branch_attention_with_kvcache(q, k, k, lens, ids, ids, lens, table, 0.125, num_splits=splits)
    assert out.shape == q.shape and out.device == META
    grid = launches.calls[0][0]
    used = grid[2]
    assert len(launches.calls) == (2 if used > 1 else 1)
    if splits is not None:
        assert used == splits


def test_triton_rope_launch_reads_no_device_value(monkeypatch):
    launches = _Launches()
    monkeypatch.setattr(triton_rope, "_rope_append_kernel", launches)
    q, k, ids, lens, table = _decode_inputs(paged=True)
    kv = torch.empty(2, 8, 2, 64, dtype=torch.bfloat16, device=META)
    positions = torch.empty(2, 8, dtype=torch.int64, device=META)
    cos_sin = torch.empty(512, 64, dtype=torch.float32, device=META)
    new_ids = torch.empty(2, 8, dtype=torch.int32, device=META)
    q_rot = triton_rope.rope_append_kv(q, kv, kv, positions, cos_sin, k, k, ids, ids, lens, new_ids, new_ids, lens,
                                       table)
    assert q_rot.shape == q.shape and len(launches.calls) == 1


def test_control_meta_sees_a_host_read():
    """The premise of this file: on meta, a host read of a value raises."""
    with pytest.raises(RuntimeError, match="meta"):
        int(torch.empty(2, dtype=torch.int32, device=META).max())
