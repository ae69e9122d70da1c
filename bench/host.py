"""``python -m bench --ops host``: the host-path report of issue 13, one Markdown file under ``--out`` (default
``bench-out/``; the committed reports are in ``bench/results/``).

1. host overhead per public op (kernel a no-op; wall microseconds and callgrind instructions) beside the floor of
   a bare ``torch.library.custom_op`` of the same arity, and their ratio (goal: <= 1.5 with ``check_values=False``);
2. the decoder's host time per decode step beside transformers' ``generate`` step on the same tiny Llama (CPU);
   2b. the same on a real model (SmolLM2, 30 layers; callgrind instructions and wall) and the host cost per layer;
3. the CPU attention ratios against SDPA with a dense mask, and the peak memory of a 32k-token call.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys

import torch

from . import host_compare, host_model, host_ops
from .common import git_commit


def _instructions(r: dict, floor: dict) -> tuple[str, str]:
    """A row's instructions per call and their ratio to the floor's, or "n/a" where callgrind did not count."""
    instr = f"{r['instr']:,.0f}" if r["instr"] else "n/a"
    ratio = f"{r['instr'] / floor['instr']:.2f}" if r["instr"] and floor["instr"] else "n/a"
    return instr, ratio


def _ops_table(rows: list[dict]) -> list[str]:
    by_name = {r["name"]: r for r in rows if "wall_us" in r}
    lines = ["| call | arity | wall us | instructions / call | floor wall us | floor instructions | "
             "ratio (wall) | ratio (instructions) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "wall_us" not in r or "floor" in r["name"]:
            continue
        f = by_name[r["floor"]]
        (instr, ratio_i), (f_instr, _) = _instructions(r, f), _instructions(f, f)
        lines.append(f"| `{r['name']}` | {r['arity']} | {r['wall_us']:.1f} | {instr} | {f['wall_us']:.1f} | "
                     f"{f_instr} | {r['wall_us'] / f['wall_us']:.2f} | {ratio_i} |")
    lines += ["", "The leanest registration of a Python-implemented op, for scale (what the aspd ops use: a "
              "`torch.library.Library` op whose implementation is its CompositeExplicitAutograd kernel):", "",
              "| floor | wall us | instructions / call | against the custom_op floor (instructions) |",
              "|---|---|---|---|"]
    for r in rows:
        if "wall_us" in r and r["name"].startswith("lean floor"):
            instr, ratio = _instructions(r, by_name[r["floor"]])
            lines.append(f"| {r['name'][len('lean floor: '):]} | {r['wall_us']:.1f} | {instr} | {ratio} |")
    for r in rows:
        if "reason" in r:
            lines.append(f"\nInstruction counts not measured: {r['reason']}")
    return lines


SECTIONS = ("ops", "step", "model", "attention", "memory")


def _model_lines(m: dict) -> list[str]:
    """Section 2b: the real model's serial step (``host_model.measure``) and the host cost per layer."""
    w, tw = m["smollm2_wall"], m["tiny_wall"]
    instr = m["instr"]
    lines = [
        "## 2b. Decode step on a real model: SmolLM2-135M-Instruct (30 layers, hidden 576, float32, 1 thread)", "",
        f"Per step: `(cost({host_model.LONG} tokens) - cost({host_model.SHORT} tokens)) / "
        f"{host_model.LONG - host_model.SHORT}` of greedy decoding from a 16-token prompt, ours "
        "(`ParallelDecoder.generate_serial`) and transformers' `generate` (sdpa, dynamic cache) on the same weights. "
        "Instructions: callgrind, collection on around each call only (deterministic). Wall: minimum of interleaved "
        "runs. Goal: ratio >= 1.0.", "",
        "| measure | ours / step | transformers / step | ratio (transformers / ours) |", "|---|---|---|---|",
    ]
    if isinstance(instr, dict):
        r = instr[("smollm2", 30)]
        lines.append(f"| instructions | {r['ours']:,.0f} | {r['hf']:,.0f} | {r['hf'] / r['ours']:.3f} |")
    lines.append(f"| wall us | {w['ours_us']:.0f} | {w['transformers_us']:.0f} | "
                 f"{w['transformers_us'] / w['ours_us']:.3f} |")
    lines += ["", "Host cost per layer: the same step on the tiny Llama of section 2 at 2 and 30 layers, "
              "`(cost(30) - cost(2)) / 28` (its matmuls are negligible: what remains is dispatch and Python).", "",
              "| measure | ours / layer | transformers / layer | ratio |", "|---|---|---|---|"]
    if isinstance(instr, dict):
        a, b = instr[("tiny", 2)], instr[("tiny", 30)]
        o, h = (b["ours"] - a["ours"]) / 28, (b["hf"] - a["hf"]) / 28
        lines.append(f"| instructions | {o:,.0f} | {h:,.0f} | {h / o:.2f} |")
    else:
        lines.append(f"| instructions | n/a: {instr} | | |")
    o = (tw[30]["ours_us"] - tw[2]["ours_us"]) / 28
    h = (tw[30]["transformers_us"] - tw[2]["transformers_us"]) / 28
    lines += [f"| wall us | {o:.1f} | {h:.1f} | {h / o:.2f} |", ""]
    return lines


