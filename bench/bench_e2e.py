"""End to end: ``aspd_kernels.decoder.ParallelDecoder`` at batch 1, on the real SmolLM2-135M-Instruct (the CPU
default: a real question and "1.", "2.", ... as branch prompts, and a real answer printed beside the speedup) or
on random-weight models with real shapes (the GPU grid: random weights do not change the speed; each is built from
a ``transformers`` config on the meta device, materialised on the target device in the target dtype and filled
with N(0, 0.02)). Branch lengths are forced: ``max_new_tokens`` with no EOS.

Timing: every run of a case (each parallel K and each serial branch) is made once per round, rounds interleaved,
and each keeps its fastest round (one round on a GPU, three on a CPU). A shared CPU's load drifts by several times
within seconds, so blocks of serial runs timed before the parallel ones once gave "1.89x" at K = 1, whose limit is
1.00x; a speedup still above its limit by more than 10% is flagged in the row (``e2e.over_limit``) and the report.

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
from tqdm import tqdm

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
    # CPU tests: a tiny Llama so that the harness runs in seconds; its numbers say nothing about GPUs
    "tiny-llama-cpu": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                           rms_norm_eps=1e-6, tie_word_embeddings=False),
}


# real models (aspd_kernels.models names): the question all branches share, then "1.", "2.", ... one per branch
REAL = {"smollm2-135m": "smollm2"}
QUESTION = "Give four tips for a healthy life."  # K <= 4 on a CPU: the example answer has four items
OVER_LIMIT = 1.10  # a speedup this far above its physical limit is noise, not a result


@dataclass(frozen=True)
class E2ECase:
    model: str
    ks: tuple  # K sweep at length sweep_len
    sweep_len: int
    lengths: tuple  # L sweep at K = sweep_k
    sweep_k: int
    mixed_len: int  # branch length of the mixed workload (0: none)
    prefix: int  # random models: tokens of the shared prefix and of each branch prompt (real models: the text's)
    prompt: int

    def key(self) -> str:
        return self.model

    def as_dict(self) -> dict:
        return asdict(self)


def cases(ctx: Context, models: list[str] | None = None) -> list[E2ECase]:
    if not ctx.cuda:
        return [E2ECase(m, (1, 2, 4), 12, (), 4, 0, 0, 0) if m in REAL else E2ECase(m, (1, 2, 4), 8, (), 4, 4, 16, 2)
                for m in models or ["smollm2-135m"]]
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


def _timed(ctx: Context, jobs: dict, label: str) -> dict:
    """``{key: (result, ms)}`` for ``jobs`` (``{key: fn}``): every job once per round, the rounds interleaved (one on
    a GPU, where runs of seconds are stable; three on a CPU), each job's fastest round kept."""
    rounds = 1 if ctx.cuda else 3
    best: dict = {}
    with tqdm(total=rounds * len(jobs), desc=label, leave=False, dynamic_ncols=True) as bar:
        for _ in range(rounds):
            for key, fn in jobs.items():
                if ctx.cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = fn()
                if ctx.cuda:
                    torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) * 1e3
                if key not in best or ms < best[key][1]:
                    best[key] = (out, ms)
                bar.update()
    return best


def _check_lengths(res, want: list[int], what: str) -> None:
    got = [len(b) for b in res.branches]
    if got != want:
        raise RuntimeError(f"{what}: the decoder returned branch lengths {got}, expected {want} (no EOS was given)")


def _check_serial(res, want: int, what: str) -> None:
    if len(res.suffix) != want:
        raise RuntimeError(f"{what}: the decoder generated {len(res.suffix)} tokens, expected {want} "
                           "(no EOS was given)")


