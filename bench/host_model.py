"""The serial decode step on a real multi-layer model (SmolLM2-135M-Instruct, 30 layers, float32, CPU) against
transformers' ``generate`` on the same weights, and the host cost per layer.

Per step, for both: ``(cost(long) - cost(short)) / (long - short)`` of greedy decoding from one prompt, so the
prefill and the per-call setup cancel. Two measures:

- **instructions** counted by valgrind's callgrind in a child process (collection switched on around each
  ``generate`` call only): deterministic, so a shared machine's load does not move them;
- **wall time**, the minimum of interleaved runs (noisy on a shared machine; reported beside the counts).

The host cost per layer comes from the same step on the tiny Llama of ``host_compare`` (hidden 64) at 2 and 30
layers: ``(cost(30) - cost(2)) / 28``, where the matmuls are negligible and what remains is dispatch and Python.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
from typing import Callable

import torch

from . import host_compare, host_ops

SHORT, LONG = 4, 12  # generated tokens: 8 decode steps between the two (each runs every layer once)


def _pair(model_name: str, layers: int) -> tuple[Callable[[int], object], Callable[[int], object]]:
    """``(ours(n), transformers(n))``: greedy decoding of ``n`` tokens from a fixed 16-token prompt."""
    import transformers

    from aspd_kernels.decoder import ParallelDecoder

    if model_name == "smollm2":
        from aspd_kernels.models import smollm2_dir

        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    else:
        model = host_compare.tiny_llama(layers)
    dec = ParallelDecoder.from_hf(model, max_seq_len=256)
    prompt = list(range(1, 17))
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def ours(n: int) -> object:
        return dec.generate_serial(prompt, n)

    def hf(n: int) -> object:
        # min_new_tokens: the model must not stop early on an EOS
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)

    return ours, hf


def wall(model_name: str, layers: int = 30, reps: int = 5) -> dict:
    """Wall microseconds per step (minimum of ``reps`` interleaved runs) for ours and transformers'."""
    ours, hf = _pair(model_name, layers)
    with torch.no_grad():
        o_long, h_long = host_compare.min_pair(lambda: ours(LONG), lambda: hf(LONG), reps)
        o_short, h_short = host_compare.min_pair(lambda: ours(SHORT), lambda: hf(SHORT), reps)
    per = LONG - SHORT
    return dict(ours_us=(o_long - o_short) / per * 1e6, transformers_us=(h_long - h_short) / per * 1e6)


def callgrind_child(folder: str, models: list[tuple[str, int]]) -> None:
    """Runs under callgrind: each ``generate`` of both decoders on each model with collection on, one dump per
    call (named ``<model>-<layers>_<ours|hf>_<tokens>``). One process for all: importing torch and transformers
    under valgrind takes minutes."""
    torch.set_num_threads(1)
    lib = host_ops._helper(folder)
    for model_name, layers in models:
        ours, hf = _pair(model_name, layers)
        with torch.no_grad():
            for name, fn in (("ours", ours), ("hf", hf)):
                fn(SHORT)  # warm-up: first-call costs (plan caches, lazy imports) stay out of the counts
                for n in (SHORT, LONG):
                    lib.cg_on()
                    fn(n)
                    lib.cg_off(f"{model_name}-{layers}_{name}_{n}".encode())


def instructions(models: list[tuple[str, int]], timeout_s: float = 5400) -> dict | str:
    """``{(model, layers): {"ours": instructions per step, "hf": ...}}`` counted by callgrind, or the reason they
    were not counted."""
    missing = host_ops.callgrind_missing()
    if missing:
        return missing
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "callgrind.out")
        code = f"from bench.host_model import callgrind_child; callgrind_child({folder!r}, {models!r})"
        cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={out}",
               sys.executable, "-c", code]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if run.returncode != 0:
            return f"callgrind run failed: {run.stderr[-300:]}"
        counts = {}
        for path in glob.glob(out + "*"):
            lines = open(path).read().splitlines()
            trigger = [ln for ln in lines if ln.startswith("desc: Trigger:")]
            total = [ln for ln in lines if ln.startswith("totals:") or ln.startswith("summary:")]
            if trigger and total and "_" in trigger[0]:
                counts[trigger[0].split()[-1]] = int(total[0].split()[1])
    per = LONG - SHORT
    result = {}
    try:
        for model_name, layers in models:
            tag = f"{model_name}-{layers}"
            result[(model_name, layers)] = {
                name: (counts[f"{tag}_{name}_{LONG}"] - counts[f"{tag}_{name}_{SHORT}"]) / per
                for name in ("ours", "hf")}
    except KeyError:
        return f"callgrind dumps missing: got {sorted(counts)}"
    return result


def measure(with_callgrind: bool = True) -> dict:
    """Everything the report's section on the real model prints (see the module)."""
    out: dict = {"smollm2_wall": wall("smollm2")}
    tiny = {n: wall("tiny", n) for n in (2, 30)}
    out["tiny_wall"] = tiny
    out["instr"] = instructions([("tiny", 2), ("tiny", 30), ("smollm2", 30)]) if with_callgrind else "not requested"
    return out