def report(argv: list[str], out_dir: str, callgrind: bool = True, sizes=(512, 2048, 8192),
           sections: tuple[str, ...] = SECTIONS, tag: str = "") -> str:
    """Measure the chosen ``sections`` (default all), write ``<date>-cpu-host[-<tag>].md`` into ``out_dir``;
    returns its path."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    body: list[str] = []
    if "ops" in sections:
        print("host overhead per op ...", file=sys.stderr)
        ops = host_ops.measure(with_callgrind=callgrind)
        body += [
            "## 1. Host overhead per op call (kernel replaced by a no-op; 16 tokens, 2 heads, D 16)", "",
            "The floor: a bare `torch.library.custom_op` with as many arguments as the op's registration, returning "
            "an empty tensor. Goal: ratio <= 1.5 with `check_values=False`.", "",
            *_ops_table(ops), "",
        ]
    if "step" in sections:
        print("decoder step against transformers ...", file=sys.stderr)
        step = host_compare.decoder_vs_transformers()
        body += [
            "## 2. Decode step, host time on the CPU (tiny Llama, 2 layers, hidden 64, greedy)", "",
            "Per step: `(t(48 tokens) - t(16 tokens)) / 32`, minimum of interleaved runs. Goal: ratio >= 1.0.", "",
            "| ours (us / step) | transformers `generate` (us / step) | ratio (transformers / ours) |",
            "|---|---|---|",
            f"| {step['ours_us']:.0f} | {step['transformers_us']:.0f} | {step['ratio']:.2f} |", "",
        ]
    if "model" in sections:
        print("real-model decode step against transformers (SmolLM2; callgrind takes minutes) ...", file=sys.stderr)
        body += _model_lines(host_model.measure(with_callgrind=callgrind))
    if "attention" in sections:
        print("CPU attention against dense SDPA ...", file=sys.stderr)
        attn = host_compare.attention_ratios(sizes)
        body += [
            "## 3. CPU attention against SDPA with a dense mask (K = 16 interleaved, Hq/Hkv 8/2, D 64, float32)", "",
            "Dense baseline: the mask prebuilt and the KV heads pre-repeated (not timed). Goal: ratio >= 1.0.", "",
            "| N | call | ours (ms) | SDPA dense (ms) | ratio (SDPA / ours) |", "|---|---|---|---|---|",
            *[f"| {r['n']} | {r['what']} | {r['ours_ms']:.2f} | {r['sdpa_ms']:.2f} | {r['ratio']:.2f} |"
              for r in attn],
            "",
        ]
    if "memory" in sections:
        peak = host_compare.peak_memory_mib()
        body += [
            f"Peak memory of one forward at N = {peak['n']} (Hq/Hkv 2/1, D 64), fresh process: the call adds "
            f"{peak['call_mib']:.0f} MiB over its inputs (process peak {peak['process_mib']:.0f} MiB). Goal: < 1 GiB.",
            "",
        ]
    lines = [
        f"# Host path (issue 13), CPU, {date}", "",
        f"- commit `{git_commit()}`; torch {torch.__version__}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()} (a shared machine: wall times are noisy, "
        "ratios come from the minimum of interleaved runs, host claims from instruction counts)",
        f"- command: `python -m bench {' '.join(argv)}`; sections: {', '.join(s for s in SECTIONS if s in sections)}",
        "",
        *body,
    ]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{date}-cpu-host{'-' + tag if tag else ''}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return path
