"""Decode with a local Hugging Face model: several branches of an answer in one sequence.

    python -m aspd_kernels.generate --model DIR --prompt "..." --branches "first" "second" [--suffix "..."]
    python -m aspd_kernels.generate --model DIR --prompt "..." --aspd     # model-driven (ASPD-trained models)
    python -m aspd_kernels.generate --model DIR --prompt "..." --plan     # training-free plan mode, any model

Prints the plan (--plan), each branch, the text after the section, and forward passes, tokens, tokens/s and time.
"""
from __future__ import annotations

import argparse
import sys

import torch


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m aspd_kernels.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--prompt", required=True, help="the serial prefix")
    p.add_argument("--branches", nargs="+", default=None, help="one prompt per branch (generate_branches mode)")
    p.add_argument("--suffix", default=None, help="serial text after the section (with --suffix-tokens)")
    p.add_argument("--suffix-tokens", type=int, default=0, help="tokens to decode after the suffix")
    p.add_argument("--aspd", action="store_true", help="model-driven mode with the six ASPD tokens")
    p.add_argument("--plan", action="store_true",
                   help="training-free plan mode (Yu et al.'s format; the prompt gets its instruction and, when the "
                        "tokenizer has one, the chat template)")
    p.add_argument("--plan-prefix", default="", help="text that starts the answer in --plan mode ('####' starts "
                                                     "the list at once)")
    p.add_argument("--max-plan-tokens", type=int, default=256, help="stage-1 limit in --plan mode")
    p.add_argument("--max-items", type=int, default=8, help="most plan items in --plan mode")
    p.add_argument("--max-title-tokens", type=int, default=16, help="longest item title in --plan mode")
    p.add_argument("--max-new-tokens", type=int, default=64, help="per branch (--branches), in all (--aspd), the "
                                                                  "conclusion (--plan)")
    p.add_argument("--max-branch-tokens", type=int, default=256, help="per-branch limit in --aspd and --plan modes")
    p.add_argument("--strategy", default="same-sequential",
                   choices=("same-sequential", "same-max", "fixed-length", "sequential"))
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.aspd + a.plan + (a.branches is not None) != 1:
        p.error("give exactly one of --branches (caller's branches), --aspd (model-driven) or --plan (plan mode)")
    return a


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from .decoder import YU_INSTRUCTION, ParallelDecoder, PlanFormat
    from .tokens import AspdTokens

    a = _args(argv)
    tok = AutoTokenizer.from_pretrained(a.model)
    dec = ParallelDecoder.from_hf(a.model, device=a.device, dtype=a.dtype, max_seq_len=a.max_seq_len,
                                  cuda_graphs=False if a.no_cuda_graphs else None)
    eos = tok.eos_token_id
    prompt = _encode(tok, a.prompt)
    common = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, position_strategy=a.strategy)
    total = a.max_new_tokens * (len(a.branches) if a.branches else 1) + a.suffix_tokens
    bar = tqdm(total=total, unit="tok", desc="decoding", disable=a.no_progress, file=sys.stderr)
    prompts = None
    if a.plan:
        text = f"{a.prompt}\n{YU_INSTRUCTION}"
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
        fmt = PlanFormat.yu(tok, max_items=a.max_items, max_title_tokens=a.max_title_tokens)
        res = dec.generate_plan(_encode(tok, text + a.plan_prefix), fmt, a.max_plan_tokens, a.max_branch_tokens,
                                a.max_new_tokens, eos_token_id=eos, progress=bar.update, **common)
        sections = res.branches
        print(f"== plan: {tok.decode(res.plan, skip_special_tokens=False)!r}")
    elif a.branches:
        res = dec.generate_branches(prompt, [_encode(tok, b) for b in a.branches], a.max_new_tokens,
                                    eos_token_id=eos, suffix_ids=_encode(tok, a.suffix) if a.suffix else None,
                                    max_suffix_tokens=a.suffix_tokens, progress=bar.update, **common)
        sections = [res.branches]
        prompts = a.branches
    else:
        res = dec.generate(prompt, a.max_new_tokens, AspdTokens.from_tokenizer(tok), eos_token_id=eos,
                           max_branch_tokens=a.max_branch_tokens, progress=bar.update, **common)
        sections = res.branches
    bar.close()

    for s, branches in enumerate(sections):
        print(f"== parallel section {s} ({len(branches)} branches)")
        for j, ids in enumerate(branches):
            head = f"{prompts[j]!r} -> " if prompts else ""
            print(f"[branch {j + 1}] {head}{tok.decode(ids, skip_special_tokens=False)!r}")
    print(f"== after the section: {tok.decode(res.suffix, skip_special_tokens=False)!r}")
    branch_tokens = sum(len(b) for sec in sections for b in sec)
    rows = [
        ("forward passes", f"{res.forward_passes}"),
        ("tokens generated", f"{res.generated_tokens} ({branch_tokens} in branches)"),
        ("sequence length", f"{len(res.sequence)}"),
        ("tokens/s", f"{res.tokens_per_s:.1f} (decode only: {res.decode_tokens_per_s:.1f})"),
        ("time", f"{res.total_s * 1e3:.1f} ms (prefill {res.prefill_s * 1e3:.1f} ms, decode "
                 f"{res.decode_s * 1e3:.1f} ms)"),
        ("device", f"{dec.device} {str(dec.dtype).replace('torch.', '')}, cuda graphs "
                   f"{'on' if dec.graphs is not None and not dec.graphs.disabled else 'off'}"),
    ]
    # memory-bound decoding reads every weight once per forward pass: the rate that says how close to the limit
    weights = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in dec.model.parameters()}.values())
    rows.insert(4, ("weights read", f"{weights * res.forward_passes / max(res.total_s, 1e-9) / 1e9:.2f} GB/s "
                                    f"({weights / 1e6:.1f} MB x {res.forward_passes} passes)"))
    width = max(len(k) for k, _ in rows)
    print("-" * (width + 40))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