def _model(case: E2ECase, dev: torch.device, dt: torch.dtype, max_k: int):
    """``(source for ParallelDecoder.from_hf, tokenizer or None, prefix ids, max_k branch prompts, shape)``: a real
    model's directory, chat-templated question and "1.", "2.", ... prompts, or a random model and random ids."""
    if case.model in REAL:
        from transformers import AutoTokenizer

        from aspd_kernels.decoder.config import ModelConfig
        from aspd_kernels.models import resolve_model_path

        path = resolve_model_path(REAL[case.model])
        tok = AutoTokenizer.from_pretrained(path)
        text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                       tokenize=False)
        prefix = tok(text, add_special_tokens=False)["input_ids"]
        prompts = [tok(f"{j}.", add_special_tokens=False)["input_ids"] for j in range(1, max_k + 1)]
        with open(f"{path}/config.json") as f:
            cfg = ModelConfig.from_hf(__import__("json").load(f))
        dims = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size)
        return path, tok, prefix, prompts, dims
    hf = random_model(case.model, dev, dt)
    spec = MODELS[case.model]
    gen = torch.Generator().manual_seed(1)
    vocab = spec["vocab_size"]
    prefix = torch.randint(100, vocab, (case.prefix,), generator=gen).tolist()
    prompts = [torch.randint(100, vocab, (case.prompt,), generator=gen).tolist() for _ in range(max_k)]
    dims = (spec["num_hidden_layers"], spec["hidden_size"], spec["num_attention_heads"],
            spec["num_key_value_heads"], vocab)
    return hf, None, prefix, prompts, dims


