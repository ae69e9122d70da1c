"""End to end: ``aspd_kernels.decoder.ParallelDecoder`` on random-weight models with real shapes, batch 1.

Weights are random (nothing can be downloaded; random weights do not change the speed): the model is built from a
``transformers`` config on the meta device, materialised on the target device in the target dtype and filled with
N(0, 0.02). Branch lengths are forced: ``max_new_tokens`` with no EOS.

Per model, for K branches of L new tokens each after a shared prefix:
- parallel: one ``generate_branches(prefix, K prompts, L)`` call, all branches in one sequence;
- serial: the same branches decoded one after another with the decoder's serial path, K calls
  ``generate_serial(prefix + prompt_j, L)``. Branch j's serial run is the same computation whatever K is, so the
  runs for j = 1..max K are made once per L and summed per K.
The speedup serial / parallel is compared with its physical limit K (a memory-bound step costs about as much for K
tokens as for one). The mixed workload follows ASPD's Vicuna statistics: 77.5% of the generated tokens in parallel
sections, 6.2 branches on average (answers with K = 6, 6, 6, 6, 7 and a serial suffix sized to 22.5%); its serial
baseline decodes the same number of tokens in one sequence.

Rates: bytes = parameter bytes x forward passes (each pass reads every weight once; the KV cache is left out, so
this is a lower bound); FLOP = 2 x parameters x generated tokens.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass

import torch

from .common import Context, row
from .timing import Timing

OP = "e2e"
MIXED_BRANCHES = (6, 6, 6, 6, 7)  # mean 6.2
MIXED_PARALLEL_FRACTION = 0.775

# Real shapes (config.json values of the public checkpoints); default rotary scaling, which does not change speed.
MODELS = {
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # CPU only: a tiny Llama so that the harness runs in seconds; its numbers say nothing about GPUs
    "tiny-llama-cpu": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                           rms_norm_eps=1e-6, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class E2ECase:
    model: str
    ks: tuple  # K sweep at length sweep_len
    sweep_len: int
    lengths: tuple  # L sweep at K = sweep_k
    sweep_k: int
    mixed_len: int  # branch length of the mixed workload
    prefix: int
    prompt: int  # tokens of each branch prompt

    def key(self) -> str:
        return self.model

    def as_dict(self) -> dict:
        return asdict(self)


def cases(ctx: Context, models: list[str] | None = None) -> list[E2ECase]:
    if not ctx.cuda:
        return [E2ECase("tiny-llama-cpu", (1, 2, 4), 8, (), 4, 4, 16, 2)]
    names = models or ["llama-3.2-1b", "llama-3-8b", "qwen2.5-7b"]
    if ctx.grid == "quick":
        return [E2ECase(m, (1, 8), 64, (), 8, 64, 128, 4) for m in names]
    return [E2ECase(m, (1, 2, 4, 8, 16), 128, (64, 256, 512), 8, 128, 128, 4) for m in names]


def random_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A ``transformers`` causal LM of ``MODELS[name]``'s shape with N(0, 0.02) weights (norms at 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(MODELS[name])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:  # transformers 4.x spelling
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.fill_(1.0)
            elif pname.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for mod in model.modules():  # to_empty left the rotary buffers uninitialised: rebuild them
            if hasattr(mod, "inv_freq") and hasattr(mod, "config"):
                fresh = type(mod)(mod.config)
                for bname, buf in fresh.named_buffers():
                    getattr(mod, bname).copy_(buf)
    return model.eval()


def _wall(ctx: Context, fn):
    """``(result, median wall-clock ms)``: one run on a GPU (runs of seconds, stable), the median of three on a CPU,
    where a shared machine's load swings single runs of a tiny model by several times."""
    times = []
    for _ in range(1 if ctx.cuda else 3):
        if ctx.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if ctx.cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return out, sorted(times)[len(times) // 2]


def _check_lengths(res, want: list[int], what: str) -> None:
    got = [len(b) for b in res.branches]
    if got != want:
        raise RuntimeError(f"{what}: the decoder returned branch lengths {got}, expected {want} (no EOS was given)")


def _check_serial(res, want: int, what: str) -> None:
    if len(res.suffix) != want:
        raise RuntimeError(f"{what}: the decoder generated {len(res.suffix)} tokens, expected {want} "
                           "(no EOS was given)")


def run_case(ctx: Context, case: E2ECase) -> list[dict]:
    try:
        from aspd_kernels.decoder import ParallelDecoder
    except Exception as exc:  # noqa: BLE001 - a missing decoder is an error row, never a faked number
        return [row(ctx, OP, backend="auto", status="error", shape={"model": case.model},
                    reason=f"aspd_kernels.decoder is not usable: {type(exc).__name__}: {exc}")]
    from aspd_kernels._dispatch import resolve

    dev, dt = ctx.device, ctx.dtype
    hf = random_model(case.model, dev, dt)
    n_params = sum(p.numel() for p in hf.parameters())
    p_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    spec = MODELS[case.model]
    shape = {"model": case.model, "params": n_params, "layers": spec["num_hidden_layers"],
             "hidden": spec["hidden_size"], "Hq": spec["num_attention_heads"], "Hkv": spec["num_key_value_heads"],
             "vocab": spec["vocab_size"], "B": 1}
    backend = resolve("branch_attention_with_kvcache", dev)
    max_k = max(case.ks + (case.sweep_k,) + MIXED_BRANCHES)
    max_len = max(case.lengths + (case.sweep_len,) + (case.mixed_len,))
    mixed_suffix = round(max(MIXED_BRANCHES) * case.mixed_len * (1 - MIXED_PARALLEL_FRACTION)
                         / MIXED_PARALLEL_FRACTION)
    need = case.prefix + max_k * (case.prompt + max_len) + mixed_suffix + 64
    serial_need = case.prefix + case.prompt + max(MIXED_BRANCHES) * case.mixed_len + mixed_suffix + 64
    dec = ParallelDecoder.from_hf(hf, device=dev, dtype=dt, max_seq_len=max(need, serial_need))
    gen = torch.Generator().manual_seed(1)
    vocab = spec["vocab_size"]
    prefix = torch.randint(100, vocab, (case.prefix,), generator=gen).tolist()
    prompts = [torch.randint(100, vocab, (case.prompt,), generator=gen).tolist() for _ in range(max_k)]

    def parallel(k: int, length: int, **kw):
        res, ms = _wall(ctx, lambda: dec.generate_branches(prefix, prompts[:k], length, eos_token_id=None, **kw))
        _check_lengths(res, [length] * k, f"K={k} L={length}")
        return res, ms

    rows: list[dict] = []

    def emit(k, length, par, par_ms, serial_ms, serial_passes, serial_runs, kind, limit):
        layout = {"K": k, "branch_len": length, "prefix": case.prefix, "prompt": case.prompt, "workload": kind}
        tokens = par.generated_tokens
        base = dict(shape=shape, layout=layout, dtype=dt)
        r = row(ctx, OP, backend=backend, timing=Timing(par_ms, par_ms, par_ms, 1, "wall"),
                nbytes=p_bytes * par.forward_passes,
                flops=2 * n_params * tokens, **base)
        r["ratio"] = {"serial": serial_ms / par_ms}
        r["e2e"] = {"tokens_per_s": tokens / (par_ms * 1e-3), "generated_tokens": tokens,
                    "forward_passes": par.forward_passes, "prefill_ms": par.prefill_s * 1e3,
                    "decode_ms": par.decode_s * 1e3, "speedup": serial_ms / par_ms, "speedup_limit": limit,
                    "serial_forward_passes": serial_passes, "serial_runs": serial_runs}
        s = row(ctx, OP, baseline="serial", timing=Timing(serial_ms, serial_ms, serial_ms, 1, "wall"),
                nbytes=p_bytes * serial_passes, flops=2 * n_params * tokens, **base)
        s["e2e"] = {"tokens_per_s": tokens / (serial_ms * 1e-3), "generated_tokens": tokens,
                    "forward_passes": serial_passes, "serial_runs": serial_runs}
        rows.extend([r, s])
        if ctx.stream is not None:  # the 8B grid takes minutes: each finished pair is kept at once
            ctx.stream(r)
            ctx.stream(s)

    try:
        # warm-up for every step width that will be timed: kernel compilation, autotuning and CUDA-graph capture
        # (one graph per number of live branches) stay out of the timings
        for k in sorted(set(case.ks) | {case.sweep_k} | set(MIXED_BRANCHES)):
            parallel(k, 3)
        dec.generate_serial(prefix + prompts[0], 3, eos_token_id=None)
        sweeps = [(k, case.sweep_len) for k in case.ks] + [(case.sweep_k, n) for n in case.lengths]
        for length in sorted({n for _, n in sweeps}):
            ks = [k for k, n in sweeps if n == length]
            singles = []  # branch j decoded alone: [(ms, forward passes)]
            for j in range(max(ks)):
                res, ms = _wall(ctx, lambda: dec.generate_serial(prefix + prompts[j], length, eos_token_id=None))
                _check_serial(res, length, f"serial branch {j + 1} L={length}")
                singles.append((ms, res.forward_passes))
            for k in ks:
                par, par_ms = parallel(k, length)
                emit(k, length, par, par_ms, sum(m for m, _ in singles[:k]), sum(p for _, p in singles[:k]),
                     f"{k} runs of one branch", "branches", k)
        # mixed workload: a serial suffix after each section gives 22.5% of the tokens
        par_ms = ser_ms = 0.0
        par_passes = ser_passes = tokens = 0
        for k in MIXED_BRANCHES:
            suffix = round(k * case.mixed_len * (1 - MIXED_PARALLEL_FRACTION) / MIXED_PARALLEL_FRACTION)
            res, ms = _wall(ctx, lambda: dec.generate_branches(prefix, prompts[:k], case.mixed_len, eos_token_id=None,
                                                               suffix_ids=[prompts[0][0]], max_suffix_tokens=suffix))
            _check_lengths(res, [case.mixed_len] * k, f"mixed K={k}")
            if len(res.suffix) != suffix:
                raise RuntimeError(f"mixed K={k}: suffix of {len(res.suffix)} tokens, expected {suffix}")
            par_ms, par_passes, tokens = par_ms + ms, par_passes + res.forward_passes, tokens + res.generated_tokens
            total = k * case.mixed_len + suffix  # the same tokens decoded in one sequence, one per step
            sres, sms = _wall(ctx, lambda: dec.generate_serial(prefix + prompts[0], total, eos_token_id=None))
            _check_serial(sres, total, f"mixed serial K={k}")
            ser_ms, ser_passes = ser_ms + sms, ser_passes + sres.forward_passes
        n_answers = len(MIXED_BRANCHES)
        mean_k = sum(MIXED_BRANCHES) / n_answers
        limit = 1.0 / ((1 - MIXED_PARALLEL_FRACTION) + MIXED_PARALLEL_FRACTION / mean_k)
        layout = {"K": mean_k, "branch_len": case.mixed_len, "prefix": case.prefix, "prompt": case.prompt,
                  "workload": "mixed", "answers": n_answers, "parallel_fraction": MIXED_PARALLEL_FRACTION}
        base = dict(shape=shape, layout=layout, dtype=dt)
        r = row(ctx, OP, backend=backend, timing=Timing(par_ms / n_answers, 0, 0, n_answers, "wall"),
                nbytes=p_bytes * par_passes // n_answers, flops=2 * n_params * tokens // n_answers, **base)
        r["ms_p25"] = r["ms_p75"] = None
        r["ratio"] = {"serial": ser_ms / par_ms}
        r["e2e"] = {"tokens_per_s": tokens / (par_ms * 1e-3), "generated_tokens": tokens, "forward_passes": par_passes,
                    "speedup": ser_ms / par_ms, "speedup_limit": limit, "serial_forward_passes": ser_passes,
                    "serial_runs": "one sequence of the same length per answer"}
        s = row(ctx, OP, baseline="serial", timing=Timing(ser_ms / n_answers, 0, 0, n_answers, "wall"),
                nbytes=p_bytes * ser_passes // n_answers, flops=2 * n_params * tokens // n_answers, **base)
        s["ms_p25"] = s["ms_p75"] = None
        s["e2e"] = {"tokens_per_s": tokens / (ser_ms * 1e-3), "generated_tokens": tokens, "forward_passes": ser_passes}
        rows.extend([r, s])
        if ctx.stream is not None:  # the 8B grid takes minutes: each finished pair is kept at once
            ctx.stream(r)
            ctx.stream(s)
    except Exception as exc:  # noqa: BLE001
        kind = "out of memory" if isinstance(exc, torch.cuda.OutOfMemoryError) else type(exc).__name__
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" (at {tb[-1].filename.split('/')[-1]}:{tb[-1].lineno})" if tb else ""
        rows.append(row(ctx, OP, backend=backend, status="error", shape=shape,
                        reason=f"{kind}: {str(exc)[:300]}{where}"))
    finally:
        del dec, hf
        if ctx.cuda:
            torch.cuda.empty_cache()
    return rows
