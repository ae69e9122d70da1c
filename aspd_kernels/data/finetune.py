"""Fine-tune a causal LM on the transformed answers (serial and parallel mixed) with ``attn_implementation="aspd"``
on the CPU: packed rows, branch-invisible attention, ASPD's shared positions.

    python -m aspd_kernels.data.finetune --data .aspd_data/aspd.jsonl --out .aspd_data/ft --steps 120

To fit a 2-core CPU, only the top ``--train-layers`` decoder layers, the final norm and an untied copy of the
output head are trained (the backward pass stops there); the six new input embeddings start as the mean embedding
of their own spelling ("<", "|", "title", ...), so they differ from each other though they stay frozen.
``--train-layers 0`` trains everything. Writes ``loss.png``, ``loss.jsonl`` and the checkpoint (``config.json``,
safetensors, tokenizer) to ``--out`` (``--save-every`` also writes it during training).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
from tqdm import tqdm

from .aspd_text import answer_ids, data_tokens, from_json
from .distill import chat_ids
from .transform import load_jsonl


def init_new_embeddings(model, tokenizer, names) -> None:
    """Each new token's input row := the mean of the rows of the tokens that spell it."""
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for name in names:
            i = tokenizer.convert_tokens_to_ids(name)
            parts = tokenizer.encode(name.replace("<|", "< |").replace("|>", "| >"), add_special_tokens=False)
            emb[i] = emb[parts].mean(0)


def untie_head(model) -> None:
    """Give the model its own output head (a copy of the embeddings), so the head trains while the inputs stay."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def select_params(model, train_layers: int) -> list[dict]:
    """The parameter groups of AdamW; everything else gets ``requires_grad=False``."""
    if train_layers <= 0:
        return [{"params": [p for p in model.parameters()], "name": "all"}]
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.model.layers
    body = [p for layer in layers[len(layers) - train_layers:] for p in layer.parameters()]
    body += list(model.model.norm.parameters())
    head = [model.get_output_embeddings().weight]
    for p in body + head:
        p.requires_grad_(True)
    return [{"params": body, "name": "body"}, {"params": head, "name": "head"}]


def build_examples(tok, tokens, rows: list[dict], max_len: int) -> list[dict]:
    import aspd_kernels.hf as ah

    out = []
    for r in rows:
        p = chat_ids(tok, r["prompt"])
        a = answer_ids(tok, tokens, from_json(r["pieces"]), r.get("title_markers", False)) + [tok.eos_token_id]
        if len(p) + len(a) <= max_len:
            ex = ah.build_example(p, a, tokens)
            ex["parallel"] = r["parallel"]
            ex["has_list"] = bool(r.get("refused"))
            out.append(ex)
    return out


def save_plot(losses: list[tuple[int, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    s, v = zip(*losses)
    ax.plot(s, v, lw=0.8, alpha=0.5, label="per step")
    k = max(1, len(v) // 20)
    sm = [sum(v[max(0, i - k):i + 1]) / len(v[max(0, i - k):i + 1]) for i in range(len(v))]
    ax.plot(s, sm, lw=1.5, label=f"mean of {k + 1}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aspd_kernels.data.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=".aspd_data/aspd.jsonl")
    p.add_argument("--out", default=".aspd_data/ft")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--row-tokens", type=int, default=1024, help="tokens packed into one training row")
    p.add_argument("--max-len", type=int, default=320, help="drop longer examples")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--train-layers", type=int, default=12)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--minutes", type=float, default=0.0, help="stop (and save) after this much wall-clock")
    p.add_argument("--max-serial", type=int, default=-1, help="keep at most this many serial examples (-1: all), "
                                                                "those without a refused list first")
    p.add_argument("--parallel-weight", type=int, default=2, help="each parallel example appears this many times "
                                                                   "per epoch (serial ones once)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--autocast", default="off", choices=["off", "bfloat16"],
                   help="run the forward and backward matmuls under torch.autocast (float32 weights and optimizer)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import aspd_kernels.hf as ah
    from ..models import resolve_model_path
    from ..tokens import TOKEN_STRINGS

    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=ah.NAME, dtype=torch.float32)
    ah.add_aspd_tokens(tok, model)
    tokens = data_tokens(tok)
    init_new_embeddings(model, tok, TOKEN_STRINGS)
    if args.train_layers > 0:
        untie_head(model)
    groups = select_params(model, args.train_layers)
    for g in groups:
        g["lr"] = args.head_lr if g["name"] == "head" else args.lr
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.98))
    base_lrs = [g["lr"] for g in opt.param_groups]

    rows = load_jsonl(args.data)
    examples = build_examples(tok, tokens, rows, args.max_len)
    if args.max_serial >= 0:
        serial = [e for e in examples if not e["parallel"]]
        random.Random(args.seed).shuffle(serial)
        # answers without a refused list first: a serial list taught beside parallel ones of the same kind would
        # teach the model to decode lists serially half the time
        serial.sort(key=lambda e: e["has_list"])
        examples = [e for e in examples if e["parallel"]] + serial[: args.max_serial]
    n_par = sum(e["parallel"] for e in examples)
    print(f"{len(examples)} examples ({n_par} parallel, {len(examples) - n_par} serial) of {len(rows)} rows; "
          f"training {sum(p.numel() for g in groups for p in g['params']) / 1e6:.1f}M parameters", flush=True)
    collate = ah.AspdCollator()
    rng = random.Random(args.seed)

    def batches():
        while True:
            order = [e for e in examples for _ in range(args.parallel_weight if e["parallel"] else 1)]
            rng.shuffle(order)
            for grp in ah.group_by_tokens(order, args.row_tokens):
                yield collate([{k: v for k, v in e.items() if k not in ("parallel", "has_list")} for e in grp])

    os.makedirs(args.out, exist_ok=True)
    model.train()
    losses: list[tuple[int, float]] = []
    log = open(os.path.join(args.out, "loss.jsonl"), "w")
    it = batches()
    t0 = time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), desc="fine-tune", unit="step", file=sys.stderr)
    for step in bar:
        scale = min(1.0, step / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * scale
        batch = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bfloat16"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((step, loss.item()))
        log.write(json.dumps({"step": step, "loss": loss.item(), "tokens": int(batch["input_ids"].numel()),
                              "s": time.perf_counter() - t0}) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if args.minutes and time.perf_counter() - t0 > 60 * args.minutes:
            print(f"\nstopping at step {step}: --minutes {args.minutes} reached", flush=True)
            break
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            save(model, tok, args.out)
            save_plot(losses, os.path.join(args.out, "loss.png"), f"fine-tune of {os.path.basename(path)}")
    bar.close()
    save(model, tok, args.out)
    save_plot(losses, os.path.join(args.out, "loss.png"),
              f"{os.path.basename(path)}: {len(losses)} steps of <= {args.row_tokens} tokens, "
              f"top {args.train_layers or 'all'} layers")
    print(f"{len(losses)} steps in {time.perf_counter() - t0:.0f} s; loss {losses[0][1]:.3f} -> "
          f"{sum(v for _, v in losses[-10:]) / len(losses[-10:]):.3f} (mean of the last 10) -> {args.out}")
    return 0


def save(model, tok, out: str) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


if __name__ == "__main__":
    sys.exit(main())