def run_case(ctx: Context, case: E2ECase) -> list[dict]:
    try:
        from aspd_kernels.decoder import ParallelDecoder, distinct_starts
    except Exception as exc:  # noqa: BLE001 - a missing decoder is an error row, never a faked number
        return [row(ctx, OP, backend="auto", status="error", shape={"model": case.model},
                    reason=f"aspd_kernels.decoder is not usable: {type(exc).__name__}: {exc}")]
    from aspd_kernels._dispatch import resolve

    dev, dt = ctx.device, ctx.dtype
    mixed = MIXED_BRANCHES if case.mixed_len else ()
    max_k = max(case.ks + (case.sweep_k,) + mixed)
    max_len = max(case.lengths + (case.sweep_len,) + (case.mixed_len,))
    backend = resolve("branch_attention_with_kvcache", dev)
    try:
        source, tok, prefix, prompts, dims = _model(case, dev, dt, max_k)
    except Exception as exc:  # noqa: BLE001 - e.g. the real model cannot be built here: an error row, no number
        return [row(ctx, OP, backend=backend, status="error", shape={"model": case.model},
                    reason=f"the model is not available: {type(exc).__name__}: {str(exc)[:300]}")]
    mixed_suffix = round(max(mixed or (0,)) * case.mixed_len * (1 - MIXED_PARALLEL_FRACTION)
                         / MIXED_PARALLEL_FRACTION)
    long_prompt = max(map(len, prompts))
    need = len(prefix) + max_k * (long_prompt + max_len) + mixed_suffix + 64
    serial_need = len(prefix) + long_prompt + max(mixed or (0,)) * case.mixed_len + mixed_suffix + 64
    dec = ParallelDecoder.from_hf(source, device=dev, dtype=dt, max_seq_len=max(need, serial_need, 256))
    source = None
    params = list({p.data_ptr(): p for p in dec.model.parameters()}.values())  # tied embeddings counted once
    n_params = sum(p.numel() for p in params)
    p_bytes = sum(p.numel() * p.element_size() for p in params)
    shape = {"model": case.model, "params": n_params, "layers": dims[0], "hidden": dims[1], "Hq": dims[2],
             "Hkv": dims[3], "vocab": dims[4], "B": 1}
    rows: list[dict] = []

    def emit(k, length, par, par_ms, serial_ms, serial_passes, serial_runs, kind, limit):
        layout = {"K": k, "branch_len": length, "prefix": len(prefix), "prompt": long_prompt, "workload": kind}
        tokens = par.generated_tokens
        base = dict(shape=shape, layout=layout, dtype=dt)
        r = row(ctx, OP, backend=backend, timing=Timing(par_ms, par_ms, par_ms, 1, "wall"),
                nbytes=p_bytes * par.forward_passes,
                flops=2 * n_params * tokens, **base)
        r["ratio"] = {"serial": serial_ms / par_ms}
        r["e2e"] = {"tokens_per_s": tokens / (par_ms * 1e-3), "generated_tokens": tokens,
                    "forward_passes": par.forward_passes, "prefill_ms": par.prefill_s * 1e3,
                    "decode_ms": par.decode_s * 1e3, "speedup": serial_ms / par_ms, "speedup_limit": limit,
                    "serial_forward_passes": serial_passes, "serial_runs": serial_runs,
                    "over_limit": serial_ms / par_ms > OVER_LIMIT * limit}
        s = row(ctx, OP, baseline="serial", timing=Timing(serial_ms, serial_ms, serial_ms, 1, "wall"),
                nbytes=p_bytes * serial_passes, flops=2 * n_params * tokens, **base)
        s["e2e"] = {"tokens_per_s": tokens / (serial_ms * 1e-3), "generated_tokens": tokens,
                    "forward_passes": serial_passes, "serial_runs": serial_runs}
        rows.extend([r, s])
        if ctx.stream is not None:  # the 8B grid takes minutes: each finished pair is kept at once
            ctx.stream(r)
            ctx.stream(s)
        return r

    def parallel(k, length, **kw):
        return lambda: dec.generate_branches(prefix, prompts[:k], length, eos_token_id=None, **kw)

    def serial(j, length):
        return lambda: dec.generate_serial(prefix + prompts[j], length, eos_token_id=None)

    try:
        # warm-up for every step width that will be timed: kernel compilation, autotuning and CUDA-graph capture
        # (one graph per number of live branches) stay out of the timings
        for k in sorted(set(case.ks) | {case.sweep_k} | set(mixed)):
            parallel(k, 3)()
        serial(0, 3)()
        sweeps = [(k, case.sweep_len) for k in case.ks] + [(case.sweep_k, n) for n in case.lengths]
        last = None
        for length in sorted({n for _, n in sweeps}):
            ks = [k for k, n in sweeps if n == length]
            # branch j's serial run is the same whatever K is: made once per L, summed per K
            jobs = {("serial", j): serial(j, length) for j in range(max(ks))}
            jobs.update({("parallel", k): parallel(k, length) for k in ks})
            got = _timed(ctx, jobs, f"e2e {case.model} L={length}")
            for j in range(max(ks)):
                _check_serial(got[("serial", j)][0], length, f"serial branch {j + 1} L={length}")
            for k in ks:
                par, par_ms = got[("parallel", k)]
                _check_lengths(par, [length] * k, f"K={k} L={length}")
                singles = [got[("serial", j)] for j in range(k)]
                last = emit(k, length, par, par_ms, sum(m for _, m in singles),
                            sum(res.forward_passes for res, _ in singles), f"{k} runs of one branch", "branches", k)
        if tok is not None and last is not None:
            # a real answer beside the numbers: the largest K with the CLI's defaults (one line per branch, EOS,
            # distinct first tokens), untimed
            k = last["layout"]["K"]
            ex = dec.generate_branches(prefix, prompts[:k], 48, eos_token_id=tok.eos_token_id, stop_strings="\n",
                                       tokenizer=tok, logits_processor=distinct_starts(len(prefix), prompts[:k]))
            last["e2e"]["example"] = {
                "question": QUESTION, "forward_passes": ex.forward_passes, "tokens": ex.generated_tokens,
                "answer": [tok.decode(prompts[j] + b, skip_special_tokens=True).strip()
                           for j, b in enumerate(ex.branches)]}
        if mixed:
            rows.extend(_mixed(ctx, case, dec, prefix, prompts, shape, backend, n_params, p_bytes))
    except Exception as exc:  # noqa: BLE001
        kind = "out of memory" if isinstance(exc, torch.cuda.OutOfMemoryError) else type(exc).__name__
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" (at {tb[-1].filename.split('/')[-1]}:{tb[-1].lineno})" if tb else ""
        rows.append(row(ctx, OP, backend=backend, status="error", shape=shape,
                        reason=f"{kind}: {str(exc)[:300]}{where}"))
    finally:
        del dec
        if ctx.cuda:
            torch.cuda.empty_cache()
    return rows


