"""Fine-tune a causal LM on parallel-structured (ASPD-format) answers with ``attn_implementation="aspd"``.

The whole loop on a CPU in seconds, offline: a byte-level tokenizer built in memory gains the six ASPD tokens
(embeddings resized), a tiny random Llama or Qwen2 is trained on packed rows of synthetic answers whose branches
cannot see each other, and the held-out loss is compared before and after::

    python examples/finetune_aspd.py --steps 40
    python examples/finetune_aspd.py --model qwen2 --steps 10 --hidden 32

With a real checkpoint the same four calls do the work: ``add_aspd_tokens(tokenizer, model)``,
``encode_example(tokenizer, prompt, answer)``, ``AspdCollator()(examples)`` and ``model(**batch).loss``.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # a checkout works without installing the package
import aspd_kernels.hf as ah  # noqa: E402
from aspd_kernels.hf.synthetic import byte_tokenizer, synthetic_dataset  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["llama", "qwen2"], default="llama")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--examples-per-step", type=int, default=4, help="examples packed into each row")
    p.add_argument("--train-examples", type=int, default=96)
    p.add_argument("--eval-examples", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--strategy", default="same-sequential", help="position strategy (SPEC section 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny matmuls: 1 is fastest)")
    return p.parse_args(argv)


def tiny_model(args, vocab: int):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[args.model]
    cfg = cls(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
              num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
              max_position_embeddings=4096, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=ah.NAME, dtype=torch.float32)


@torch.no_grad()
def eval_loss(model, batch) -> float:
    model.eval()
    loss = model(**batch).loss.item()
    model.train()
    return loss


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    tok = byte_tokenizer(with_aspd_tokens=False)
    model = tiny_model(args, len(tok))
    tokens = ah.add_aspd_tokens(tok, model)  # 256 bytes + EOS -> + 6 special tokens, embeddings resized

    pairs = synthetic_dataset(args.train_examples + args.eval_examples, seed=args.seed)
    examples = [ah.encode_example(tok, p, r, tokens, strategy=args.strategy) for p, r in pairs]
    train, held_out = examples[: args.train_examples], examples[args.train_examples:]
    collate = ah.AspdCollator()
    eval_batch = collate(held_out)
    first_eval = eval_loss(model, eval_batch)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    rng = random.Random(args.seed)
    order: list[int] = []
    rows = []
    model.train()
    bar = tqdm(range(args.steps), desc="finetune", unit="step")
    for step in bar:
        if len(order) < args.examples_per_step:
            order += rng.sample(range(len(train)), len(train))
        picked, order = order[: args.examples_per_step], order[args.examples_per_step:]
        batch = collate([train[i] for i in picked])
        t0 = time.perf_counter()
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        dt = time.perf_counter() - t0
        n_tok = batch["input_ids"].shape[1]
        n_branch = int((batch["aspd_branch"] > 0).sum())
        rows.append((step + 1, loss.item(), n_tok, n_branch, dt))
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{n_tok / dt:.0f}")
    bar.close()
    last_eval = eval_loss(model, eval_batch)

    every = max(1, len(rows) // 10)
    shown = [r for r in rows if r[0] % every == 0 or r[0] in (1, len(rows))]
    print(f"\nmodel {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocab {len(tok)} (ASPD ids {tokens.as_tuple()}), positions {args.strategy}")
    print(f"{'step':>5} {'loss':>8} {'tokens':>7} {'branch tok':>10} {'ms':>8} {'tok/s':>8}")
    for step, loss, n_tok, n_branch, dt in shown:
        print(f"{step:>5} {loss:>8.4f} {n_tok:>7} {n_branch:>10} {dt * 1e3:>8.1f} {n_tok / dt:>8.0f}")
    total_t = sum(r[4] for r in rows)
    print(f"held-out loss {first_eval:.4f} -> {last_eval:.4f}   "
          f"({sum(r[2] for r in rows)} tokens in {total_t:.1f} s of forward+backward)")
    return {"losses": [r[1] for r in rows], "eval_before": first_eval, "eval_after": last_eval}


if __name__ == "__main__":
    main()
