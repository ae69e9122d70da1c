"""The plugin's attention backend against vLLM's own CPU attention (``CPU_ATTN``), in process, no engine: the same
paged batch (mixed query and context lengths, a shuffled block table) through both backends' builder, cache writer
and forward, as vLLM's ``tests/v1/attention`` backend-correctness harness drives them (that harness itself:
``bench/vllm_harness.py``).

- a step without a layout (causal, non-causal, per-request causality; ``auto`` cache) is CPU_ATTN's, bit for bit,
  and right (a float64 dense reference; non-causal never comes out causal);
- a step with a layout runs the op over CPU_ATTN's own (key-packed) cache: equal to the reference under the branch
  mask, for every ISA key packing this machine has (block sizes 16 and 32);
- fp8 cache and a sliding window (what the op does not compute): the layer *is* stock CPU_ATTN, bit for bit;
- a step carrying a layout on such a layer, or non-causal, raises instead of ignoring it.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402
from vllm_helpers import save_tiny  # noqa: E402

from aspd_kernels.vllm.backend import AspdAttentionBackend, _IdCache  # noqa: E402
from aspd_kernels.vllm.layout import StepIds  # noqa: E402

HQ, HKV, D, BS, NBLK = 4, 2, 32, 32, 24  # the tiny Llama's attention shape; 32-token blocks
# (context, new tokens) per request: decode rows, a chunk after a cached prefix, a whole prefill
BATCH = ((40, 1), (70, 9), (0, 37), (31, 1))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    save_tiny("llama", path)
    return path


def _config(path: str, dtype: str, cache_dtype: str) -> VllmConfig:
    mc = ModelConfig(model=path, tokenizer=path, skip_tokenizer_init=True, dtype=dtype, max_model_len=512)
    return VllmConfig(model_config=mc, cache_config=CacheConfig(block_size=BS, cache_dtype=cache_dtype))


def _batch(causal, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seq = [c + q for c, q in BATCH]
    qlen = [q for _, q in BATCH]
    qsl = torch.tensor([0, *np.cumsum(qlen)], dtype=torch.int32)
    perm = torch.randperm(NBLK, generator=g)
    per = max((s + BS - 1) // BS for s in seq)
    table = perm[:len(seq) * per].view(len(seq), per).to(torch.int32)
    slots_all = [[int(table[b, t // BS]) * BS + t % BS for t in range(s)] for b, s in enumerate(seq)]
    new_slots = torch.tensor([x for b, (c, _) in enumerate(BATCH) for x in slots_all[b][c:]], dtype=torch.int64)
    m = CommonAttentionMetadata(query_start_loc=qsl, query_start_loc_cpu=qsl.clone(),
                                seq_lens=torch.tensor(seq, dtype=torch.int32), num_reqs=len(seq),
                                num_actual_tokens=int(qsl[-1]), max_query_len=max(qlen), max_seq_len=max(seq),
                                block_table_tensor=table, slot_mapping=new_slots, causal=causal)
    return m, slots_all, seq, qlen


def _run(backend, cfg, m, slots_all, seq, qlen, dtype, cache_dtype, window=None, seed=1):
    """One layer through ``backend``: every token's K/V written by its writer, then the new tokens' attention."""
    g = torch.Generator().manual_seed(seed)
    q_all = [torch.randn(s, HQ, D, generator=g).to(dtype) for s in seq]
    k_all = [torch.randn(s, HKV, D, generator=g).to(dtype) for s in seq]
    v_all = [torch.randn(s, HKV, D, generator=g).to(dtype) for s in seq]
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=HKV, head_size=D, dtype=dtype, sliding_window=window)
    with set_current_vllm_config(cfg):
        builder = backend.get_builder_cls()(spec, ["layer.0"], cfg, torch.device("cpu"))
        builder.window_size = -1 if window is None else window  # what registered layers would have set
        impl = backend.get_impl_cls()(HQ, D, D ** -0.5, HKV, None, window, cache_dtype)
        layer = types.SimpleNamespace(isa=builder.isa, _k_scale_float=1.0, _v_scale_float=1.0)
        kv_dtype = torch.uint8 if cache_dtype != "auto" else dtype
        kv = torch.zeros(NBLK, HKV, BS, 2 * D, dtype=kv_dtype)
        slots = torch.tensor([x for s in slots_all for x in s], dtype=torch.int64)
        impl.do_kv_cache_update(layer, torch.cat(k_all), torch.cat(v_all), kv, slots)
        md = builder.build(0, m)
        q = torch.cat([qa[s - n:] for qa, s, n in zip(q_all, seq, qlen)])
        out = torch.full_like(q, float("nan"))
        impl.forward(layer, q, None, None, kv, md, out)
    return out, (q_all, k_all, v_all)


def _reference(qkv, seq, qlen, causal, window=None, ids=None) -> torch.Tensor:
    """Dense float64 attention; ``ids[b]`` = (segment, branch) of request b's new tokens (its context is 0/0)."""
    q_all, k_all, v_all = qkv
    outs = []
    for b, (s, n) in enumerate(zip(seq, qlen)):
        q = q_all[b][s - n:].double().transpose(0, 1)
        k = k_all[b].double().repeat_interleave(HQ // HKV, 1).transpose(0, 1)
        v = v_all[b].double().repeat_interleave(HQ // HKV, 1).transpose(0, 1)
        sc = q @ k.transpose(1, 2) * D ** -0.5
        qpos, kpos = torch.arange(s - n, s)[:, None], torch.arange(s)[None, :]
        c = bool(causal[b]) if isinstance(causal, torch.Tensor) else causal
        keep = (kpos <= qpos) if c else torch.ones(n, s, dtype=torch.bool)
        if window is not None:
            keep &= kpos > qpos - window
        if ids is not None:
            sg, bb = (torch.cat([torch.zeros(s - n, dtype=torch.long), torch.from_numpy(x).long()]) for x in ids[b])
            keep &= (sg[None, :] != sg[s - n:, None]) | (bb[None, :] == bb[s - n:, None])
        outs.append((sc.masked_fill(~keep, float("-inf")).softmax(-1) @ v).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", ["causal", "non-causal", "per-request"])
def test_auto_cache_equals_stock_and_reference(model_dir, dtype, causal):
    StepIds.seg = np.zeros(0, np.int32)  # no runner step recorded: plain text
    c = {"causal": True, "non-causal": False, "per-request": torch.tensor([1, 0, 0, 1], dtype=torch.int32)}[causal]
    cfg = _config(model_dir, dtype, "auto")
    tdt = getattr(torch, dtype)
    m, slots, seq, qlen = _batch(c)
    stock, qkv = _run(CPUAttentionBackend, cfg, m, slots, seq, qlen, tdt, "auto")
    ours, _ = _run(AspdAttentionBackend, cfg, m, slots, seq, qlen, tdt, "auto")
    tol = 2e-5 if dtype == "float32" else 2e-2
    assert (stock.double() - _reference(qkv, seq, qlen, c)).abs().max() < tol
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_layout_step_reads_cpu_attn_cache_under_the_branch_mask(model_dir, dtype, block_size, monkeypatch):
    """The whole-prefill request's new tokens form two branches of one section (segment 1): branch 2 must not see
    branch 1; everything else (the other requests, all context) is plain (ids 0/0)."""
    monkeypatch.setitem(globals(), "BS", block_size)
    _IdCache.seg = _IdCache.br = None  # no ids left over from another test
    m, slots, seq, qlen = _batch(True)
    n = int(m.query_start_loc_cpu[-1])
    seg, br = np.zeros(n, np.int32), np.zeros(n, np.int32)
    start = int(m.query_start_loc_cpu[2])  # request 2: 37 new tokens, no context
    seg[start:start + 37], br[start:start + 20], br[start + 20:start + 37] = 1, 1, 2
    StepIds.seg, StepIds.br, StepIds.has_layout = seg, br, True
    try:
        cfg = _config(model_dir, dtype, "auto")
        tdt = getattr(torch, dtype)
        ours, qkv = _run(AspdAttentionBackend, cfg, m, slots, seq, qlen, tdt, "auto")
        stock, _ = _run(CPUAttentionBackend, cfg, m, slots, seq, qlen, tdt, "auto")
    finally:
        StepIds.seg, StepIds.br, StepIds.has_layout = np.zeros(0, np.int32), np.zeros(0, np.int32), False
    ids = [(seg[a:a + q], br[a:a + q]) for a, q in zip(m.query_start_loc_cpu[:-1].tolist(), qlen)]
    ref = _reference(qkv, seq, qlen, True, ids=ids)
    tol = 2e-5 if dtype == "float32" else 2e-2
    assert (ours.double() - ref).abs().max() < tol
    # the mask mattered: stock (plain causal) differs on branch 2's rows only
    rows = torch.zeros(n, dtype=torch.bool)
    rows[start + 20:start + 37] = True
    assert (stock[rows].double() - ref[rows]).abs().max() > 10 * tol
    assert (stock[~rows].double() - ref[~rows]).abs().max() < tol


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("what", ["fp8", "sliding-window"])
def test_what_the_op_does_not_do_is_stock(model_dir, causal, what):
    """fp8 caches and sliding windows: our backend *is* CPU_ATTN on those layers (bit-identical output)."""
    if what == "fp8" and not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        pytest.skip("vLLM's CPU fp8 KV cache needs AVX-512 or AMX")
    StepIds.seg = np.zeros(0, np.int32)
    cache_dtype, window = ("fp8", None) if what == "fp8" else ("auto", 16)
    cfg = _config(model_dir, "bfloat16", cache_dtype)
    m, slots, seq, qlen = _batch(causal)
    stock, qkv = _run(CPUAttentionBackend, cfg, m, slots, seq, qlen, torch.bfloat16, cache_dtype, window)
    ours, _ = _run(AspdAttentionBackend, cfg, m, slots, seq, qlen, torch.bfloat16, cache_dtype, window)
    assert torch.equal(ours, stock)
    if what == "sliding-window" and causal:  # and it is right (stock's, not ours, decides the window)
        assert (ours.double() - _reference(qkv, seq, qlen, causal, window)).abs().max() < 3e-2


def test_a_layout_where_the_op_cannot_apply_it_raises(model_dir):
    m, slots, seq, qlen = _batch(True)
    n = int(m.query_start_loc_cpu[-1])
    StepIds.seg, StepIds.br, StepIds.has_layout = np.ones(n, np.int32), np.ones(n, np.int32), True
    try:
        cfg = _config(model_dir, "bfloat16", "auto")
        with pytest.raises(ValueError, match="sliding_window=16"):
            _run(AspdAttentionBackend, cfg, m, slots, seq, qlen, torch.bfloat16, "auto", window=16)
        m2, slots, seq, qlen = _batch(False)
        with pytest.raises(ValueError, match="non-causal"):
            _run(AspdAttentionBackend, cfg, m2, slots, seq, qlen, torch.bfloat16, "auto")
    finally:
        StepIds.seg, StepIds.br, StepIds.has_layout = np.zeros(0, np.int32), np.zeros(0, np.int32), False


def test_only_a_segment_with_two_branches_needs_the_mask():
    from aspd_kernels.vllm.layout import needs_mask

    def lay(seg, br):
        return {"seg": seg, "br": br, "pos": list(range(len(seg)))}

    assert not needs_mask(lay([0, 0, 0], [0, 0, 0]))        # plain text
    assert not needs_mask(lay([0, 0, 1, 1], [0, 0, 1, 1]))  # one branch run as its own request
    assert not needs_mask(lay([0, 1, 2, 2], [0, 1, 0, 2]))  # one branch in each of two segments
    assert needs_mask(lay([0, 1, 1, 1], [0, 1, 2, 2]))      # two siblings: the join of a section