def _mixed(ctx, case, dec, prefix, prompts, shape, backend, n_params, p_bytes) -> list[dict]:
    """ASPD's Vicuna mix: answers with K = MIXED_BRANCHES branches and a serial suffix after each section that
    gives 22.5% of the tokens, against one serial sequence of the same length per answer."""
    jobs, suffixes = {}, {}
    for i, k in enumerate(MIXED_BRANCHES):
        suffix = round(k * case.mixed_len * (1 - MIXED_PARALLEL_FRACTION) / MIXED_PARALLEL_FRACTION)
        suffixes[i] = (k, suffix)
        jobs[("parallel", i)] = (lambda k=k, suffix=suffix: dec.generate_branches(
            prefix, prompts[:k], case.mixed_len, eos_token_id=None, suffix_ids=[prompts[0][0]],
            max_suffix_tokens=suffix))
        total = k * case.mixed_len + suffix  # the same tokens decoded in one sequence, one per step
        jobs[("serial", i)] = (lambda total=total: dec.generate_serial(prefix + prompts[0], total, eos_token_id=None))
    got = _timed(ctx, jobs, f"e2e {case.model} mixed")
    par_ms = ser_ms = 0.0
    par_passes = ser_passes = tokens = 0
    for i, (k, suffix) in suffixes.items():
        res, ms = got[("parallel", i)]
        _check_lengths(res, [case.mixed_len] * k, f"mixed K={k}")
        if len(res.suffix) != suffix:
            raise RuntimeError(f"mixed K={k}: suffix of {len(res.suffix)} tokens, expected {suffix}")
        sres, sms = got[("serial", i)]
        _check_serial(sres, k * case.mixed_len + suffix, f"mixed serial K={k}")
        par_ms, par_passes, tokens = par_ms + ms, par_passes + res.forward_passes, tokens + res.generated_tokens
        ser_ms, ser_passes = ser_ms + sms, ser_passes + sres.forward_passes
    n_answers = len(MIXED_BRANCHES)
    mean_k = sum(MIXED_BRANCHES) / n_answers
    limit = 1.0 / ((1 - MIXED_PARALLEL_FRACTION) + MIXED_PARALLEL_FRACTION / mean_k)
    layout = {"K": mean_k, "branch_len": case.mixed_len, "prefix": len(prefix), "prompt": max(map(len, prompts)),
              "workload": "mixed", "answers": n_answers, "parallel_fraction": MIXED_PARALLEL_FRACTION}
    base = dict(shape=shape, layout=layout, dtype=ctx.dtype)
    r = row(ctx, OP, backend=backend, timing=Timing(par_ms / n_answers, 0, 0, n_answers, "wall"),
            nbytes=p_bytes * par_passes // n_answers, flops=2 * n_params * tokens // n_answers, **base)
    r["ms_p25"] = r["ms_p75"] = None
    r["ratio"] = {"serial": ser_ms / par_ms}
    r["e2e"] = {"tokens_per_s": tokens / (par_ms * 1e-3), "generated_tokens": tokens, "forward_passes": par_passes,
                "speedup": ser_ms / par_ms, "speedup_limit": limit, "serial_forward_passes": ser_passes,
                "serial_runs": "one sequence of the same length per answer",
                "over_limit": ser_ms / par_ms > OVER_LIMIT * limit}
    s = row(ctx, OP, baseline="serial", timing=Timing(ser_ms / n_answers, 0, 0, n_answers, "wall"),
            nbytes=p_bytes * ser_passes // n_answers, flops=2 * n_params * tokens // n_answers, **base)
    s["ms_p25"] = s["ms_p75"] = None
    s["e2e"] = {"tokens_per_s": tokens / (ser_ms * 1e-3), "generated_tokens": tokens, "forward_passes": ser_passes}
    return [r, s]
