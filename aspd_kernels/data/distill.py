"""Self-distillation: the base model answers the training prompts serially through ``ParallelDecoder``, in
batches, greedy, with its chat template. Resumable: every answer is appended to a JSONL file as soon as its batch
ends, and prompts already there are skipped, so a kill loses at most one batch.

    python -m aspd_kernels.data.distill --out .aspd_data/serial.jsonl --max-new-tokens 176 --batch 16

Each line: ``id``, ``prompt``, ``list``, ``answer`` (text, EOS removed), ``tokens`` (generated tokens),
``finished`` (the model ended with EOS inside the cap).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from .prompts import load_prompts


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """``prompt`` as one user turn in the tokenizer's chat template, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def done_ids(path: str) -> set[int]:
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {json.loads(line)["id"] for line in f if line.strip()}


def order_for_batches(rows: list[dict], batch: int) -> list[dict]:
    """List and other prompts in separate batches (their answers' lengths differ, and a batch lasts as long as
    its longest answer), two list batches to one other, so a run cut short still holds both kinds."""
    lists = [r for r in rows if r["list"]]
    other = [r for r in rows if not r["list"]]
    out: list[dict] = []
    k = 0
    while lists or other:
        src = other if (k % 3 == 2 and other) or not lists else lists
        out += src[:batch]
        del src[:batch]
        k += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aspd_kernels.data.distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".aspd_data/serial.jsonl")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--limit", type=int, default=None, help="answer at most this many prompts of the split")
    p.add_argument("--max-new-tokens", type=int, default=176)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the decoder's dtype (auto: bfloat16 on a CPU with native bfloat16, about 1.5x the "
                        "tokens/s at batch 48 here; else float32)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from ..cpu import resolve_dtype
    from ..decoder import ParallelDecoder
    from ..models import resolve_model_path

    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    rows = load_prompts(args.split)[: args.limit]
    seen = done_ids(args.out)
    todo = order_for_batches([r for r in rows if r["id"] not in seen], args.batch)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    dec = ParallelDecoder.from_hf(path, dtype=resolve_dtype(args.dtype), max_seq_len=96 + args.max_new_tokens,
                                  max_batch=args.batch)
    eos = tok.eos_token_id
    bar = tqdm(total=len(todo), desc="distill", unit="answer", initial=0, file=sys.stderr)
    t0, ntok = time.perf_counter(), 0
    with open(args.out, "a") as f:
        for s in range(0, len(todo), args.batch):
            chunk = todo[s:s + args.batch]
            res = dec.generate_serial_batch([chat_ids(tok, r["prompt"]) for r in chunk], args.max_new_tokens,
                                            eos_token_id=eos)
            for r, out in zip(chunk, res):
                ids = out.suffix
                finished = bool(ids) and ids[-1] == eos
                text = tok.decode(ids[:-1] if finished else ids)
                f.write(json.dumps({"id": r["id"], "prompt": r["prompt"], "list": r["list"], "answer": text,
                                    "tokens": len(ids), "finished": finished}) + "\n")
                ntok += len(ids)
            f.flush()
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{ntok / (time.perf_counter() - t0):.0f}")
    bar.close()
    print(f"{len(todo)} answers, {ntok} tokens in {time.perf_counter() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
