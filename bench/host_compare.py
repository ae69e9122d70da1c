"""Two same-process comparisons on the CPU: the decoder's decode step against transformers' ``generate`` step on
the same tiny Llama, and the torch backend's attention against SDPA with a dense mask (forward, forward+backward,
the decoding op), plus the peak memory of a 32k-token call. Ratios are baseline time / ours (> 1: ours faster),
each from the minimum of many runs of both, interleaved, so that a busy shared machine slows both alike.
"""
from __future__ import annotations

import resource
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from aspd_kernels import branch_attention, branch_attention_with_kvcache
from aspd_kernels.reference import dense_mask
from aspd_kernels.torch_backend.step_cache import step_scope

from .cases import build_layout


def min_pair(ours: Callable[[], object], base: Callable[[], object], reps: int) -> tuple[float, float]:
    """Minimum seconds of each over ``reps`` interleaved runs (after one warm-up each)."""
    ours(), base()
    a = b = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        ours()
        a = min(a, time.perf_counter() - t)
        t = time.perf_counter()
        base()
        b = min(b, time.perf_counter() - t)
    return a, b


# ---------------------------------------------------------------------------------------------- decoder step


def tiny_llama(layers: int = 2):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(cfg).eval()


def decoder_vs_transformers(layers: int = 2, short: int = 16, long: int = 48, reps: int = 7) -> dict:
    """Host time per decode step (us): ``(t(long) - t(short)) / (long - short)`` of greedy decoding, so the prefill
    and the per-call setup cancel, for ``ParallelDecoder.generate_serial`` and ``model.generate``."""
    from aspd_kernels.decoder import ParallelDecoder

    model = tiny_llama(layers)
    dec = ParallelDecoder.from_hf(model, max_seq_len=256)
    prompt = list(range(1, 9))
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def ours(n: int) -> Callable[[], object]:
        return lambda: dec.generate_serial(prompt, n)

    def hf(n: int) -> Callable[[], object]:
        # min_new_tokens: the random model must not stop early on an EOS
        return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)

    with torch.no_grad():
        o_long, h_long = min_pair(ours(long), hf(long), reps)
        o_short, h_short = min_pair(ours(short), hf(short), reps)
    per = long - short
    o, h = (o_long - o_short) / per * 1e6, (h_long - h_short) / per * 1e6
    return dict(layers=layers, ours_us=o, transformers_us=h, ratio=h / o)


# ---------------------------------------------------------------------------------------------- CPU attention


def attention_ratios(sizes=(512, 2048, 8192), k: int = 16, hq: int = 8, hkv: int = 2, d: int = 64,
                     reps: int = 3) -> list[dict]:
    """``branch_attention`` forward and forward+backward against SDPA with the dense mask (prebuilt, heads
    pre-repeated: the baseline's setup is not timed), and the decoding op against SDPA over the cache."""
    out = []
    g = hq // hkv
    for n in sizes:
        seg, br, _ = build_layout(n, k, "interleaved", decode=False)
        q, kk, v = (torch.randn(n, h, d) for h in (hq, hkv, hkv))
        cu = torch.tensor([0, n], dtype=torch.int32)
        mask = dense_mask(seg, br)
        qb, kb, vb = (t.transpose(0, 1)[None].contiguous() for t in (q, kk.repeat_interleave(g, 1),
                                                                    v.repeat_interleave(g, 1)))
        fwd = min_pair(lambda: branch_attention(q, kk, v, seg, br, cu, cu, n, n, check_values=False),
                       lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask), reps)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, kk, v))
        qbg, kbg, vbg = (t.clone().requires_grad_() for t in (qb, kb, vb))
        bwd = min_pair(
            lambda: branch_attention(qg, kg, vg, seg, br, cu, cu, n, n, check_values=False).sum().backward(),
            lambda: F.scaled_dot_product_attention(qbg, kbg, vbg, attn_mask=mask).sum().backward(), reps)
        dseg, dbr, _ = build_layout(n, k, "interleaved", decode=True)
        qd = torch.randn(1, k, hq, d)
        kc, vc = torch.randn(1, n, hkv, d), torch.randn(1, n, hkv, d)
        lens = torch.tensor([n], dtype=torch.int32)
        dmask = dense_mask(dseg, dbr)[n - k:]
        qdb = qd[0].transpose(0, 1)[None].contiguous()
        kcb, vcb = (t[0].repeat_interleave(g, 1).transpose(0, 1)[None].contiguous() for t in (kc, vc))
        ids, qlens = (dseg[None], dbr[None]), torch.tensor([k], dtype=torch.int32)
        step = lambda: branch_attention_with_kvcache(qd, kc, vc, lens, *ids, None, qlens,  # noqa: E731
                                                     check_values=False)
        dense = lambda: F.scaled_dot_product_attention(qdb, kcb, vcb, attn_mask=dmask)  # noqa: E731
        # a decoding call is short and the machine shared: the minimum of many interleaved runs (15 moved the ratio
        # at N = 512 by 0.1 between runs; 100 holds it to a few hundredths)
        dec_reps = max(reps * 5, 100)
        dec = min_pair(step, dense, dec_reps)
        # a later layer of the same step: the row plan built from the ids is shared (step_scope, as the decoder
        # runs), as the baseline's mask is built once outside its timing
        with step_scope():
            step()
            dec_layer = min_pair(step, dense, dec_reps)
        for name, (o, b) in (("forward", fwd), ("forward+backward", bwd), ("decode (K queries), plan per call", dec),
                             ("decode, a later layer of the step (plan shared)", dec_layer)):
            out.append(dict(n=n, what=name, ours_ms=o * 1e3, sdpa_ms=b * 1e3, ratio=b / o))
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_child(n: int) -> None:
    seg, br, _ = build_layout(n, 16, "interleaved", decode=False)
    q, k, v = (torch.randn(n, h, 64) for h in (2, 1, 1))
    cu = torch.tensor([0, n], dtype=torch.int32)
    try:  # Linux: "5" resets the peak resident size, so the setup's own peak does not hide the call's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, peak_of = _status_kib("VmRSS"), lambda: _status_kib("VmHWM")
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    branch_attention(q, k, v, seg, br, cu, cu, n, n, check_values=False)
    print(base, peak_of())


def peak_memory_mib(n: int = 32768) -> dict:
    """Peak resident memory of one ``branch_attention`` forward at ``n`` tokens (Hq/Hkv 2/1, D 64), in a fresh
    process: the growth of the peak resident size over the resident size after the inputs were built (what the
    call allocates at its peak) and that peak."""
    code = f"from bench.host_compare import _peak_child; _peak_child({n})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak = (int(x) for x in run.stdout.split())
    return dict(n=n, call_mib=(peak - base) / 1024, process_mib=peak / 1024)
